"""CheckFree+ in the pipeline runtime, on in-process peers: edge layers run by position, the (de)embedding
copies on the swap partners (refreshed every committed step, gradients summed with the owner's), and a lost
first stage rebuilt by copying its swap partner's blocks plus the embedding copy."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn as nn

from peer import Swarm
from peer.train.pipeline import Pipeline, StepRecord, weights_digest
from peer.train.pipeline_copies import Edges
from recovery.checkfree import CheckFree, swapped_order
from recovery.rebuild import NeighbourState
from recovery.stage import neighbour_state
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_pipeline_faults import Died, crash_at, later, wait_pending

pytestmark = pytest.mark.timeout(90)

V, D, B, T, M, LR = 11, 6, 3, 4, 2, 0.02


class EdgeStage(nn.Module):
    """A tiny stage with edge layers: an embedding on stage 0, a head on the last; a tanh-linear body."""

    def __init__(self, first: bool, last: bool, g: torch.Generator) -> None:
        super().__init__()
        self.edge_in: Optional[nn.Module] = nn.Embedding(V, D) if first else None
        self.lin = nn.Linear(D, D)
        self.edge_out: Optional[nn.Module] = nn.Linear(D, V) if last else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.edge_in is not None:
            x = self.edge_in(x)
        x = self.body(x)
        return self.edge_out(x) if self.edge_out is not None else x


def edge_stages(n: int, seed: int = 0) -> list[EdgeStage]:
    g = torch.Generator().manual_seed(seed)
    return [EdgeStage(i == 0, i == n - 1, g) for i in range(n)]


def tokens(step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5_000 + 31 * step + m)
    x = torch.randint(0, V, (B, T), generator=g)
    return x, (x + 1) % V


def make_opt(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=LR)


def plus_order(n: int) -> Callable[[int], list[int]]:
    return lambda m: swapped_order(n, m)


def reference(steps: int, n: int) -> tuple[list[EdgeStage], list[float], list[dict[str, torch.Tensor]]]:
    """One process, the swapped order, the edge layers by position; the embedding after every step."""
    stages = edge_stages(n)
    opts = [make_opt(list(s.parameters())) for s in stages]
    losses, embeds = [], []
    first, last = stages[0], stages[-1]
    assert first.edge_in is not None and last.edge_out is not None
    for step in range(steps):
        total = 0.0
        for m in range(M):
            x, y = tokens(step, m)
            for pos, k in enumerate(swapped_order(n, m)):
                if pos == 0:
                    x = first.edge_in(x)
                x = stages[k].body(x)
                if pos == n - 1:
                    x = last.edge_out(x)
            loss = nn.functional.cross_entropy(x.reshape(-1, V), y.reshape(-1))
            (loss / M).backward()
            total += float(loss.detach())
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(total / M)
        embeds.append({n_: p.detach().clone() for n_, p in first.edge_in.named_parameters()})
    return stages, losses, embeds


def pipeline(swarm: Swarm, n: int, **kw: Any) -> Pipeline:
    kw.setdefault("op_timeout", 15.0)
    return Pipeline(swarm, edge_stages(n), make_opt, micro_batches=M, example=tokens(0, 0), order=plus_order(n),
                    **kw)


def train(swarm: Swarm, steps: int, n: int, **kw: Any) -> Pipeline:
    pipe = pipeline(swarm, n, **kw)
    while pipe.committed < steps:
        pipe.step(tokens)
    return pipe


def test_edges_refuse_an_order_without_copies() -> None:
    stages = edge_stages(2)
    assert Edges(stages, lambda m: [0, 1], M, None).edges == []        # identity order: no copies needed
    auto = Edges(stages, plus_order(2), M, None)
    assert auto.every == 1 and [(e.owner, e.holder) for e in auto.edges] == [(0, 1), (1, 0)]
    assert all(e.needs_grad for e in auto.edges)
    with pytest.raises(Exception, match="holds no copy"):
        Edges(stages, plus_order(2), M, 0)


def test_swapped_order_equals_single_process_reference(inproc: InProcess) -> None:
    """2 stages x 1 replica, CheckFree+ order: the holders run their copies at the edge positions and their
    gradients are summed with the owner's, so the weights equal the one-process reference bit for bit; the
    embedding copy on stage 1 is exactly stage 0's embedding at the last refresh (the last step's start)."""
    _, peers = form_swarm(inproc, 2)
    steps = 3
    pipes = run_all([partial(train, p, steps, 2, stage=i) for i, p in enumerate(peers)], timeout=80)
    assert all(isinstance(p, Pipeline) for p in pipes), pipes
    ref, ref_losses, embeds = reference(steps, 2)
    for p in pipes:
        for a, b in zip(p.stages[p.stage].parameters(), ref[p.stage].parameters()):
            assert torch.equal(a, b)
        assert [r.loss for r in p.history if r.committed] == pytest.approx(ref_losses, rel=1e-12)
    holder = next(p for p in pipes if p.stage == 1)
    emb = next(e for e in holder.edges.edges if e.holder == 1)
    assert emb.rev == steps - 1
    for (name, c), (_, r) in zip(emb.copy.named_parameters(), embeds[steps - 2].items()):
        assert torch.equal(c, r), name
    st = holder.copy_stats()
    edge_bytes = sum(p.numel() * 4 for p in emb.copy.parameters())
    assert st["held_bytes"] == edge_bytes and st["refreshes"] == steps
    assert st["last_refresh_bytes_received"] == edge_bytes        # every tensor changed in a step
    assert st["edge_grad_reduces"] == 2 * steps and st["edge_grad_bytes_sent"] > 0


def test_first_stage_lost_rebuilt_by_swap_copy(inproc: InProcess) -> None:
    """The only replica of stage 0 (the embedding's owner) dies mid-step while a joiner waits: the joiner
    takes stage 0, rebuilt as stage 1's blocks plus stage 1's embedding copy, bit for bit what the pure rule
    gives from what stage 1 held (checked against the owner's last committed embedding); training goes on."""
    coord, peers = form_swarm(inproc, 2)
    p0, p1 = peers
    entry = coord.addr.removeprefix("tcp://")
    joiner: dict[str, Swarm] = {}
    live: dict[str, Pipeline] = {}
    snap: dict[str, Any] = {}
    rule = CheckFree(plus=True)

    def spawn() -> None:
        joiner["j"] = inproc.peer("j", [entry])
        wait_pending(coord, "j")

    def member(s: Swarm, stage: int, out: Any = None) -> Callable[[], Pipeline]:
        def on_step(r: StepRecord) -> None:
            pipe = live[s.id]
            if r.committed and r.step == 1 and pipe.stage == 0:   # the owner's last commit before it dies
                snap["embed"] = {f"edge_in.{n}": p.detach().numpy().copy()
                                 for n, p in pipe.stages[0].edge_in.named_parameters()}
            if not r.committed and r.step == 2 and pipe.stage == 1 and "nb" not in snap:
                arrays, _ = pipe.edges.extra_for(1, True)
                snap["nb"] = neighbour_state(1, pipe.stages[1], pipe.norms, True, extra=arrays)

        def go() -> Pipeline:
            pipe = pipeline(s, 2, stage=stage, rebuild=rule, on_step=on_step)
            live[s.id] = pipe
            if out is not None:
                out.state["pipe"] = pipe
                pipe.outgoing = out
            while pipe.committed < 5:
                pipe.step(tokens)
            return pipe
        return go

    joined = later(joiner, lambda j: lambda: train(j, 5, 2, rebuild=rule))
    res = run_all([member(p0, 0, crash_at(inproc, p0, 2, spawn)), member(p1, 1), joined], timeout=80)
    assert isinstance(res[0], Died)
    jp, p1p = res[2], res[1]
    assert isinstance(jp, Pipeline) and isinstance(p1p, Pipeline), res
    assert jp.stage == 0 and jp.committed == 5 and p1p.committed == 5
    rec = [r for r in jp.recoveries if r["stage"] == 0 and r["how"].startswith("rebuild")]
    assert rec and rec[0]["how"] == "rebuild:swap-copy" and rec[0]["joiners"] == ["j"], rec
    assert rec[0]["copy_revs"] == {"embedding": 2}
    nb: NeighbourState = snap["nb"]
    assert weights_digest(nb.extra) == weights_digest(snap["embed"])   # the copy is the owner's last commit
    used = jp.rebuilds[0]["neighbours"][1]
    assert weights_digest(used.weights) == weights_digest(nb.weights)
    assert weights_digest(used.extra) == weights_digest(nb.extra)
    shapes = {n: tuple(p.shape) for n, p in edge_stages(2)[0].named_parameters()}
    expect = rule.rebuild(0, 2, shapes, {1: nb})
    assert expect.how == "swap-copy" and jp.rebuilt_digest == weights_digest(expect.weights)
    assert np.array_equal(expect.weights["lin.weight"], nb.weights["lin.weight"])
    assert jp.meta[0] == pytest.approx(1.1)
    # the head copy that stage 0 holds was refreshed on the new member (the last step's boundary: rev 4)
    head = next(e for e in jp.edges.edges if e.holder == 0)
    assert head.rev == 4 and not head.stale


def test_copies_refreshed_every_k_steps(inproc: InProcess) -> None:
    """``copy_every=2``: the copies move only at boundaries where the committed count is even (between them
    the holder runs the swapped micro-batches on the older copy; every step still commits), and the copy is
    exactly the owner's embedding after the commit of its refresh point."""
    _, peers = form_swarm(inproc, 2)
    steps = 5
    after: dict[int, dict[str, torch.Tensor]] = {}       # committed steps -> the owner's embedding
    live: dict[str, Pipeline] = {}

    def on_step(r: StepRecord) -> None:
        pipe = live["p0"]
        if r.committed:
            assert pipe.stages[0].edge_in is not None
            after[pipe.committed] = {n: p.detach().clone() for n, p in pipe.stages[0].edge_in.named_parameters()}

    def owner() -> Pipeline:
        live["p0"] = pipe = pipeline(peers[0], 2, stage=0, copy_every=2, on_step=on_step)
        while pipe.committed < steps:
            pipe.step(tokens)
        return pipe

    pipes = run_all([owner, partial(train, peers[1], steps, 2, stage=1, copy_every=2)], timeout=80)
    assert all(isinstance(p, Pipeline) for p in pipes), pipes
    holder = pipes[1]
    emb = next(e for e in holder.edges.edges if e.holder == 1)
    st = holder.copy_stats()
    assert st["every"] == 2 and emb.rev == 4 and st["refreshes"] == 3      # at committed 0, 2, 4
    assert [r.step for r in pipes[0].history if r.committed] == list(range(steps))
    for n, c in emb.copy.named_parameters():
        assert torch.equal(c, after[4][n]) and not torch.equal(c, after[5][n]), n
