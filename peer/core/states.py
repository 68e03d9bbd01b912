"""The two state machines of a peer, each as one transition table (the model: h11's ``_state.py``).

Membership client (``peer.node.Node.state``), as this peer sees itself::

    joining   --Welcome-->                          pending
    joining   --EpochUpdate that lists me-->        member      (the Welcome was lost)
    pending   --EpochUpdate that lists me-->        member
    pending   --coordinator lost-->                 joining     (try the next address)
    member    --EpochUpdate that lists me-->        member      (a new epoch)
    member    --coordinator presumed dead-->        reforming
    reforming --EpochUpdate from the successor-->   member
    reforming --Redirect to the old coordinator-->  member      (it is alive for the others)
    joining|pending|member|reforming --Stale / not in the epoch / no successor / join deadline--> stale
    stale     --EpochUpdate that still lists me-->  member      (a late update of the epoch we left)
    stale|pending|member|reforming --rejoin()-->    joining
    coordinator --stepped down / another coordinator's term--> redirector   (a standalone coordinator)
    any       --leave()-->                          left        (terminal: nothing moves a peer that left)

Coordinator core (``peer.core.coordinator.CoordinatorCore.mode``)::

    reforming    --survivors checked in (a quorum)-->    active
    reforming    --no quorum by the deadline-->          failed       (terminal: the node drops the core)
    active       --cannot hear a majority-->             stepped_down (terminal: the node drops the core)

Staying in the same state is always allowed (a no-op). Any other move raises ``LocalError``: it is a bug
in this process, never something a peer can cause (remote input is checked before it moves a state).
"""

from __future__ import annotations

from enum import Enum
from typing import Mapping, TypeVar

from collectives.errors import LocalError


class NodeState(str, Enum):
    """A ``str``: ``swarm.state == "member"`` keeps working."""
    JOINING = "joining"
    PENDING = "pending"
    MEMBER = "member"
    REFORMING = "reforming"
    STALE = "stale"
    COORDINATOR = "coordinator"   # a standalone coordinator (takes no part in collectives)
    REDIRECTOR = "redirector"     # a standalone coordinator that stepped down: sends joiners to members
    LEFT = "left"

    def __str__(self) -> str:
        return self.value


class CoordMode(str, Enum):
    REFORMING = "reforming"        # a successor waiting for the survivors' Rejoins
    ACTIVE = "active"
    FAILED = "failed"              # could not re-form (no quorum of survivors)
    STEPPED_DOWN = "stepped_down"  # lost its quorum

    def __str__(self) -> str:
        return self.value


_N = NodeState
NODE_TRANSITIONS: Mapping[NodeState, frozenset[NodeState]] = {
    _N.JOINING: frozenset({_N.PENDING, _N.MEMBER, _N.STALE, _N.LEFT}),
    _N.PENDING: frozenset({_N.MEMBER, _N.JOINING, _N.STALE, _N.LEFT}),
    _N.MEMBER: frozenset({_N.REFORMING, _N.STALE, _N.JOINING, _N.LEFT}),
    _N.REFORMING: frozenset({_N.MEMBER, _N.STALE, _N.JOINING, _N.LEFT}),
    _N.STALE: frozenset({_N.JOINING, _N.MEMBER, _N.LEFT}),
    _N.COORDINATOR: frozenset({_N.REDIRECTOR, _N.LEFT}),
    _N.REDIRECTOR: frozenset({_N.LEFT}),
    _N.LEFT: frozenset(),
}

_C = CoordMode
COORD_TRANSITIONS: Mapping[CoordMode, frozenset[CoordMode]] = {
    _C.REFORMING: frozenset({_C.ACTIVE, _C.FAILED}),
    _C.ACTIVE: frozenset({_C.STEPPED_DOWN}),
    _C.FAILED: frozenset(),
    _C.STEPPED_DOWN: frozenset(),
}

S = TypeVar("S", NodeState, CoordMode)


def transition(table: Mapping[S, frozenset[S]], old: S, new: S) -> S:
    """``new`` if the table allows ``old -> new`` (or they are equal); else ``LocalError``."""
    if new is not old and new not in table[old]:
        raise LocalError(f"illegal state transition {old.value} -> {new.value}")
    return new
