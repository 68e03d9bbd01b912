"""A training task for ``swarmtrain peer --workload train``: the model, inner optimizer and batches a user
supplies, named on the command line as ``module:callable`` (the package never imports a task itself)::

    swarmtrain peer --bootstrap --port 7000 --secret swarm.secret --workload train \\
        --task examples.charlm_task:task --task-arg width=64 --outer-steps 100 --inner-steps 25 \\
        --snapshot-dir snaps --snapshot-every 10
    swarmtrain peer --join host:7000 --secret swarm.secret --workload train --task examples.charlm_task:task
    swarmtrain peer --bootstrap --port 7000 --secret swarm.secret --workload train \\
        --task examples.charlm_task:task --resume snaps          # after every peer was lost

The callable takes a ``TaskContext`` (this peer's id, the seed, the ``--task-arg KEY=VALUE`` options) and
returns a ``Task``::

    def task(ctx: TaskContext) -> Task:
        torch.manual_seed(ctx.seed)                        # the same initial weights on every peer
        model = MyModel(width=ctx.option("width", 64))
        def batches(step: int) -> Batch:                    # this peer's batch of its local step ``step``
            g = torch.Generator().manual_seed(hash((ctx.peer_id, step)) % 2**62)
            ...
            return x, y
        return Task(model, torch.optim.AdamW(model.parameters(), 1e-3), batches)

``train`` runs DiLoCo on it (``peer.train.diloco``) until the swarm's revision reaches ``outer_steps``,
with snapshots and resume (``docs/snapshots.md``), reporting each sync point through ``emit``.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, TypeVar

import torch
import torch.nn.functional as F

from collectives.errors import LocalError
from peer.swarm import Swarm
from peer.train.diloco import DiLoCo, DiLoCoConfig, RoundRecord
from recovery.snapshot import Snapshot
from recovery.snapshot_writer import Snapshotter

Batch = Sequence[torch.Tensor]          # (inputs, targets, ...): what ``loss`` takes
T = TypeVar("T", int, float, str, bool)


def cross_entropy(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The default loss: cross-entropy of ``model(batch[0])`` (logits (..., V)) against ``batch[1]`` (...)."""
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def first_dim(batch: Batch) -> float:
    """The default sample count of a batch: the length of its first tensor."""
    return float(len(batch[0]))


@dataclass
class Task:
    """What one peer trains. ``batches(step)``: the batch of this peer's local step ``step`` (0, 1, ...;
    make it differ between peers, e.g. seeded by ``ctx.peer_id``). ``loss(model, batch)``: a scalar.
    ``samples(batch)``: the batch's weight in DiLoCo's weighted average. ``evaluate(model)``: an optional
    validation loss, reported at the end."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Callable[[int], Batch]
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor] = cross_entropy
    samples: Callable[[Batch], float] = first_dim
    evaluate: Optional[Callable[[torch.nn.Module], float]] = None


@dataclass
class TaskContext:
    """What a task factory is given. ``option(key, default)`` reads ``--task-arg key=value``, converted to
    the default's type; options no factory call read are refused after it returns (a typo is an error)."""
    peer_id: str
    seed: int = 0
    options: Mapping[str, str] = field(default_factory=dict)
    _read: set[str] = field(default_factory=set, repr=False)

    def option(self, key: str, default: T) -> T:
        self._read.add(key)
        if key not in self.options:
            return default
        raw = self.options[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                return raw.lower() in ("1", "true", "yes")  # type: ignore[return-value]
            return type(default)(raw)
        except ValueError as exc:
            raise LocalError(f"--task-arg {key}={raw!r}: expected a {type(default).__name__}") from exc

    def unread(self) -> list[str]:
        return sorted(set(self.options) - self._read)


class TaskFactory(Protocol):
    def __call__(self, ctx: TaskContext) -> Task: ...


def parse_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["width=64", "lr=1e-3"]`` -> ``{"width": "64", "lr": "1e-3"}``."""
    out: dict[str, str] = {}
    for p in pairs:
        key, eq, value = p.partition("=")
        if not eq or not key:
            raise LocalError(f"--task-arg {p!r}: expected KEY=VALUE")
        out[key] = value
    return out


def load_factory(spec: str) -> TaskFactory:
    """The callable named ``module:attr`` (``module`` importable from the current directory, as with
    ``python -m``)."""
    module, colon, attr = spec.partition(":")
    if not colon or not module or not attr:
        raise LocalError(f"--task {spec!r}: expected MODULE:CALLABLE (e.g. examples.charlm_task:task)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise LocalError(f"--task {spec!r}: cannot import {module!r} ({exc})") from exc
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise LocalError(f"--task {spec!r}: {module} has no callable {attr!r}")
    factory: TaskFactory = fn
    return factory


def load_task(spec: str, ctx: TaskContext) -> Task:
    """Build the task named by ``spec`` (``module:callable``) for this peer; checks what it returns."""
    task = load_factory(spec)(ctx)
    if not isinstance(task, Task):
        raise LocalError(f"--task {spec!r} returned {type(task).__name__}, not a peer.train.task.Task")
    if not isinstance(task.model, torch.nn.Module) or not isinstance(task.optimizer, torch.optim.Optimizer):
        raise LocalError(f"--task {spec!r}: Task.model must be a torch.nn.Module and Task.optimizer a "
                         "torch.optim.Optimizer")
    if ctx.unread():
        raise LocalError(f"--task {spec!r} does not know the option(s) {ctx.unread()}")
    return task


def round_event(rec: RoundRecord, peer_id: str, loss: Optional[float]) -> dict[str, Any]:
    """One sync point as a JSON-able event (the same keys as ``examples/multi_gpu_peer.py --events``)."""
    return {"event": "round", "id": peer_id, "revision": rec.revision, "committed": rec.committed,
            "digest": rec.digest, "samples": rec.samples, "my_samples": rec.my_samples, "members": rec.members,
            "adopted": rec.adopted, "kind": rec.kind, "reason": rec.reason, "retried": rec.retried,
            "seconds": rec.seconds, "loss": loss}


def train(swarm: Swarm, task: Task, config: DiLoCoConfig, outer_steps: int,
          emit: Callable[[dict[str, Any]], None], *, snapshots: Optional[Snapshotter] = None,
          resume: Optional[Snapshot] = None, stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """DiLoCo on ``task`` until the swarm's revision reaches ``outer_steps`` (or ``stop`` is set: this peer
    leaves after its current step). ``emit`` gets one ``round_event`` per sync point. Returns the summary
    (revision, digest of the outer state, local steps, final validation loss if the task has one)."""
    losses: list[float] = []

    def on_round(rec: RoundRecord) -> None:
        emit(round_event(rec, swarm.id, sum(losses) / len(losses) if losses else None))
        losses.clear()

    step = 0
    try:
        opt = DiLoCo(task.model, task.optimizer, swarm, config, on_round=on_round, snapshots=snapshots,
                     resume=resume)
        while opt.revision < outer_steps and not (stop is not None and stop.is_set()):
            batch = task.batches(step)
            loss = task.loss(task.model, batch)
            loss.backward()  # type: ignore[no-untyped-call]
            losses.append(float(loss.detach()))
            opt.step(samples=task.samples(batch))
            opt.zero_grad()
            step += 1
        opt.finish()
    finally:
        if snapshots is not None:
            snapshots.close()   # waits for the last snapshot to be on disk
    val = task.evaluate(task.model) if task.evaluate is not None else None
    return {"id": swarm.id, "revision": opt.revision, "digest": opt.digest.hex(), "steps": step,
            "faults": opt.faults, "val": val, "stopped": opt.revision < outer_steps,
            "snapshots": list(snapshots.written) if snapshots is not None else []}


__all__ = ["Batch", "Task", "TaskContext", "TaskFactory", "cross_entropy", "load_task", "parse_options",
           "round_event", "train"]
