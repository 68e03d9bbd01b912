"""What the pure cores ask the I/O driver (``peer.node``) to do. The driver applies them in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

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


Action = Union[Out, Connect, Drop]
