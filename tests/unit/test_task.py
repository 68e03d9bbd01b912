"""The task protocol of ``swarmtrain peer --workload train`` (``peer.train.task``): options, loading a
``module:callable``, and the refusals (not a Task, unknown options, bad names)."""

from __future__ import annotations

import sys
import types
from typing import Iterator

import pytest
import torch

from collectives.errors import LocalError
from peer.train.task import Task, TaskContext, load_task, parse_options

pytestmark = pytest.mark.timeout(30)


def good(ctx: TaskContext) -> Task:
    model = torch.nn.Linear(ctx.option("width", 2), 3)
    return Task(model, torch.optim.SGD(model.parameters(), lr=ctx.option("lr", 0.1)),
                lambda step: (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))


@pytest.fixture
def module() -> Iterator[str]:
    mod = types.ModuleType("swarmtrain_test_tasks")
    mod.good = good  # type: ignore[attr-defined]
    mod.bad = lambda ctx: "not a task"  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    try:
        yield mod.__name__
    finally:
        del sys.modules[mod.__name__]


def test_options_are_typed_by_their_default() -> None:
    ctx = TaskContext("p", 0, parse_options(["width=8", "lr=0.5", "flag=yes", "name=x"]))
    assert (ctx.option("width", 1), ctx.option("lr", 1.0), ctx.option("flag", False), ctx.option("name", "")) \
        == (8, 0.5, True, "x")
    assert ctx.option("absent", 3) == 3
    with pytest.raises(LocalError, match="expected a int"):
        TaskContext("p", 0, {"width": "wide"}).option("width", 1)
    with pytest.raises(LocalError, match="KEY=VALUE"):
        parse_options(["novalue"])


def test_load_a_task_and_its_refusals(module: str) -> None:
    task = load_task(f"{module}:good", TaskContext("p", 0, {"width": "2"}))
    batch = task.batches(0)
    assert float(task.loss(task.model, batch).detach()) > 0 and task.samples(batch) == 4
    with pytest.raises(LocalError, match="does not know the option"):
        load_task(f"{module}:good", TaskContext("p", 0, {"widht": "2"}))
    with pytest.raises(LocalError, match="not a peer.train.task.Task"):
        load_task(f"{module}:bad", TaskContext("p"))
    for spec in ("nocolon", f"{module}:missing", "no_such_module_here:task"):
        with pytest.raises(LocalError):
            load_task(spec, TaskContext("p"))
