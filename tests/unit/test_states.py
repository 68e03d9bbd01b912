"""The node's and the coordinator's state machines: one table each; an illegal move is a LocalError."""

from __future__ import annotations

import pytest

from collectives.errors import LocalError
from peer.config import Timeouts
from peer.core.coordinator import CoordinatorCore
from peer.core.states import COORD_TRANSITIONS, NODE_TRANSITIONS, CoordMode, NodeState, transition

pytestmark = pytest.mark.timeout(30)


def test_tables_cover_every_state_and_stay_inside() -> None:
    assert set(NODE_TRANSITIONS) == set(NodeState)
    assert set(COORD_TRANSITIONS) == set(CoordMode)
    assert all(targets <= set(NodeState) for targets in NODE_TRANSITIONS.values())
    assert not NODE_TRANSITIONS[NodeState.LEFT]  # terminal
    assert not COORD_TRANSITIONS[CoordMode.FAILED] and not COORD_TRANSITIONS[CoordMode.STEPPED_DOWN]


def test_transition_allows_the_table_and_self_loops_only() -> None:
    assert transition(NODE_TRANSITIONS, NodeState.JOINING, NodeState.PENDING) is NodeState.PENDING
    assert transition(NODE_TRANSITIONS, NodeState.MEMBER, NodeState.MEMBER) is NodeState.MEMBER
    for bad in [(NodeState.LEFT, NodeState.MEMBER), (NodeState.JOINING, NodeState.REFORMING),
                (NodeState.COORDINATOR, NodeState.MEMBER), (NodeState.REDIRECTOR, NodeState.STALE)]:
        with pytest.raises(LocalError, match="illegal state transition"):
            transition(NODE_TRANSITIONS, *bad)
    with pytest.raises(LocalError):
        transition(COORD_TRANSITIONS, CoordMode.STEPPED_DOWN, CoordMode.ACTIVE)


def test_states_compare_as_strings() -> None:
    assert NodeState.MEMBER == "member" and str(NodeState.STALE) == "stale" and f"{NodeState.LEFT}" == "left"
    assert NodeState("reforming") is NodeState.REFORMING


def test_coordinator_mode_flags() -> None:
    t = Timeouts.local()
    c = CoordinatorCore("a", "tcp://a", t, 0.0, epoch=3, members=[("a", "tcp://a"), ("b", "tcp://b")],
                        reform_expected={"a", "b"})
    assert c.mode is CoordMode.REFORMING and c.reforming and not c.failed_reform
    c.tick(t.reform_window + 1)  # nobody checked in: no quorum
    assert c.mode is CoordMode.FAILED and c.failed_reform and not c.reforming
    with pytest.raises(LocalError):
        c.mode = CoordMode.ACTIVE
    assert CoordinatorCore("a", "tcp://a", t, 0.0).mode is CoordMode.ACTIVE
