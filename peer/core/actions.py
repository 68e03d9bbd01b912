"""What the pure cores ask the I/O driver (``peer.node``) to do. The driver applies them in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from collectives import wire


@dataclass
class Out:
    """Send ``msg`` to peer ``to`` on its control connection."""
    to: str
    msg: wire.Message


@dataclass
class Connect:
    """Open (or re-address) the connection to ``peer`` at ``addr``; ``remember``: also record ``addr`` as the
    peer's address (a joiner's or a survivor's claimed address is only used to answer it)."""
    peer: str
    addr: str
    remember: bool = True


@dataclass
class Drop:
    """Close the connection to ``peer`` and forget it."""
    peer: str


@dataclass
class Data:
    """Send ``msg`` (a tensor chunk or an ack) to peer ``to`` with ``payload``, a buffer sent zero-copy: the
    op engine never writes it again."""
    to: str
    msg: wire.Message
    payload: Any = None


@dataclass
class ToCoordinator:
    """Send ``msg`` to the current coordinator (dropped while there is none)."""
    msg: wire.Message


@dataclass
class Suspect:
    """Report ``peer`` to the coordinator as faulty (bad data, a protocol breach), with the reason."""
    peer: str
    reason: str


@dataclass
class ViaAddr:
    """Send ``msg`` to whoever listens at ``addr``: over a link we already have to that address (a second
    socket with our identity to the same ROUTER would take the identity over and drop the first one's
    messages), else over a fresh link keyed ``seed``."""
    addr: str
    seed: str
    msg: wire.Message


@dataclass
class Note:
    """Record a membership event (``kind``, ``detail``) in the peer's history."""
    kind: str
    detail: str


@dataclass
class Wake:
    """Resolve the waiting topology votes with the current epoch (``error`` None), or fail them."""
    error: Optional[BaseException]


@dataclass
class Admitted:
    """The membership changed (admitted, a new epoch, stale): wake threads waiting for admission."""


@dataclass
class Probe:
    """Send a bandwidth probe to each of ``members`` not probed yet."""
    epoch: int
    members: tuple[str, ...]


Action = Union[Out, Connect, Drop, Data, ToCoordinator, Suspect, ViaAddr, Note, Wake, Admitted, Probe]
