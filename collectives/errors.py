"""Typed errors.

Two families, as in h11: ``LocalError`` is our own misuse (a bug in the caller: raise, do not retry);
``RemoteError`` is something a peer or the network did to us (drop the peer, record the failure, carry on).
Collective failures that a retry on the survivors can fix derive from ``OpAborted``.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base of every error swarmtrain raises on purpose."""


class LocalError(SwarmError):
    """The caller misused the API (wrong dtype, wrong shape, op on a closed communicator)."""


class RemoteError(SwarmError):
    """A peer sent something we refuse, or the network failed."""


class WireError(RemoteError):
    """A message failed to decode or validate (malformed, truncated, oversized, wrong type)."""


class AuthError(RemoteError):
    """The connection may not send this: unknown or banned key, bad join token, or a claimed peer id that
    belongs to another key (impersonation). The claimed sender id is not trusted."""


class ProtocolError(RemoteError):
    """A well-formed message that breaks the protocol (unexpected op, wrong sizes, impersonation)."""


class OpAborted(SwarmError):
    """A collective got the verdict *aborted*: nothing was applied; retrying on the survivors may work."""

    def __init__(self, message: str, *, epoch: int = -1, reason: str = "", key: str = "") -> None:
        super().__init__(message)
        self.epoch = epoch
        self.reason = reason
        self.key = key  # the op's wire key (``wire.op_key``), "" when the op never got one


class PeerLost(OpAborted):
    """A member of the op died, left or was evicted while the op ran."""


class TooFewPeers(OpAborted):
    """Fewer than two members: no collective can run; the step should be discarded."""


class OpTimeout(OpAborted):
    """The op made no progress before its deadline and was aborted everywhere."""


class StaleError(SwarmError):
    """This peer is no longer a member (evicted after a stall, or its term is over): rejoin and resync."""


class CoordinatorUnavailable(SwarmError):
    """No coordinator (nor any successor) answered before the deadline."""


class DeadlineExceeded(SwarmError):
    """A blocking call ran past its deadline."""
