"""Who owns which expert, and who sends it: pure, deterministic functions of a member list. No I/O.

Ownership (``owners``): in every MoE layer each expert gets ``r' = min(r, N)`` owners among the N members, by
rendezvous (highest-random-weight) hashing with bounded loads:

- every (layer, expert, peer) has a score, a hash of the three; an expert prefers peers by descending score;
- experts are placed one owner slot at a time, the expert with the strongest remaining preference first
  (a global order of (score, expert, peer) candidates), each taking its best-scored peer that is not full;
- a peer is full at ``ceil(E r' / N)`` owned experts in that layer, and only ``E r' mod N`` peers may reach
  the ceiling when N does not divide ``E r'`` (so every peer owns ``floor`` or ``ceil`` of ``E r' / N``).

Every member computes the same map from the same member list (the order of the list does not matter).
Because each candidate's score depends only on (layer, expert, peer), a leave or join changes the pick of
few experts: the leaver's own slots move, and a few others where a load bound now binds differently
(tests/unit/test_experts_own.py measures the bound with property tests).

Senders (``senders``): after the owners' average, each expert's averaged bytes are delivered to every member
by one all-gather in which every member contributes the experts it is the designated sender for; the
designated sender is one of the expert's contributors, chosen to balance the bytes each member contributes
(so the all-gather's blocks, padded to the largest, waste little).
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

from collectives.errors import LocalError

Expert = tuple[int, int]  # (layer, expert index)


def score(layer: int, expert: int, peer: str) -> int:
    """The rendezvous score of ``peer`` for one expert (64 bits, the same on every machine)."""
    h = hashlib.blake2b(f"{layer}/{expert}/{peer}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


def owners(members: Sequence[str], layers: int, experts: int, r: int) -> dict[Expert, tuple[str, ...]]:
    """(layer, expert) -> its owners (sorted by peer id) for every expert of every layer."""
    if r < 1:
        raise LocalError("owners_per_expert must be at least 1")
    peers = sorted(set(members))
    if not peers:
        raise LocalError("no members")
    if len(peers) != len(members):
        raise LocalError("duplicate member ids")
    out: dict[Expert, tuple[str, ...]] = {}
    for layer in range(layers):
        out.update(layer_owners(peers, layer, experts, r))
    return out


def layer_owners(peers: Sequence[str], layer: int, experts: int, r: int) -> dict[Expert, tuple[str, ...]]:
    n = len(peers)
    rr = min(r, n)
    floor, extra = divmod(experts * rr, n)    # `extra` peers own floor + 1 experts, the others floor
    load = {p: 0 for p in peers}
    at_cap = 0
    chosen: dict[int, list[str]] = {e: [] for e in range(experts)}

    def room(p: str) -> bool:
        return load[p] < floor or (load[p] == floor and at_cap < extra)

    def bump(p: str) -> None:
        nonlocal at_cap
        load[p] += 1
        at_cap += load[p] == floor + 1

    def repair(e: int) -> None:
        """``e`` lacks an owner and every peer with room already owns it: an expert ``f`` owned by some
        ``q`` (not an owner of ``e``) and not by the peer with room ``p`` takes ``p`` instead of ``q``, and
        ``e`` takes ``q`` (p +1, q unchanged). Deterministic order."""
        for p in [p for p in peers if room(p)]:
            for f in range(experts):
                if f == e or p in chosen[f]:
                    continue
                for q in sorted(chosen[f]):
                    if q not in chosen[e]:
                        chosen[f][chosen[f].index(q)] = p
                        chosen[e].append(q)
                        bump(p)
                        return
        raise LocalError("ownership placement failed")  # impossible with floor/extra bounds

    cands = sorted(((score(layer, e, p), e, p) for e in range(experts) for p in peers), reverse=True)
    # Passes over the global candidate order: each pass gives every expert at most one more owner (its
    # best-scored peer with room), so strong preferences are served first and no expert starves.
    for _ in range(rr):
        served: set[int] = set()
        for _, e, p in cands:
            if e not in served and len(chosen[e]) < rr and p not in chosen[e] and room(p):
                chosen[e].append(p)
                bump(p)
                served.add(e)
        for e in range(experts):
            if e not in served and len(chosen[e]) < rr:
                repair(e)
    return {(layer, e): tuple(sorted(ps)) for e, ps in chosen.items()}


def owned_by(table: Mapping[Expert, tuple[str, ...]], peer: str) -> set[Expert]:
    return {x for x, ps in table.items() if peer in ps}


def moved(before: Mapping[Expert, tuple[str, ...]], after: Mapping[Expert, tuple[str, ...]],
          layer: int) -> int:
    """How many experts of ``layer`` gained an owner they did not have (each must fetch optimizer state
    afresh there): the churn cost of a membership change."""
    return sum(1 for (lay, e), ps in after.items()
               if lay == layer and set(ps) - set(before.get((lay, e), ())))


def senders(contributors: Mapping[Expert, Sequence[str]], sizes: Mapping[Expert, int],
            ring: Sequence[str]) -> dict[Expert, str]:
    """For every expert with at least one contributor, the contributor that sends its averaged bytes to
    everyone: in (layer, expert) order, the contributor with the fewest bytes assigned so far (ties: ring
    order). ``sizes``: bytes per expert."""
    assigned = {m: 0 for m in ring}
    out: dict[Expert, str] = {}
    for x in sorted(contributors):
        cs = list(contributors[x])
        if not cs:
            continue
        best = min(cs, key=lambda m: (assigned[m], ring.index(m)))
        out[x] = best
        assigned[best] += sizes[x]
    return out
