"""All timeouts and limits of a peer in one place; relations between them are checked at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from collectives.errors import LocalError
from collectives.transport import Limits


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
    max_early_bytes: int = 1 << 30      # data we hold for ops we have not started yet
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if not 4096 <= self.slice_bytes <= 16 * 1024 * 1024:
            raise LocalError("slice_bytes must be within 4 KiB .. 16 MiB")
        if self.slice_bytes + 65536 > self.limits.max_frame_bytes:
            raise LocalError("slice_bytes exceeds the transport's max frame size")
        if not self.member and not self.coordinator:
            raise LocalError("a node must be a member, a coordinator, or both")
        if not self.coordinator and not self.join:
            raise LocalError("a peer needs --join addresses unless it runs the coordinator")


def normalize_addr(addr: str) -> str:
    return addr if addr.startswith("tcp://") else f"tcp://{addr}"
