"""Pipeline stages over in-process peers: equality with a single-process reference, replica parity after every
committed step, a replica lost mid-step, garbage activations, stage reassignment and joiners."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import pytest
import torch

from examples.multi_gpu_pipeline import D as TINY_D, H as TINY_H, tiny_stages
from peer import Swarm
from peer.train.pipeline import Pipeline, StepRecord
from tests.helpers import InProcess, form_swarm, run_all

pytestmark = pytest.mark.timeout(120)

D, H, B, M, LR = 6, 10, 3, 4, 0.02


def make_stages(n: int = 2, seed: int = 0) -> list[torch.nn.Module]:
    """Linear(D, H) + Tanh, ..., Linear(H, D): the example's tiny stages (D = 6, H = 10)."""
    assert (D, H) == (TINY_D, TINY_H)
    return tiny_stages(n, seed)


def get_batch(step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + 97 * step + m)
    x = torch.randn(B, D, generator=g)
    return x, torch.sin(2 * x)


Batch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def make_opt(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=LR)


def pipeline(swarm: Swarm, n: int = 2, **kw: Any) -> Pipeline:
    kw.setdefault("op_timeout", 20.0)
    return Pipeline(swarm, make_stages(n), make_opt, micro_batches=M, example=get_batch(0, 0), loss_fn=mse, **kw)


def train(swarm: Swarm, steps: int, n: int = 2, hook: Optional[Any] = None, **kw: Any) -> Pipeline:
    pipe = pipeline(swarm, n, **kw)
    while pipe.committed < steps:
        pipe.step(get_batch)
        if hook is not None:
            hook(pipe)
    return pipe


def train_in_one_process(stages: list[torch.nn.Module], steps: int, batch: Batch = get_batch,
                         opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] = make_opt,
                         micro: int = M) -> list[float]:
    """The pipeline's exact maths in one process: per step, ``micro`` micro-batches through every stage in
    order, each loss / micro backpropagated, then one optimizer step per stage. Returns the mean losses."""
    opts = [opt(list(s.parameters())) for s in stages]
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(micro):
            x, y = batch(step, m)
            for s in stages:
                x = s(x)
            loss = mse(x, y)
            (loss / micro).backward()
            total += float(loss.detach())
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(total / micro)
    return losses


def reference(steps: int, n: int = 2) -> tuple[list[torch.nn.Module], list[float]]:
    stages = make_stages(n)
    return stages, train_in_one_process(stages, steps)


def weights(m: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in m.parameters()]


def by_stage(pipes: list[Pipeline]) -> dict[int, list[Pipeline]]:
    out: dict[int, list[Pipeline]] = {}
    for p in pipes:
        out.setdefault(p.stage, []).append(p)
    return out


def assert_replicas_equal(pipes: list[Pipeline]) -> None:
    for s, reps in by_stage(pipes).items():
        assert len({p.digest() for p in reps}) == 1, f"stage {s} replicas differ"


def test_two_stages_equal_single_process_reference(inproc: InProcess) -> None:
    """Bit-equal: one replica per stage means no all-reduce, and the micro-batches' gradients accumulate in
    the same order with the same 1/M scaling as the reference, through the same kernels."""
    _, peers = form_swarm(inproc, 2)
    steps = 4
    pipes = run_all([partial(train, p, steps, stage=i) for i, p in enumerate(peers)], timeout=100)
    assert all(isinstance(p, Pipeline) for p in pipes), pipes
    ref, ref_losses = reference(steps)
    for p in pipes:
        for a, b in zip(weights(p.stages[p.stage]), weights(ref[p.stage])):
            assert torch.equal(a, b)
        losses = [r.loss for r in p.history if r.committed]
        assert losses == ref_losses   # the vote carries the loss sums: every peer returns the same mean
    assert all(r.committed for p in pipes for r in p.history)


def test_replicas_bit_identical_after_every_step(inproc: InProcess) -> None:
    """2 stages x 2 replicas: after every committed step each stage's replicas hold the same bytes
    (weights and optimizer state); the result is within float tolerance of the reference (the ring sum of
    two replicas' gradients adds in another order than one process does)."""
    _, peers = form_swarm(inproc, 4)
    steps = 3
    digests: dict[tuple[int, int], set[str]] = {}

    def hook(pipe: Pipeline) -> None:
        digests.setdefault((pipe.committed, pipe.stage), set()).add(pipe.digest())

    pipes = run_all([partial(train, p, steps, hook=hook, stage=i % 2) for i, p in enumerate(peers)],
                    timeout=100)
    assert all(isinstance(p, Pipeline) for p in pipes), pipes
    assert sorted(len(v) for v in by_stage(pipes).values()) == [2, 2]
    assert len(digests) == 2 * steps and all(len(v) == 1 for v in digests.values()), digests
    ref, _ = reference(steps)
    for p in pipes:
        assert p.history[-1].micro_batches == M // 2   # micro-batches spread evenly over the replicas
        for a, b in zip(weights(p.stages[p.stage]), weights(ref[p.stage])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
