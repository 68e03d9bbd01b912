"""Rank 0's outer sync raising on a multi-process peer: the other local ranks must stop at once with
``LocalGroupFailed`` (rank 0 broadcasts a failure status before re-raising), never wait for the process
group's timeout. Two local ranks run as threads over an in-memory group with the broadcast / sum semantics of
``peer.train.local_group.LocalGroup``; every wait has a deadline."""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from collectives.errors import LocalError
from peer.train.local_group import LocalDiLoCo, LocalGroupFailed

pytestmark = pytest.mark.timeout(60)
WAIT_S = 10.0  # a rank that waits this long in a collective has hung: the test fails


class ThreadGroup:
    """A local group of ``size`` threads: ``broadcast_`` copies rank 0's bytes to every rank, ``sum`` adds."""

    def __init__(self, rank: int, size: int, shared: dict[str, Any]) -> None:
        self.rank, self.size, self.backend = rank, size, "gloo"
        self.device = torch.device("cpu")
        self.shared = shared

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _exchange(self, value: Any) -> list[Any]:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = value
        barrier.wait(WAIT_S)
        got = list(slots)
        barrier.wait(WAIT_S)
        return got

    def broadcast_(self, arr: np.ndarray) -> None:
        arr[...] = self._exchange(arr.copy())[0]

    def sum(self, value: float) -> float:
        return float(sum(self._exchange(value)))


class FailingOuter:
    """Stands in for rank 0's DiLoCo: inner steps work, the sync at the ``fail_at``-th step raises."""

    def __init__(self, model: torch.nn.Module, inner: torch.optim.Optimizer, swarm: Any, *, inner_steps: int,
                 fragments: int, fail_at: int, lag: bool = False) -> None:
        self.inner, self.fail_at, self.calls, self.lag = inner, fail_at, 0, lag
        n = sum(p.numel() for p in model.parameters())
        self.theta, self.mom = np.zeros(n, np.float32), np.zeros(n, np.float32)
        self.revision, self.steps_since = 0, 0

    def step(self, samples: float = 1.0) -> None:
        self.calls += 1
        self.inner.step()
        if self.calls == self.fail_at:
            if self.lag:            # a clock that disagrees with the machine's: no sync where one is due
                self.steps_since = 1
                return
            raise RuntimeError("the swarm's outer sync failed on rank 0")

    def finish(self) -> None:
        pass


def run_ranks(inner_steps: int, fail_at: int, lag: bool = False) -> dict[int, Optional[BaseException]]:
    shared: dict[str, Any] = {"slots": [None, None], "barrier": threading.Barrier(2)}
    errors: dict[int, Optional[BaseException]] = {}

    def rank(r: int) -> None:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        inner = torch.optim.SGD(model.parameters(), lr=0.1)
        factory: Callable[..., Any] = lambda *a, **kw: FailingOuter(*a, fail_at=fail_at, lag=lag, **kw)
        try:
            opt = LocalDiLoCo(model, inner, ThreadGroup(r, 2, shared), object() if r == 0 else None,  # type: ignore[arg-type]
                              inner_steps=inner_steps, diloco_factory=factory)
            for _ in range(3 * inner_steps):
                model(torch.ones(1, 4)).sum().backward()
                opt.step(samples=1.0)
                opt.zero_grad()
            errors[r] = None
        except (RuntimeError, LocalError, LocalGroupFailed, threading.BrokenBarrierError) as exc:
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(3 * WAIT_S)
        assert not t.is_alive(), "a local rank hung"
    return errors


def test_rank_0_failing_its_sync_stops_the_other_rank_with_local_group_failed() -> None:
    errors = run_ranks(inner_steps=2, fail_at=4)  # the second sync point fails
    assert isinstance(errors[0], RuntimeError) and "outer sync failed" in str(errors[0])
    assert isinstance(errors[1], LocalGroupFailed), errors[1]


def test_without_a_failure_both_ranks_run_every_sync_point() -> None:
    errors = run_ranks(inner_steps=2, fail_at=10**9)
    assert errors == {0: None, 1: None}


def test_rank_0_missing_a_sync_point_stops_the_other_rank_too() -> None:
    errors = run_ranks(inner_steps=2, fail_at=4, lag=True)
    assert isinstance(errors[0], LocalError) and "did not sync" in str(errors[0])
    assert isinstance(errors[1], LocalGroupFailed), errors[1]
