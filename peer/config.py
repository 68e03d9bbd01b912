"""All timeouts and limits of a peer in one place; relations between them are checked at construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from collectives import keys
from collectives.errors import LocalError
from collectives.security import AuthLimits, Curve, Insecure, Security
from collectives.transport import Limits
from peer.logs import peer_log

DEFAULT_KEY_FILE = "~/.swarmtrain/peer.key"
SECRET_ENV, KEY_ENV = "SWARMTRAIN_SECRET", "SWARMTRAIN_KEY"
INSECURE_WARNING = ("INSECURE MODE: connections are neither encrypted nor authenticated. Anyone who can reach "
                    "this peer's port can join the swarm, read and alter what it sends, and pose as any peer. "
                    "Use only for benchmarks on a network you trust.")
NO_SECRET_HELP = ("no swarm secret: create one with `swarmtrain keygen --secret swarm.secret`, copy it to every "
                  "machine, and pass --secret swarm.secret (or set SWARMTRAIN_SECRET); --insecure turns "
                  "security off (trusted networks only)")


@dataclass(frozen=True)
class SecurityConfig:
    """Who may join and how this peer proves who it is (``collectives.security`` explains the design).
    Secure by default: a swarm secret is required unless ``insecure`` is set."""
    secret_file: str = ""    # the swarm secret; "" -> $SWARMTRAIN_SECRET
    key_file: str = ""       # this peer's key pair, created on first use; "" -> $SWARMTRAIN_KEY or ~/.swarmtrain/peer.key
    allow_file: str = ""     # optional allowlist: only these public keys may connect ("<hex key> [peer id]" lines)
    insecure: bool = False   # plain TCP: no encryption, no authentication (trusted networks only)
    limits: AuthLimits = field(default_factory=AuthLimits)

    def build(self, peer_id: str) -> Security:
        """A fresh policy for one transport (loads the files; creates the key file on first use)."""
        if self.insecure:
            peer_log(__name__, peer_id).warning(INSECURE_WARNING)
            return Insecure()
        secret_file = self.secret_file or os.environ.get(SECRET_ENV, "")
        if not secret_file:
            raise LocalError(NO_SECRET_HELP)
        secret = keys.load_secret(secret_file)
        me = keys.load_or_create_keypair(self.key_file or os.environ.get(KEY_ENV, "") or DEFAULT_KEY_FILE)
        allow, pins = keys.load_allowlist(self.allow_file) if self.allow_file else (None, {})
        return Curve(me, secret, allow=allow, pins=pins, limits=self.limits, owner=peer_id)


@dataclass(frozen=True)
class Timeouts:
    """Every deadline of the membership protocol, in seconds. The defaults are sized for the internet;
    ``Timeouts.local()`` is the fast profile for one machine (tests, the demo, the simulator, examples).

    Derived deadlines are properties (below), so that every number the node and the coordinator wait on
    is named here; ``__post_init__`` checks the relations the protocol relies on."""
    heartbeat_interval: float = 0.25   # peer -> coordinator heartbeat period
    heartbeat_timeout: float = 3.0     # a member silent this long is evicted (a stalled peer)
    coordinator_timeout: float = 3.0   # no heartbeat ack this long: the coordinator is presumed dead
    reconnect_grace: float = 0.5       # a dropped link not back within this is a dead peer
    reform_window: float = 2.0         # a successor waits at most this long for survivors to rejoin
    op_progress_timeout: float = 30.0  # an op that receives no bytes for this long is failed
    verdict_timeout: float = 15.0      # extra wait for the verdict after asking for an abort
    join_timeout: float = 60.0         # joining (until admitted) gives up after this
    resend_interval: float = 1.0       # an OpDone / OpFail with no verdict after this long is sent again
    ack_slack: float = 0.05            # scheduling slack on top of two heartbeats (``ack_fresh``)

    @classmethod
    def local(cls, **overrides: float) -> "Timeouts":
        """The fast profile for peers on one (possibly loaded, 2-core) machine: failures are noticed within
        a few seconds, yet heartbeat deadlines stay well above scheduling hiccups. ``overrides`` replace
        single fields (the relations are checked as usual)."""
        values = dict(heartbeat_interval=0.1, heartbeat_timeout=2.5, coordinator_timeout=2.5,
                      reconnect_grace=0.5, reform_window=1.0, op_progress_timeout=8.0, verdict_timeout=5.0,
                      join_timeout=20.0)
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise LocalError(f"Timeouts has no field(s) {sorted(unknown)}")
        values.update(overrides)
        return cls(**values)

    def cli_args(self) -> list[str]:
        """These timeouts as ``swarmtrain`` flags (only the fields that differ from the defaults), e.g. for
        a peer process: ``Timeouts.from_args(parser.parse_args(t.cli_args())) == t``."""
        default = Timeouts()
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out += [cli_flag(f.name), repr(float(value))]
        return out

    @classmethod
    def from_args(cls, ns: Any) -> "Timeouts":
        """The inverse of ``cli_args``: read the flags that ``peer.cli.add_timeout_args`` defines."""
        return cls(**{f.name: float(getattr(ns, f.name)) for f in fields(cls)})

    # ------------------------------------------------------------------ derived deadlines
    @property
    def ack_fresh(self) -> float:
        """A heartbeat ack this recent proves the coordinator alive (a peer that says otherwise was cut off)."""
        return 2 * self.heartbeat_interval + self.ack_slack

    @property
    def local_stall(self) -> float:
        """A gap this long between two ticks of our own I/O thread means *we* were not running."""
        return self.coordinator_timeout / 2

    @property
    def quorum_fresh(self) -> float:
        """A member heard from within this counts towards the coordinator's quorum."""
        return self.heartbeat_timeout / 2

    @property
    def join_retry(self) -> float:
        """A Join with no answer is sent to the next address after this long."""
        return max(1.0, 4 * self.heartbeat_interval)

    @property
    def new_epoch_wait(self) -> float:
        """After an op aborted because a member was lost, the epoch without it comes within this."""
        return 2 * self.heartbeat_timeout

    @property
    def candidate_timeout(self) -> float:
        """A successor candidate that has not re-formed the swarm within this is skipped."""
        return self.reform_window + self.coordinator_timeout

    def __post_init__(self) -> None:
        for f in fields(self):
            if not getattr(self, f.name) > 0 and f.name != "ack_slack":
                raise LocalError(f"{f.name} must be positive")
        if self.ack_slack < 0:
            raise LocalError("ack_slack must not be negative")
        if self.heartbeat_timeout < 3 * self.heartbeat_interval:
            raise LocalError("heartbeat_timeout must be at least 3 heartbeat intervals")
        if self.coordinator_timeout < 3 * self.heartbeat_interval:
            raise LocalError("coordinator_timeout must be at least 3 heartbeat intervals")
        if self.ack_fresh >= self.coordinator_timeout:
            raise LocalError("two heartbeat intervals plus ack_slack must be shorter than coordinator_timeout")
        if self.reform_window < self.reconnect_grace:
            raise LocalError("reform_window must exceed reconnect_grace (survivors need time to notice)")
        if self.op_progress_timeout <= self.heartbeat_timeout:
            raise LocalError("op_progress_timeout must exceed heartbeat_timeout (eviction comes first)")
        if self.resend_interval >= self.verdict_timeout:
            raise LocalError("resend_interval must be shorter than verdict_timeout (a lost request is resent "
                             "before the caller gives up on its verdict)")
        if self.join_timeout <= self.join_retry:
            raise LocalError("join_timeout must exceed the join retry interval (max(1 s, 4 heartbeats))")


def cli_flag(name: str) -> str:
    """``heartbeat_interval`` -> ``--heartbeat-interval``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class PeerConfig:
    peer_id: str
    host: str = "127.0.0.1"
    port: int = 0
    join: tuple[str, ...] = ()          # coordinator or any peer addresses, "host:port" or "tcp://host:port"
    coordinator: bool = False           # run the coordinator role in this process (bootstrap)
    member: bool = True                 # take part in collectives (False: standalone coordinator)
    swarm: str = "default"
    advertise: str = ""                 # address others reach us at (a proxy, a NAT); default: the bound one
    slice_bytes: int = 4 * 1024 * 1024  # tensors travel as frames of at most this size
    parity_digest: bool = True          # send a BLAKE2b digest of every result with the commit request
    bandwidth_probes: bool = True       # measure links to new members; the coordinator orders the ring by them
    max_early_bytes: int = 1 << 30      # data we hold for ops we have not started yet
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        if not 4096 <= self.slice_bytes <= 16 * 1024 * 1024:
            raise LocalError("slice_bytes must be within 4 KiB .. 16 MiB")
        if self.slice_bytes + 65536 > self.limits.max_frame_bytes:
            raise LocalError("slice_bytes exceeds the transport's max frame size")
        if not self.member and not self.coordinator:
            raise LocalError("a node must be a member, a coordinator, or both")
        if not self.coordinator and not self.join:
            raise LocalError("a peer needs --join addresses unless it runs the coordinator")
        if self.limits.handshake_ms / 1000 >= self.timeouts.join_timeout:
            raise LocalError("the handshake limit must be shorter than the join timeout")


def normalize_addr(addr: str) -> str:
    return addr if addr.startswith("tcp://") else f"tcp://{addr}"
