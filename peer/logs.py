"""Log records tagged with the peer they concern, instead of pasting the id into every format string.

    log = peer_log(__name__, "p0")                 # or peer_log(__name__, "p0", role="coordinator")
    log.warning("stale (%s)", reason)              # -> "p0: stale (...)"  ("coordinator p0: ..." with a role)

Each record also carries ``record.peer`` (the bare id), for a formatter (``%(peer)s``) or a filter.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, MutableMapping

if TYPE_CHECKING:
    _Adapter = logging.LoggerAdapter[logging.Logger]
else:
    _Adapter = logging.LoggerAdapter


class PeerLog(_Adapter):
    def __init__(self, logger: logging.Logger, peer: str, role: str = "") -> None:
        super().__init__(logger, {"peer": peer})
        self.peer = peer
        self.prefix = f"{role} {peer}" if role else peer

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("peer", self.peer)
        kwargs["extra"] = extra
        return f"{self.prefix}: {msg}", kwargs


def peer_log(name: str, peer: str, role: str = "") -> PeerLog:
    """``logging.getLogger(name)``, with every message prefixed by ``peer`` (and ``role``)."""
    return PeerLog(logging.getLogger(name), peer, role)
