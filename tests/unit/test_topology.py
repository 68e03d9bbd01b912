"""Ring order by measured bandwidth (pure)."""

from __future__ import annotations

import itertools
import random

import pytest

from collectives.topology import best_ring, bottleneck

pytestmark = pytest.mark.timeout(30)


def full(members: list[str], rate: float = 100.0) -> dict[tuple[str, str], float]:
    return {(a, b): rate for a in members for b in members if a != b}


def test_slow_pair_is_avoided() -> None:
    m = ["a", "b", "c", "d"]
    bw = full(m)
    bw[("a", "b")] = bw[("b", "a")] = 1.0  # the a<->b link is slow
    assert bottleneck(m, bw) == 1.0
    order = best_ring(m, bw)
    assert order[0] == "a" and bottleneck(order, bw) == 100.0


def test_exact_search_matches_brute_force_and_greedy_is_no_worse_than_given() -> None:
    rng = random.Random(1)
    for n in (4, 6, 7):
        m = [f"p{i}" for i in range(n)]
        bw = {(a, b): rng.uniform(1, 100) for a in m for b in m if a != b}
        got = bottleneck(best_ring(m, bw), bw)
        brute = max(bottleneck([m[0], *p], bw) or 0 for p in itertools.permutations(m[1:]))
        assert got == brute
    m = [f"p{i}" for i in range(12)]
    bw = {(a, b): rng.uniform(1, 100) for a in m for b in m if a != b}
    order = best_ring(m, bw)
    assert sorted(order) == sorted(m) and (bottleneck(order, bw) or 0) >= (bottleneck(m, bw) or 0)


def test_unmeasured_links_keep_the_given_order() -> None:
    m = ["a", "b", "c", "d"]
    bw = full(m)
    del bw[("c", "d")]
    assert best_ring(m, bw) == m and bottleneck(m, bw) is None
