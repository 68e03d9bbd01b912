"""What the pure cores ask the I/O driver (``peer.node``) to do. The driver applies them in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from collectives import wire


@dataclass
class Out:
    """Send ``msg`` to peer ``to`` on its control connection."""
    to: str
    msg: wire.Message


@dataclass
class Connect:
    """Open (or re-address) the connection to ``peer`` at ``addr``."""
    peer: str
    addr: str


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


Action = Union[Out, Connect, Drop, Data, ToCoordinator, Suspect]
