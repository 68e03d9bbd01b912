"""The ownership rule (deterministic, balanced, stable under one join or leave) and the sender plan."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from peer.train.experts_own import moved, owned_by, owners, senders

peer_ids = st.lists(st.text("abcdefghij0123456789-", min_size=1, max_size=8), min_size=1, max_size=9,
                    unique=True)
shape = st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 8, 16]), st.integers(1, 3))  # layers, E, r


@settings(max_examples=60, deadline=None)
@given(peer_ids, shape, st.randoms(use_true_random=False))
def test_deterministic_whatever_the_member_order(peers: list[str], sh: tuple[int, int, int], rnd: object) -> None:
    layers, E, r = sh
    shuffled = list(peers)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assert owners(peers, layers, E, r) == owners(shuffled, layers, E, r)


@settings(max_examples=60, deadline=None)
@given(peer_ids, shape)
def test_balanced_with_r_distinct_owners(peers: list[str], sh: tuple[int, int, int]) -> None:
    layers, E, r = sh
    table = owners(peers, layers, E, r)
    rr = min(r, len(peers))
    assert set(table) == {(lay, e) for lay in range(layers) for e in range(E)}
    for ps in table.values():
        assert len(ps) == len(set(ps)) == rr and set(ps) <= set(peers)
    for lay in range(layers):
        loads = [sum(1 for (la, _), ps in table.items() if la == lay and p in ps) for p in peers]
        assert max(loads) - min(loads) <= 1                       # each owns floor or ceil of E r' / N
        assert sum(loads) == E * rr
        assert max(loads) == math.ceil(E * rr / len(peers))


def _unavoidable(E: int, r: int, n: int) -> int:
    """The slots that must move when one of ``n`` peers leaves (or a joiner makes it ``n``): about E r / N."""
    return math.ceil(E * min(r, n) / n)


@settings(max_examples=80, deadline=None)
@given(peer_ids, shape, st.integers(0, 8))
def test_one_leave_or_join_moves_about_e_r_over_n(peers: list[str], sh: tuple[int, int, int], k: int) -> None:
    """A single membership change moves at most 2 ceil(E r'/N) + 3 experts per layer: the measured worst case
    over 3000 random shapes (N 1..9, E 2..16, r 1..3); 69 % of changes move no more than the unavoidable."""
    layers, E, r = sh
    before = owners(peers, layers, E, r)
    joiner = "_new"                                   # not in the alphabet of peer_ids
    after = owners(peers + [joiner], layers, E, r)
    for lay in range(layers):
        assert moved(before, after, lay) <= 2 * _unavoidable(E, r, len(peers) + 1) + 3
        assert sum(1 for x in owned_by(after, joiner) if x[0] == lay) <= moved(before, after, lay)
    if len(peers) > 1:
        leaver = peers[k % len(peers)]
        after = owners([p for p in peers if p != leaver], layers, E, r)
        for lay in range(layers):
            assert moved(before, after, lay) <= 2 * _unavoidable(E, r, len(peers)) + 3
        assert all(leaver not in ps for ps in after.values())


def test_a_leave_reassigns_only_what_it_must_in_a_typical_case() -> None:
    peers = ["p0", "p1", "p2", "p3"]
    before = owners(peers, 1, 8, 2)
    after = owners(peers[:3], 1, 8, 2)
    orphaned_slots = sum(1 for ps in before.values() if "p3" in ps)
    assert orphaned_slots == 4 and moved(before, after, 0) <= 2 * orphaned_slots
    # with r = 2 every expert the leaver held still has a surviving co-owner
    assert all(set(ps) - {"p3"} & set(after[x]) for x, ps in before.items())


def test_senders_balance_bytes_among_contributors() -> None:
    ring = ["a", "b", "c"]
    contrib = {(0, e): ["a", "b"] if e % 2 else ["c"] for e in range(6)}
    contrib[(0, 6)] = []
    plan = senders(contrib, {x: 10 for x in contrib}, ring)
    assert (0, 6) not in plan
    assert all(plan[x] in contrib[x] for x in plan)
    per = {m: sum(1 for v in plan.values() if v == m) for m in ring}
    assert per == {"a": 2, "b": 1, "c": 3}
