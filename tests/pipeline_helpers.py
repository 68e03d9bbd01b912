"""Pipeline tests on in-process peers: the one-process reference they compare with, running a pipeline to a
step count, and crashing a peer mid-step (with a joiner that waits for admission)."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch

from peer import Swarm
from peer.train.pipeline import Pipeline
from tests.helpers import InProcess

Batch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def train_one_process(stages: list[Any], make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
                      steps: int, micro_batches: int, get_batch: Batch,
                      loss: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
                      after_step: Optional[Callable[[], None]] = None) -> list[float]:
    """One process training the whole model: each step, ``loss(x, y, m)`` of every micro-batch ``m``,
    scaled by 1/M and backpropagated, then each stage's optimizer steps (``after_step`` runs after that);
    returns each step's mean loss. The order of operations is the pipeline's, so results compare bit for bit."""
    opts = [make_opt(list(s.parameters())) for s in stages]
    losses = []
    for step in range(steps):
        total = 0.0
        for m in range(micro_batches):
            x, y = get_batch(step, m)
            out = loss(x, y, m)
            (out / micro_batches).backward()
            total += float(out.detach())
        for o in opts:
            o.step()
            o.zero_grad()
        losses.append(total / micro_batches)
        if after_step is not None:
            after_step()
    return losses


def through(stages: list[Any], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
            ) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """The loss of the stages applied in their order (for ``train_one_process``)."""
    def loss(x: torch.Tensor, y: torch.Tensor, m: int) -> torch.Tensor:
        for s in stages:
            x = s(x)
        return loss_fn(x, y)
    return loss


def run_to(pipe: Pipeline, steps: int, get_batch: Batch, outgoing: Any = None) -> Pipeline:
    """Step ``pipe`` until ``steps`` steps committed; ``outgoing`` (e.g. ``crash_at``'s hook) sees its sends."""
    if outgoing is not None:
        outgoing.state["pipe"] = pipe
        pipe.outgoing = outgoing
    while pipe.committed < steps:
        pipe.step(get_batch)
    return pipe


class Died(Exception):
    """Ends the thread of a peer that a test crashed."""


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


def later(joiner: dict[str, Swarm], make: Callable[[Swarm], Callable[[], Any]]) -> Callable[[], Any]:
    """A thread that runs ``make(swarm)()`` once the joiner's swarm exists (bounded wait)."""
    def go() -> Any:
        deadline = time.monotonic() + 40
        while "j" not in joiner:
            assert time.monotonic() < deadline, "the joiner was never started"
            time.sleep(0.02)
        return make(joiner["j"])()
    return go
