"""Pure planning for the pipeline runtime: which peer serves which stage, who needs a stage's state, and
which replica runs each micro-batch. No I/O: every member computes the same plan from the same gathered facts.

At each step boundary every member all-gathers a small record (the stage it holds, the stage it asks for,
the number of committed steps its state reflects). From that record, in the epoch's ring order:

- ``assign_stages``: members keep their stage; a newcomer takes the stage it asked for, else the stage with
  the fewest replicas (lowest index on ties); a stage left empty is then filled by moving one replica of the
  most-replicated stage (the last one in ring order). Only empty stages cause moves, one move each.
- ``make_plan``: per stage, its replicas, the up-to-date holders (``sources``), the members that need its
  state (``needy``: newcomers, movers, members behind), and the stages with needy members but no source
  (``lost``: rebuild them or stop).
- ``route``: micro-batch m runs position p on ``replicas[order(m)[p]][(m + step) % k]``: every stage's
  micro-batches are spread evenly over its replicas, rotating with the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from collectives.errors import SwarmError

NONE = -1            # "no stage" / "no request" / "no state" in the gathered record
RECORD_WORDS = 4     # held stage, requested stage, committed steps (-1: no state), flags

Order = Callable[[int], Sequence[int]]


class NotEnoughPeers(SwarmError):
    """Fewer members than stages: no assignment can serve every stage."""


def identity_order(num_stages: int) -> Order:
    stages = tuple(range(num_stages))
    return lambda m: stages


def assign_stages(members: Sequence[str], previous: Mapping[str, int], requests: Mapping[str, int],
                  num_stages: int) -> dict[str, int]:
    """{member: stage} for the members in ring order. ``previous``: the stage each member held (absent or
    NONE: none); ``requests``: stages asked for (honoured for newcomers). Deterministic; raises
    ``NotEnoughPeers`` when some stage cannot be served."""
    if len(members) < num_stages:
        raise NotEnoughPeers(f"{len(members)} members cannot serve {num_stages} stages")
    out: dict[str, int] = {}
    counts = [0] * num_stages
    for m in members:
        s = previous.get(m, NONE)
        if 0 <= s < num_stages:
            out[m] = s
            counts[s] += 1
    newcomers = [m for m in members if m not in out]
    for m in newcomers:                       # requests first, so that the free choices fill around them
        r = requests.get(m, NONE)
        if 0 <= r < num_stages:
            out[m] = r
            counts[r] += 1
    for m in newcomers:
        if m not in out:
            s = min(range(num_stages), key=lambda k: (counts[k], k))
            out[m] = s
            counts[s] += 1
    for empty in range(num_stages):
        if counts[empty]:
            continue
        donor = max(range(num_stages), key=lambda k: (counts[k], -k))   # most replicas; lowest index on ties
        mover = [m for m in members if out[m] == donor][-1]
        out[mover] = empty
        counts[donor] -= 1
        counts[empty] += 1
    return out


@dataclass(frozen=True)
class MemberRecord:
    """What one member contributes to the plan (gathered as RECORD_WORDS int64 words)."""
    held: int = NONE
    request: int = NONE
    committed: int = NONE
    flags: int = 0

    def encode(self) -> np.ndarray:
        return np.array([self.held, self.request, self.committed, self.flags], np.int64)

    @classmethod
    def decode(cls, words: np.ndarray, num_stages: int) -> "MemberRecord":
        """Bounded: out-of-range stages read as NONE (a peer's words are not trusted to index anything)."""
        held, request, committed, flags = (int(w) for w in words[:RECORD_WORDS])
        ok = lambda s: s if 0 <= s < num_stages else NONE  # noqa: E731
        return cls(ok(held), ok(request), max(NONE, committed), flags & 0xFF)


@dataclass
class StepPlan:
    epoch: int
    members: list[str]
    num_stages: int
    assignment: dict[str, int]
    replicas: list[list[str]]                  # per stage, ring order
    committed: int                             # the swarm's committed steps (NONE: no one holds state yet)
    sources: dict[int, list[str]] = field(default_factory=dict)   # up-to-date holders, per stage
    needy: dict[int, list[str]] = field(default_factory=dict)     # members that need the stage's state
    lost: list[int] = field(default_factory=list)                 # needy stages without any source
    moves: list[tuple[str, int, int]] = field(default_factory=list)  # (member, from, to)
    flags: dict[str, int] = field(default_factory=dict)           # each member's record flags

    @property
    def fresh(self) -> bool:
        """Nobody holds any state yet: each stage's members agree on one initial copy."""
        return self.committed == NONE

    def stage_of(self, peer: str) -> int:
        return self.assignment[peer]

    def leader(self, stage: int) -> str:
        return self.replicas[stage][0]


def make_plan(epoch: int, members: Sequence[str], records: Mapping[str, MemberRecord],
              num_stages: int) -> StepPlan:
    previous = {m: r.held for m, r in records.items()}
    requests = {m: r.request for m, r in records.items()}
    assignment = assign_stages(members, previous, requests, num_stages)
    replicas: list[list[str]] = [[] for _ in range(num_stages)]
    for m in members:
        replicas[assignment[m]].append(m)
    committed = max((records[m].committed for m in members if m in records), default=NONE)
    plan = StepPlan(epoch, list(members), num_stages, assignment, replicas, committed,
                    flags={m: records[m].flags for m in members if m in records})
    for s in range(num_stages):
        if plan.fresh:
            plan.sources[s] = list(replicas[s])
            continue
        src = [m for m in replicas[s] if records[m].held == s and records[m].committed == committed]
        need = [m for m in replicas[s] if m not in src]
        plan.sources[s] = src
        if need:
            plan.needy[s] = need
            if not src:
                plan.lost.append(s)
    for m in members:
        held = records[m].held if m in records else NONE
        if held != NONE and held != assignment[m]:
            plan.moves.append((m, held, assignment[m]))
    return plan


def route(plan: StepPlan, step: int, micro_batches: int, order: Optional[Order] = None) -> list[list[str]]:
    """For each micro-batch, the peer that runs each position (position p runs stage order(m)[p])."""
    order = order or identity_order(plan.num_stages)
    out = []
    for m in range(micro_batches):
        stages = list(order(m))
        if sorted(stages) != list(range(plan.num_stages)):
            raise ValueError(f"order({m}) = {stages} is not a permutation of the stages")
        out.append([plan.replicas[s][(m + step) % len(plan.replicas[s])] for s in stages])
    return out


def micro_batch_counts(plan: StepPlan, routes: Sequence[Sequence[str]]) -> dict[str, int]:
    """How many micro-batches each member processes (for its stage) this step."""
    counts = {m: 0 for m in plan.members}
    for r in routes:
        for peer in r:
            counts[peer] += 1
    return counts
