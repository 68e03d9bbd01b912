"""Ring order from measured bandwidth.

A ring all-reduce runs at the speed of its slowest link, so the best order maximizes the minimum
(directed) link bandwidth around the ring — a bottleneck travelling-salesman problem. Exact for up to 8
members (permutations with the first member fixed); above that a greedy start plus 2-opt moves that raise
the bottleneck. Pure functions.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Optional, Sequence

Bandwidth = Mapping[tuple[str, str], float]  # (sender, receiver) -> bytes/s


def bottleneck(order: Sequence[str], bw: Bandwidth) -> Optional[float]:
    """Slowest directed link of the ring ``order``; None if a link was never measured."""
    if len(order) < 2:
        return None
    links = [bw.get((a, b)) for a, b in zip(order, [*order[1:], order[0]])]
    if any(x is None for x in links):
        return None
    return min(links)  # type: ignore[type-var]


def best_ring(members: Sequence[str], bw: Bandwidth, exact_up_to: int = 8) -> list[str]:
    """The order (starting with ``members[0]``) with the fastest slowest link; ties keep the given order."""
    members = list(members)
    if len(members) <= 2 or not _complete(members, bw):
        return members
    if len(members) <= exact_up_to:
        best, best_b = members, bottleneck(members, bw) or 0.0
        for rest in itertools.permutations(members[1:]):
            order = [members[0], *rest]
            b = bottleneck(order, bw)
            if b is not None and b > best_b:
                best, best_b = order, b
        return best
    return _two_opt(_greedy(members, bw), bw)


def _complete(members: Sequence[str], bw: Bandwidth) -> bool:
    return all((a, b) in bw for a in members for b in members if a != b)


def _greedy(members: list[str], bw: Bandwidth) -> list[str]:
    order, left = [members[0]], set(members[1:])
    while left:
        cur = order[-1]
        nxt = max(sorted(left), key=lambda m: bw.get((cur, m), 0.0))
        order.append(nxt)
        left.remove(nxt)
    return order


def _two_opt(order: list[str], bw: Bandwidth) -> list[str]:
    best_b = bottleneck(order, bw) or 0.0
    improved = True
    while improved:
        improved = False
        for i in range(1, len(order) - 1):
            for j in range(i + 1, len(order)):
                cand = order[:i] + order[i:j + 1][::-1] + order[j + 1:]
                b = bottleneck(cand, bw) or 0.0
                if b > best_b:
                    order, best_b, improved = cand, b, True
    return order
