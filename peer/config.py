"""All timeouts and limits of a peer in one place; relations between them are checked at construction."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from collectives import keys
from collectives.errors import LocalError
from collectives.security import AuthLimits, Curve, Insecure, Security
from collectives.transport import Limits

log = logging.getLogger(__name__)

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
            log.warning("%s: %s", peer_id, INSECURE_WARNING)
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
    heartbeat_interval: float = 0.25   # peer -> coordinator heartbeat period
    heartbeat_timeout: float = 3.0     # a member silent this long is evicted (a stalled peer)
    coordinator_timeout: float = 3.0   # no heartbeat ack this long: the coordinator is presumed dead
    reconnect_grace: float = 0.5       # a dropped link not back within this is a dead peer
    reform_window: float = 2.0         # a successor waits at most this long for survivors to rejoin
    op_progress_timeout: float = 30.0  # an op that receives no bytes for this long is failed
    verdict_timeout: float = 15.0      # extra wait for the verdict after asking for an abort
    join_timeout: float = 60.0         # joining (until admitted) gives up after this

    def __post_init__(self) -> None:
        if self.heartbeat_timeout < 3 * self.heartbeat_interval:
            raise LocalError("heartbeat_timeout must be at least 3 heartbeat intervals")
        if self.coordinator_timeout < 3 * self.heartbeat_interval:
            raise LocalError("coordinator_timeout must be at least 3 heartbeat intervals")
        if self.reform_window < self.reconnect_grace:
            raise LocalError("reform_window must exceed reconnect_grace (survivors need time to notice)")
        if self.op_progress_timeout <= self.heartbeat_timeout:
            raise LocalError("op_progress_timeout must exceed heartbeat_timeout (eviction comes first)")


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
