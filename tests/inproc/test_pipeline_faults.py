"""Pipeline faults on in-process peers: a replica lost mid-step, each branch of the stage recovery order,
a joiner during training, garbage activations from a peer."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from peer import Swarm
from peer.train.pipeline import Pipeline, StepRecord, weights_digest
from recovery.checkfree import CheckFree
from recovery.rebuild import NeighbourState, StageLost
from recovery.stage import neighbour_state
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_pipeline import D, M, by_stage, get_batch, make_opt, mse

pytestmark = pytest.mark.timeout(90)


class Died(Exception):
    """Ends the thread of a peer that a test crashed."""


def uniform_stages(n: int, seed: int = 0) -> list[torch.nn.Module]:
    """Stages of identical shapes (the rebuild rule needs them)."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.nn.Module] = []
    for _ in range(n):
        lin = torch.nn.Linear(D, D)
        with torch.no_grad():
            for p in lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        out.append(lin)
    return out


def run(swarm: Swarm, steps: int, n: int, hook: Optional[Callable[[Pipeline, StepRecord], None]] = None,
        **kw: Any) -> Pipeline:
    kw.setdefault("op_timeout", 15.0)
    pipe: Pipeline
    pipe = Pipeline(swarm, uniform_stages(n), make_opt, micro_batches=M, example=get_batch(0, 0), loss_fn=mse,
                    on_step=(lambda r: hook(pipe, r)) if hook else None, **kw)
    while pipe.committed < steps:
        pipe.step(get_batch)
    return pipe


def wait_pending(coord: Swarm, peer_id: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while coord.node.coord is None or peer_id not in coord.node.coord.pending:
        assert time.monotonic() < deadline, "the joiner never became pending"
        time.sleep(0.02)


def crash_at(inproc: InProcess, victim: Swarm, step: int, before: Optional[Callable[[], None]] = None
             ) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """An ``outgoing`` hook that kills ``victim`` mid-step (at its first send of step ``step``)."""
    state = {"pipe": None}

    def hook(t: torch.Tensor, what: str) -> torch.Tensor:
        pipe = state["pipe"]
        if pipe is not None and pipe.committed == step:
            if before is not None:
                before()
            inproc.crash(victim)
            raise Died(victim.id)
        return t
    hook.state = state  # type: ignore[attr-defined]
    return hook


def start(swarm: Swarm, steps: int, n: int, outgoing: Any = None, **kw: Any) -> Callable[[], Pipeline]:
    def go() -> Pipeline:
        holder: dict[str, Pipeline] = {}
        kw.setdefault("op_timeout", 15.0)
        pipe = Pipeline(swarm, uniform_stages(n), make_opt, micro_batches=M, example=get_batch(0, 0),
                        loss_fn=mse, on_step=kw.pop("on_step", None), **kw)
        holder["p"] = pipe
        if outgoing is not None:
            outgoing.state["pipe"] = pipe
            pipe.outgoing = outgoing
        while pipe.committed < steps:
            pipe.step(get_batch)
        return pipe
    return go


def later(joiner: dict[str, Swarm], make: Callable[[Swarm], Callable[[], Any]]) -> Callable[[], Any]:
    """A thread that runs ``make(swarm)()`` once the joiner's swarm exists (bounded wait)."""
    def go() -> Any:
        deadline = time.monotonic() + 40
        while "j" not in joiner:
            assert time.monotonic() < deadline, "the joiner was never started"
            time.sleep(0.02)
        return make(joiner["j"])()
    return go


def test_replica_killed_mid_step_aborts_everywhere_retry_commits(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 3)
    p0, p1, p2 = peers
    seen: dict[str, list[tuple[int, bool, str]]] = {}

    def rec(pipe_id: str) -> Callable[[StepRecord], None]:
        return lambda r: seen.setdefault(pipe_id, []).append((r.step, r.committed, r.reason))

    digests: dict[str, list[tuple[bool, str]]] = {}
    pipes: dict[str, Pipeline] = {}

    def go(s: Swarm, stage: int, outgoing: Any = None) -> Callable[[], Pipeline]:
        def on_step(r: StepRecord) -> None:
            digests.setdefault(s.id, []).append((r.committed, pipes[s.id].digest()))
        def f() -> Pipeline:
            pipe = Pipeline(s, uniform_stages(2), make_opt, micro_batches=M, example=get_batch(0, 0),
                            loss_fn=mse, stage=stage, on_step=on_step, op_timeout=15.0)
            pipes[s.id] = pipe
            if outgoing is not None:
                outgoing.state["pipe"] = pipe
                pipe.outgoing = outgoing
            while pipe.committed < 5:
                pipe.step(get_batch)
            return pipe
        return f

    res = run_all([go(p0, 0), go(p1, 0, crash_at(inproc, p1, 2)), go(p2, 1)], timeout=80)
    assert isinstance(res[1], Died)
    for pid in ("p0", "p2"):
        pipe = res[0] if pid == "p0" else res[2]
        assert isinstance(pipe, Pipeline), pipe
        hist = [(r.step, r.committed) for r in pipe.history]
        assert (2, False) in hist and hist[-1] == (4, True)      # step 2 aborted here, then retried
        assert [s for s, c in hist if c] == [0, 1, 2, 3, 4]      # every step committed exactly once
        # nothing half-applied: the state after the aborted attempt is the state of the last commit
        ds = digests[pid]
        for i, (committed, d) in enumerate(ds):
            if not committed:
                prev = [dd for c, dd in ds[:i] if c]
                assert prev and d == prev[-1]
        assert pipe.steps_aborted >= 1
    assert "p1" not in res[0].swarm.members


def test_last_replica_lost_joiner_waits_no_rule_stops(inproc: InProcess) -> None:
    """Branch (3): the only replica of stage 1 dies, a joiner waits and is assigned the stage, nothing can
    restore it: every member stops with StageLost naming the stage."""
    coord, peers = form_swarm(inproc, 2)
    p0, p1 = peers
    entry = coord.addr.removeprefix("tcp://")
    joiner: dict[str, Swarm] = {}

    def spawn() -> None:
        joiner["j"] = inproc.peer("j", [entry])
        wait_pending(coord, "j")

    res = run_all([start(p0, 6, 2, stage=0), start(p1, 6, 2, crash_at(inproc, p1, 2, spawn), stage=1),
                   later(joiner, lambda j: start(j, 6, 2))], timeout=60)
    assert isinstance(res[1], Died)
    for r in (res[0], res[2]):
        assert isinstance(r, StageLost) and r.stage == 1, r
    assert "stage 1" in str(res[0])


def test_last_replica_lost_joiner_gets_rebuild(inproc: InProcess) -> None:
    """Branch (2): the only replica of middle stage 1 dies while a joiner waits; the joiner takes stage 1,
    rebuilt by the rule from stages 0 and 2: bit for bit what the pure rule gives for their weights and
    norms at the last committed step. Training goes on."""
    coord, peers = form_swarm(inproc, 3)
    p0, p1, p2 = peers
    entry = coord.addr.removeprefix("tcp://")
    joiner: dict[str, Swarm] = {}
    snap: dict[int, NeighbourState] = {}
    live: dict[str, Pipeline] = {}
    rule = CheckFree()

    def spawn() -> None:
        joiner["j"] = inproc.peer("j", [entry])
        wait_pending(coord, "j")

    def member(s: Swarm, stage: int, out: Any = None) -> Callable[[], Pipeline]:
        def on_step(r: StepRecord) -> None:
            pipe = live[s.id]
            if r.committed and r.step == 1:   # the neighbours' state when stage 1 is lost (during step 2)
                snap[pipe.stage] = neighbour_state(pipe.stage, pipe.stages[pipe.stage], pipe.norms)

        def go() -> Pipeline:
            pipe = Pipeline(s, uniform_stages(3), make_opt, micro_batches=M, example=get_batch(0, 0),
                            loss_fn=mse, stage=stage, rebuild=rule, on_step=on_step, op_timeout=15.0)
            live[s.id] = pipe
            if out is not None:
                out.state["pipe"] = pipe
                pipe.outgoing = out
            while pipe.committed < 5:
                pipe.step(get_batch)
            return pipe
        return go

    joined = later(joiner, lambda j: start(j, 5, 3, rebuild=rule))
    res = run_all([member(p0, 0), member(p1, 1, crash_at(inproc, p1, 2, spawn)), member(p2, 2), joined],
                  timeout=80)
    assert isinstance(res[1], Died)
    assert all(isinstance(r, Pipeline) for r in (res[0], res[2], res[3])), res
    jp = res[3]
    assert jp.stage == 1 and jp.committed == 5
    rec = [r for r in jp.recoveries if r["stage"] == 1]
    assert rec and rec[0]["how"] == "rebuild:checkfree" and rec[0]["joiners"] == ["j"], rec
    assert snap[0].grad_norm is not None and snap[2].grad_norm is not None
    shapes = {n: tuple(p.shape) for n, p in uniform_stages(3)[1].named_parameters()}
    expect = rule.rebuild(1, 3, shapes, {0: snap[0], 2: snap[2]})
    assert jp.rebuilt_digest == weights_digest(expect.weights)
    assert jp.meta[0] == pytest.approx(1.1)        # the rebuilt stage's learning-rate bump


def test_no_joiner_most_replicated_stage_gives_a_peer(inproc: InProcess) -> None:
    """The only replica of stage 1 dies, no joiner waits, stage 0 has two replicas: the last of them in
    ring order moves over to stage 1 (rebuilt from its neighbours), the other keeps stage 0."""
    _, peers = form_swarm(inproc, 4)
    p0, p1, p2, p3 = peers
    rule = CheckFree()
    fns = [start(p0, 5, 3, stage=0, rebuild=rule), start(p1, 5, 3, crash_at(inproc, p1, 2), stage=1, rebuild=rule),
           start(p2, 5, 3, stage=2, rebuild=rule), start(p3, 5, 3, stage=0, rebuild=rule)]
    res = run_all(fns, timeout=80)
    assert isinstance(res[1], Died)
    survivors = [res[0], res[2], res[3]]
    assert all(isinstance(r, Pipeline) for r in survivors), res
    stages = sorted(p.stage for p in survivors)
    assert stages == [0, 1, 2]
    mover = next(p for p in survivors if p.stage == 1)
    assert mover.swarm.id in ("p0", "p3")
    assert any(r["how"].startswith("rebuild") and r["moved"] == [mover.swarm.id] for r in mover.recoveries)


def test_joiner_copies_surviving_replica_exactly(inproc: InProcess) -> None:
    """Branch (1) and joiners: a replica of stage 1 dies; a joiner asks for stage 1 and copies it from the
    surviving replica (weights and optimizer state, hash-verified: digests equal) and takes part in the next
    step."""
    coord, peers = form_swarm(inproc, 3)
    p0, p1, p2 = peers
    entry = coord.addr.removeprefix("tcp://")
    joiner: dict[str, Swarm] = {}

    def spawn() -> None:
        joiner["j"] = inproc.peer("j", [entry])
        wait_pending(coord, "j")

    res = run_all([start(p0, 5, 2, stage=0), start(p1, 5, 2, stage=1),
                   start(p2, 5, 2, crash_at(inproc, p2, 2, spawn), stage=1),
                   later(joiner, lambda j: start(j, 5, 2, stage=1))], timeout=80)
    assert isinstance(res[2], Died)
    jp, p1p = res[3], res[1]
    assert isinstance(jp, Pipeline) and isinstance(p1p, Pipeline), res
    assert jp.stage == 1 and jp.digest() == p1p.digest()
    copies = [r for r in jp.recoveries if r["how"] == "replica copy"]
    assert copies and copies[0]["joiners"] == ["j"] and copies[0]["fetched"] > 0
    first = next(r for r in jp.history)
    assert first.committed and first.micro_batches > 0 and first.step == copies[0]["step"]


@pytest.mark.parametrize("garbage", ["size", "dtype"])
def test_garbage_activation_drops_the_peer(inproc: InProcess, garbage: str) -> None:
    _, peers = form_swarm(inproc, 3)
    p0, p1, p2 = peers
    done = {"n": 0}

    def corrupt(t: torch.Tensor, what: str) -> torch.Tensor:
        if what == "activation" and done["n"] == 0 and state["pipe"] is not None and state["pipe"].committed == 1:
            done["n"] += 1
            return torch.zeros(t.numel() + 3) if garbage == "size" else t.double()
        return t
    state: dict[str, Any] = {"pipe": None}
    corrupt.state = state  # type: ignore[attr-defined]
    # admit_every: the evicted peer rejoins at once (the runtime's StaleError path); it is not re-admitted
    # during this short run, so the test is about the drop alone
    res = run_all([start(p0, 4, 2, stage=0, admit_every=1000),
                   start(p1, 4, 2, corrupt, stage=0, join_timeout=5.0, admit_every=1000),
                   start(p2, 4, 2, stage=1, admit_every=1000)], timeout=80)
    p2p = res[2]
    assert isinstance(p2p, Pipeline), res
    bad = [r for r in p2p.history if r.bad_peers]
    assert bad and bad[0].bad_peers == ["p1"] and not bad[0].committed
    assert "ActivationError" in bad[0].reason
    assert [r.step for r in p2p.history if r.committed] == [0, 1, 2, 3]
    assert any("p1" not in r.members for r in p2p.history if r.committed)   # dropped, training went on


def test_two_adjacent_stages_lost_degraded_recovery(inproc: InProcess) -> None:
    """Stages 1 and 2 (adjacent) die together, stages 0 and 3 have two replicas each: one replica of each
    moves over (stage 0's to stage 1, stage 3's to stage 2); each lost stage is rebuilt from its only
    surviving neighbour (copy-nearest), reported as degraded; training goes on."""
    _, peers = form_swarm(inproc, 6)
    rule = CheckFree()
    layout = [0, 0, 1, 2, 3, 3]
    fns = []
    for p, s in zip(peers, layout):
        out = crash_at(inproc, p, 2) if s in (1, 2) else None
        fns.append(start(p, 5, 4, out, stage=s, rebuild=rule))
    res = run_all(fns, timeout=80)
    assert isinstance(res[2], Died) and isinstance(res[3], Died)
    survivors = [r for r in res if isinstance(r, Pipeline)]
    assert len(survivors) == 4 and sorted(p.stage for p in survivors) == [0, 1, 2, 3], res
    hows = {r["stage"]: r["how"] for p in survivors for r in p.recoveries if r["stage"] in (1, 2)}
    assert hows == {1: "rebuild:copy-nearest (degraded)", 2: "rebuild:copy-nearest (degraded)"}, hows
    assert all(p.committed == 5 for p in survivors)
