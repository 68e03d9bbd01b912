"""The proxy's per-route state (``peer.sim.proxy`` runs the loop): impairments, counters, connections and the
chunks waiting in each direction."""

from __future__ import annotations

import collections
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional

from collectives.errors import LocalError


@dataclass(frozen=True)
class Impairment:
    delay_s: float = 0.0   # one-way latency added to every chunk, both directions
    jitter_s: float = 0.0  # plus uniform(0, jitter_s); order within a connection is kept
    rate_bps: float = 0.0  # bits/s towards the peer; 0 = unlimited

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0 or self.rate_bps < 0:
            raise LocalError("delay, jitter and rate must be >= 0")


@dataclass
class RouteStats:
    accepted: int = 0
    refused: int = 0
    bytes_to_peer: int = 0
    bytes_from_peer: int = 0
    resets: int = 0
    truncated: int = 0
    corrupted: int = 0


class _Pipe:
    """One direction of a connection: chunks waiting for their release time."""

    def __init__(self, src: socket.socket, dst: socket.socket, to_peer: bool) -> None:
        self.src, self.dst, self.to_peer = src, dst, to_peer
        self.chunks: collections.deque[tuple[float, memoryview]] = collections.deque()
        self.queued = 0
        self.last_release = 0.0
        self.src_eof = False
        self.dst_shut = False
        self.close_after_flush = False  # truncation: drop the rest, close once the cut chunk is out
        self.blocked = False            # the last send would block: wait for the socket to be writable
        self.not_before = 0.0           # rate limit: no tokens before this time


@dataclass
class _Conn:
    route: "_Route"
    down: socket.socket
    up: Optional[socket.socket] = None
    connecting: bool = False
    accepted_at: float = 0.0
    pipes: list[_Pipe] = field(default_factory=list)
    closed: bool = False


@dataclass
class _Route:
    name: str
    listener: Optional[socket.socket]
    addr: tuple[str, int]
    impair: Impairment
    upstream: Optional[tuple[str, int]] = None
    conns: list[_Conn] = field(default_factory=list)
    stalled_until: float = 0.0
    corrupt_budget: int = 0
    truncate_pending: bool = False
    tokens: float = 0.0
    tokens_at: float = 0.0
    stats: RouteStats = field(default_factory=RouteStats)


def rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # not connected: a plain close is all there is
    sock.close()
