"""The pure pipeline plan: stage assignment (determinism, balance, minimal moves, requests), recovery needs,
routing (every micro-batch through one replica per stage, spread evenly)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.train.pipeline_plan import (NONE, MemberRecord, NotEnoughPeers, assign_stages, make_plan,
                                      micro_batch_counts, route)

names = st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=12, unique=True)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[str], dict[str, int], dict[str, int], int]:
    members = draw(names)
    S = draw(st.integers(1, max(1, len(members))))
    prev = {m: draw(st.integers(-1, S - 1)) for m in members if draw(st.booleans())}
    req = {m: draw(st.integers(-1, S - 1)) for m in members if draw(st.booleans())}
    return members, prev, req, S


@settings(max_examples=150, deadline=None)
@given(scenario())
def test_assignment_is_deterministic_and_serves_every_stage(sc: tuple[list[str], dict[str, int],
                                                                      dict[str, int], int]) -> None:
    members, prev, req, S = sc
    a = assign_stages(members, prev, req, S)
    assert a == assign_stages(list(members), dict(reversed(list(prev.items()))), dict(req), S)
    assert set(a) == set(members)
    assert set(a.values()) == set(range(S))            # no stage left empty


@settings(max_examples=150, deadline=None)
@given(scenario())
def test_minimal_moves(sc: tuple[list[str], dict[str, int], dict[str, int], int]) -> None:
    """A member keeps its stage unless a stage would otherwise be empty: moves <= stages that no kept
    member and no newcomer serves."""
    members, prev, req, S = sc
    a = assign_stages(members, prev, req, S)
    kept = {m: s for m, s in prev.items() if 0 <= s < S}
    moved = [m for m, s in kept.items() if a[m] != s]
    newcomers = [m for m in members if m not in kept]
    uncovered = S - len(set(kept.values()))
    assert len(moved) <= max(0, uncovered - len(newcomers)) if not req else len(moved) <= uncovered
    for m in moved:   # a mover came from a stage that still has a replica
        assert kept[m] in a.values()


@settings(max_examples=100, deadline=None)
@given(names, st.integers(1, 6))
def test_fresh_assignment_is_balanced(members: list[str], S: int) -> None:
    if len(members) < S:
        with pytest.raises(NotEnoughPeers):
            assign_stages(members, {}, {}, S)
        return
    a = assign_stages(members, {}, {}, S)
    counts = [list(a.values()).count(s) for s in range(S)]
    assert max(counts) - min(counts) <= 1


@settings(max_examples=100, deadline=None)
@given(scenario())
def test_requests_of_newcomers_are_honoured_unless_a_stage_would_be_empty(
        sc: tuple[list[str], dict[str, int], dict[str, int], int]) -> None:
    members, prev, req, S = sc
    a = assign_stages(members, {}, req, S)
    counts = {s: list(a.values()).count(s) for s in range(S)}
    for m, r in req.items():
        if 0 <= r < S and a[m] != r:
            assert counts[a[m]] == 1   # it was moved only to fill a stage nobody else serves


def test_joiner_fills_the_empty_stage_before_anyone_moves() -> None:
    a = assign_stages(["a", "b", "c", "j"], {"a": 0, "b": 0, "c": 2}, {}, 3)
    assert a == {"a": 0, "b": 0, "c": 2, "j": 1}
    b = assign_stages(["a", "b", "c"], {"a": 0, "b": 0, "c": 2}, {}, 3)
    assert b == {"a": 0, "b": 1, "c": 2}               # no joiner: the last replica of stage 0 moves


def test_plan_sources_needy_lost() -> None:
    rec = {"a": MemberRecord(0, NONE, 5), "b": MemberRecord(1, NONE, 5), "c": MemberRecord(1, NONE, 4),
           "j": MemberRecord()}
    plan = make_plan(7, ["a", "b", "c", "j"], rec, 3)
    assert plan.committed == 5 and not plan.fresh
    assert plan.assignment["j"] == 2
    assert plan.sources == {0: ["a"], 1: ["b"], 2: []}
    assert plan.needy == {1: ["c"], 2: ["j"]}          # c is behind; j is new
    assert plan.lost == [2]                            # nobody holds stage 2's state
    fresh = make_plan(1, ["a", "b"], {"a": MemberRecord(), "b": MemberRecord()}, 2)
    assert fresh.fresh and not fresh.needy and not fresh.lost


def test_record_decode_is_bounded() -> None:
    r = MemberRecord.decode(np.array([99, -7, -50, 1 << 40], np.int64), 4)
    assert (r.held, r.request, r.committed) == (NONE, NONE, NONE)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=5), st.integers(1, 16), st.integers(0, 50))
def test_route_spreads_micro_batches_evenly(reps: list[int], M: int, step: int) -> None:
    members = [f"s{s}r{r}" for s, k in enumerate(reps) for r in range(k)]
    rec = {m: MemberRecord(int(m[1:].split("r")[0]), NONE, 3) for m in members}
    plan = make_plan(1, members, rec, len(reps))
    routes = route(plan, step, M)
    assert route(plan, step, M) == routes
    for r in routes:
        assert [plan.assignment[p] for p in r] == list(range(len(reps)))
    counts = micro_batch_counts(plan, routes)
    for s, k in enumerate(reps):
        got = [counts[m] for m in plan.replicas[s]]
        assert sum(got) == M and max(got) - min(got) <= 1


def test_route_follows_the_order() -> None:
    members = ["a", "b", "c", "d"]
    rec = {m: MemberRecord(i, NONE, 0) for i, m in enumerate(members)}
    plan = make_plan(1, members, rec, 4)
    swapped = lambda m: [0, 1, 2, 3] if m % 2 == 0 else [1, 0, 3, 2]  # noqa: E731
    assert route(plan, 0, 2, swapped) == [["a", "b", "c", "d"], ["b", "a", "d", "c"]]
    with pytest.raises(ValueError):
        route(plan, 0, 1, lambda m: [0, 0, 1, 2])
