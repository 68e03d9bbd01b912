"""Edge layers run by position, and the CheckFree+ copies of them kept on the neighbouring stage (issue 12).

A stage module may carry **edge layers**: ``edge_in`` (the embedding; only stage 0 may have one) and
``edge_out`` (final norm + head; only the last stage). Such a pipeline's stage modules also have ``body(x)``
(everything but the edge layers), and ``forward(x)`` is ``edge_out(body(edge_in(x)))`` on the stages that have
them. The runtime runs the edge layers by **position**, not by stage: position 0 runs ``edge_in`` first, the last
position runs ``edge_out`` last. Under the identity order that is exactly ``forward``. Under CheckFree+'s swapped
order (``recovery.checkfree.swapped_order``) another stage runs at those positions on odd micro-batches: the
**holder** of a copy of the layer (``recovery.checkfree.embedding_copies``: the owner's swap partner, else its
nearest stage) runs its copy there. Without edge layers (plain modules) nothing here does anything.

The copies, on every replica of the holder stage (``copy_every=K``; ``None``: 1 when the order needs them):

- **Refresh** at a step boundary, after the stage recovery, when ``committed % K == 0``, when the owner's or the
  holder's stage just got new members (a joiner, a mover, a rebuild), or when a holder reports (record flag
  ``COPY_STALE``) that its last refresh failed: the owner's and the holder's replicas run the shared-state sync
  (``recovery.shared_state.sync``: bounded, raw bytes, hash-verified per tensor). Owners vote with their
  committed revision; holders receive into a staging copy that replaces the live copy only when the whole sync
  succeeded, so a copy is always exactly the owner's committed weights at one refresh point. With K = 1 that
  point is the start of every step: a holder's forward on the swapped micro-batches uses the owner's current
  weights, and a copy is at most one committed step behind its owner when the owner is lost (zero when the
  owner dies mid-step, the usual case). With K > 1 the swapped micro-batches run on weights up to K-1 steps old.
- **Gradients.** The holder's copy gets gradients from the micro-batches it runs at the edge position; they are
  summed with the owner's replicas' (one all-reduce over owners and holders, instead of the owner stage's
  own all-reduce for those parameters) before the owner's norm, clipping and optimizer step: the edge layer
  trains on every micro-batch, as in one process. The holder never steps its copy. Only when the order does put
  a holder at an edge position (CheckFree+), never under the identity order.
- **Rebuild.** When the owner stage has lost every replica, the holder's replicas serve their copy and its
  revision with their blocks (``extra_for``; ``recovery.stage.fetch_neighbour``), and the rule assembles the
  lost stage from the partner's blocks plus the copy (``swap-copy``; ``NeighbourState.extra``).

Extra memory per holder: the copy, its gradient buffer while the order needs it, and during a refresh a staging
copy (freed after). Bytes: a refresh moves the edge layer's bytes once to each holder (only tensors whose hash
differs), plus headers and hashes; ``stats`` counts what was measured.
"""

from __future__ import annotations

import copy as _copy
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from collectives.errors import DeadlineExceeded, LocalError, OpAborted
from peer.train.pipeline_plan import NONE, Order, StepPlan
from recovery.checkfree import embedding_copies
from recovery.shared_state import SharedState, sync

log = logging.getLogger(__name__)

EDGE_IN, EDGE_OUT = "edge_in", "edge_out"
LAYER = {EDGE_IN: "embedding", EDGE_OUT: "head"}     # embedding_copies' words
COPY_STALE = 0x1                                     # MemberRecord flag: my last refresh of a copy failed


def nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass
class Edge:
    """One edge layer, its owner stage, the stage holding its copy, and this peer's copy of it."""
    attr: str                    # EDGE_IN or EDGE_OUT
    owner: int
    holder: int
    copy: torch.nn.Module        # the copy's live weights (used when this peer serves ``holder``)
    needs_grad: bool             # the order runs ``holder`` at this layer's position in some micro-batch
    rev: int = NONE              # committed steps of the owner's weights the live copy holds
    stale: bool = False          # a refresh started and did not finish

    def names(self) -> list[str]:
        """The copy's parameter names as the owner's stage module names them (``edge_in.tok.weight``)."""
        return [f"{self.attr}.{n}" for n, _ in self.copy.named_parameters()]


class Edges:
    """The edge layers of a pipeline's stages, their copies and what they cost (see the module docstring)."""

    def __init__(self, stages: Sequence[torch.nn.Module], order: Order, micro_batches: int,
                 every: Optional[int]) -> None:
        self.stages, self.S = list(stages), len(stages)
        self.found: dict[str, int] = {}              # attr -> owner stage
        for s, mod in enumerate(self.stages):
            for attr, where in ((EDGE_IN, 0), (EDGE_OUT, self.S - 1)):
                layer = getattr(mod, attr, None)
                if layer is None:
                    continue
                if not isinstance(layer, torch.nn.Module):
                    raise LocalError(f"stage {s}: {attr} must be an nn.Module or None")
                if s != where:
                    raise LocalError(f"stage {s} has an {attr} layer: only stage {where} may")
                self.found[attr] = s
        for s, mod in enumerate(self.stages):
            if self.found and not callable(getattr(mod, "body", None)):
                raise LocalError(f"stage {s}: a pipeline with edge layers needs body(x) on every stage")
        span = range(max(micro_batches, 2))
        moved = {EDGE_IN: any(list(order(m))[0] != 0 for m in span),
                 EDGE_OUT: any(list(order(m))[-1] != self.S - 1 for m in span)}
        if every is None:
            every = 1 if any(moved[a] for a in self.found) else 0
        if every < 0:
            raise LocalError(f"copy_every must be >= 0, got {every}")
        self.every = every
        self.edges: list[Edge] = []
        self.expected: dict[int, int] = {}
        if every and self.found and self.S > 1:
            size = {a: nbytes(getattr(self.stages[s], a)) for a, s in self.found.items()}
            plan = embedding_copies(self.S, size.get(EDGE_IN, 0), size.get(EDGE_OUT, 0))
            for attr in (EDGE_IN, EDGE_OUT):
                if attr not in self.found:
                    continue
                holder = next(h for h, words in plan.holders.items() if LAYER[attr] in words)
                owner = self.found[attr]
                layer = getattr(self.stages[owner], attr)
                self.edges.append(Edge(attr, owner, holder, _copy.deepcopy(layer), moved[attr]))
                self.expected[holder] = self.expected.get(holder, 0) + size[attr]
        for m in span:                                   # refuse an order this pipeline cannot run
            o = list(order(m))
            for attr, stage in ((EDGE_IN, o[0]), (EDGE_OUT, o[-1])):
                if attr in self.found:
                    self.layer(attr, stage)
        self.refreshes = self.refresh_bytes_received = self.last_refresh_bytes = 0
        self.served = self.refresh_bytes_sent = self.grad_bytes_sent = self.grad_reduces = 0
        self.refresh_s = 0.0

    @property
    def active(self) -> bool:
        return bool(self.found)

    # ------------------------------------------------------------------ compute
    def layer(self, attr: str, stage: int) -> torch.nn.Module:
        """The ``attr`` layer that ``stage``'s peer runs at that layer's position: its own, or its copy."""
        owner = self.found[attr]
        if stage == owner:
            layer: torch.nn.Module = getattr(self.stages[owner], attr)
            return layer
        for e in self.edges:
            if e.attr == attr and e.holder == stage:
                return e.copy
        raise LocalError(f"the order runs stage {stage} at the {LAYER[attr]}'s position, but stage {stage} "
                         f"holds no copy of it (copy_every={self.every}; copies go to "
                         f"{[e.holder for e in self.edges if e.attr == attr]})")

    def forward(self, stage: int, pos: int, x: torch.Tensor) -> torch.Tensor:
        """Stage ``stage`` run at position ``pos``: the edge layers by position, the body by stage."""
        module = self.stages[stage]
        if not self.found:
            out: torch.Tensor = module(x)
            return out
        if pos == 0 and EDGE_IN in self.found:
            x = self.layer(EDGE_IN, stage)(x)
        body: Callable[[torch.Tensor], torch.Tensor] = getattr(module, "body")
        x = body(x)
        if pos == self.S - 1 and EDGE_OUT in self.found:
            x = self.layer(EDGE_OUT, stage)(x)
        return x

    def train(self, mode: bool) -> None:
        for e in self.edges:
            e.copy.train(mode)

    def zero_grad(self) -> None:
        for e in self.edges:
            for p in e.copy.parameters():
                p.grad = None

    def summed(self, stage: int) -> set[int]:
        """ids of ``stage``'s parameters whose gradients ``reduce_grads`` sums (not the stage all-reduce)."""
        return {id(p) for e in self.edges if e.needs_grad and e.owner == stage
                for p in getattr(self.stages[stage], e.attr).parameters()}

    def reduce_grads(self, comm: Any, plan: StepPlan, me: str, timeout: float, errors: list[str],
                     sent: Callable[[], int]) -> None:
        """Sum each edge layer's gradient over its owner's and its holder's replicas (always issued by every
        member of those stages, even after a failure: lockstep). Failures land in ``errors``."""
        mine = plan.assignment[me]
        for e in self.edges:
            group = [m for m in plan.members if plan.assignment[m] in (e.owner, e.holder)]
            if not e.needs_grad or me not in group:
                continue
            layer = getattr(self.stages[e.owner], e.attr) if mine == e.owner else e.copy
            params = list(layer.parameters())
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            b0 = sent()
            try:
                comm.group(group).all_reduce_multiple([p.grad for p in params], op="sum", timeout=timeout)
            except (OpAborted, DeadlineExceeded, LocalError) as exc:
                errors.append(f"{type(exc).__name__}: {LAYER[e.attr]} gradient all-reduce: {exc}")
            self.grad_bytes_sent += sent() - b0
            self.grad_reduces += 1

    # ------------------------------------------------------------------ copies
    def flags(self, stage: int) -> int:
        return COPY_STALE if any(e.stale and e.holder == stage for e in self.edges) else 0

    def refresh(self, comm: Any, plan: StepPlan, me: str, timeout: float, sent: Callable[[], int]
                ) -> list[dict[str, Any]]:
        """At a step boundary after the recovery (the same decision on every member, from the plan)."""
        committed = max(plan.committed, 0)
        stale = any(f & COPY_STALE for f in plan.flags.values())
        mine = plan.assignment[me]
        notes: list[dict[str, Any]] = []
        for e in self.edges:
            due = committed % self.every == 0 or stale or e.owner in plan.needy or e.holder in plan.needy
            group = [m for m in plan.members if plan.assignment[m] in (e.owner, e.holder)]
            if not due or me not in group:
                continue
            t0, b0 = time.monotonic(), sent()
            if mine == e.owner:
                st = SharedState({n: p.data for n, p in getattr(self.stages[e.owner], e.attr).named_parameters()},
                                 committed)
                st.last_synced = committed
                sync(comm.group(group), st, "enforce_popular", timeout=timeout)
                self.served += 1
                self.refresh_bytes_sent += sent() - b0
                continue
            live = dict(e.copy.named_parameters())
            staging = {n: p.detach().clone() for n, p in live.items()}   # only changed tensors move
            st = SharedState(staging, -1)
            e.stale = True
            res = sync(comm.group(group), st, "receive_only", timeout=timeout)
            with torch.no_grad():
                for n, p in live.items():
                    p.copy_(staging[n])
            e.rev, e.stale = committed, False
            self.refreshes += 1
            self.refresh_bytes_received += res.bytes_received
            self.last_refresh_bytes = res.bytes_received
            self.refresh_s += time.monotonic() - t0
            notes.append({"stage": mine, "how": f"copy refresh:{LAYER[e.attr]}", "owner": e.owner,
                          "step": plan.committed, "bytes": res.bytes_received, "fetched": len(res.fetched),
                          "seconds": time.monotonic() - t0})
        return notes

    def held_by(self, stage: int) -> list[Edge]:
        return [e for e in self.edges if e.holder == stage]

    def extra_for(self, stage: int, source: bool) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """What ``stage``'s replicas serve with their blocks for a rebuild: the copies they hold (named as in
        the owner's stage module) and their revisions. Receivers get scratch buffers of the same names."""
        held = self.held_by(stage)
        arrays: dict[str, torch.Tensor] = {}
        for e in held:
            for name, p in zip(e.names(), e.copy.parameters()):
                arrays[name] = p.data if source else torch.zeros_like(p.data)
        revs = np.array([e.rev if source else np.nan for e in held], np.float64)
        return arrays, revs

    def stats(self, stage: int) -> dict[str, Any]:
        """What the copies cost this peer, measured (bytes on the wire from the swarm's counters)."""
        held = [e for e in self.edges if e.holder == stage]
        mem = sum(nbytes(e.copy) for e in held)
        return {
            "every": self.every,
            "edges": [{"layer": LAYER[e.attr], "owner": e.owner, "holder": e.holder, "bytes": nbytes(e.copy),
                       "rev": e.rev, "grad_summed": e.needs_grad} for e in self.edges],
            "expected_extra_bytes": {str(k): v for k, v in self.expected.items()},
            "held_bytes": mem,
            "grad_buffer_bytes": sum(nbytes(e.copy) for e in held if e.needs_grad),
            "staging_peak_bytes": mem,
            "refreshes": self.refreshes,
            "refresh_bytes_received": self.refresh_bytes_received,
            "last_refresh_bytes_received": self.last_refresh_bytes,
            "refresh_seconds": round(self.refresh_s, 4),
            "refreshes_served": self.served,
            "refresh_bytes_sent": self.refresh_bytes_sent,
            "edge_grad_reduces": self.grad_reduces,
            "edge_grad_bytes_sent": self.grad_bytes_sent,
        }


__all__ = ["COPY_STALE", "EDGE_IN", "EDGE_OUT", "Edge", "Edges", "LAYER", "nbytes"]
