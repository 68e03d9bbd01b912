"""The background snapshot writer: copy the shared state at a sync point, write it in a thread.

Training waits only for the copy (a memcpy into reused buffers); the disk write, the fsyncs and the
rename run in a thread (``recovery.snapshot.write_snapshot``). DiLoCo calls ``capture`` after a committed
outer step (``docs/snapshots.md``: ``--snapshot-dir DIR --snapshot-every K``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from collectives.errors import DeadlineExceeded, LocalError
from recovery.snapshot import (MetaValue, PathLike, Snapshot, SnapshotError, TensorSpec, check_spec, join_flat,
                               split_flat, write_snapshot)

log = logging.getLogger(__name__)


class SnapshotWriteFailed(SnapshotError):
    """The background writer failed (disk full, permissions); raised at the next capture or at close."""


@dataclass
class _Job:
    revision: int
    specs: list[TensorSpec]
    meta: dict[str, MetaValue]
    buffers: dict[str, np.ndarray]


class Snapshotter:
    """Take snapshots at sync points without making training wait for the disk.

    ``capture(revision, specs)`` copies the arrays now (into buffers reused across snapshots: two sets,
    one being written while the next is captured) and returns; a thread writes them with
    ``write_snapshot``. If the disk is slower than the snapshot cadence, a capture that finds a snapshot
    still waiting replaces it (newest wins; counted in ``skipped``). A failed write is logged and raised
    as ``SnapshotWriteFailed`` from the next ``capture`` or ``close``: never silent."""

    def __init__(self, root: PathLike, every: int = 1, keep: int = 2,
                 meta: Optional[Mapping[str, MetaValue]] = None) -> None:
        if every < 1:
            raise LocalError("snapshot every must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.every, self.keep, self.meta = every, keep, dict(meta or {})
        self.last_captured = -1
        self.written: list[int] = []          # revisions written, in order
        self.skipped = 0
        self.copy_seconds = 0.0               # time spent in capture (the part training waits for)
        self.write_seconds = 0.0              # time the thread spent writing
        self._error: Optional[BaseException] = None
        self._pending: Optional[_Job] = None
        self._free: list[dict[str, np.ndarray]] = []
        self._busy = False
        self._closed = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"snapshots:{self.root.name}", daemon=True)
        self._thread.start()

    def due(self, revision: int) -> bool:
        return revision > self.last_captured and revision % self.every == 0

    def capture(self, revision: int, specs: Iterable[TensorSpec],
                meta: Optional[Mapping[str, MetaValue]] = None) -> bool:
        """Copy ``specs`` for a snapshot of ``revision`` if one is due; returns whether it was taken."""
        self._raise_error()
        if not self.due(revision):
            return False
        t0 = time.perf_counter()
        with self._cv:
            buffers = self._free.pop() if self._free else {}
        copies = []
        for spec in specs:
            arr = check_spec(spec)
            buf = buffers.get(spec.name)
            if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
                buf = buffers[spec.name] = np.empty_like(arr)
            np.copyto(buf, arr)
            copies.append(TensorSpec(spec.kind, spec.param, buf, dict(spec.meta)))
        job = _Job(revision, copies, {**self.meta, **(meta or {})}, buffers)
        self.copy_seconds += time.perf_counter() - t0
        with self._cv:
            if self._closed:
                raise LocalError("the snapshotter is closed")
            if self._pending is not None:
                self.skipped += 1
                log.warning("snapshot of revision %d replaced by revision %d before it was written (the disk "
                            "is slower than --snapshot-every)", self._pending.revision, revision)
                self._free.append(self._pending.buffers)
            self._pending = job
            self.last_captured = revision
            self._cv.notify_all()
        return True

    def flush(self, timeout: float = 60.0) -> None:
        """Block until every captured snapshot is on disk."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"snapshots not written within {timeout:.1f}s")
                self._cv.wait(left)
        self._raise_error()

    def close(self, timeout: float = 60.0) -> None:
        try:
            self.flush(timeout)
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            self._thread.join(timeout)

    def _raise_error(self) -> None:
        with self._cv:
            err, self._error = self._error, None
        if err is not None:
            raise SnapshotWriteFailed(f"writing a snapshot to {self.root} failed: {err}") from err

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._closed:
                    self._cv.wait()
                if self._pending is None:
                    return
                job, self._pending, self._busy = self._pending, None, True
            t0 = time.perf_counter()
            try:
                write_snapshot(self.root, job.revision, job.specs, job.meta, self.keep)
            except Exception as exc:  # the thread's boundary: recorded and raised to the trainer
                log.error("snapshot of revision %d to %s failed: %s", job.revision, self.root, exc)
                with self._cv:
                    self._error = exc
            else:
                self.written.append(job.revision)
                log.info("snapshot of revision %d written to %s", job.revision, self.root)
            finally:
                self.write_seconds += time.perf_counter() - t0
                with self._cv:
                    self._busy = False
                    if len(self._free) < 2:
                        self._free.append(job.buffers)
                    self._cv.notify_all()


# ============================================================================ DiLoCo's outer state

def outer_specs(names: Sequence[str], shapes: Sequence[Sequence[int]], theta: np.ndarray, mom: np.ndarray
                ) -> list[TensorSpec]:
    """DiLoCo's flat outer weights and momentum as per-parameter tensors (views; ``capture`` copies)."""
    return ([TensorSpec("outer", n, a) for n, a in split_flat(theta, names, shapes).items()]
            + [TensorSpec("momentum", n, a) for n, a in split_flat(mom, names, shapes).items()])


def load_outer(snap: Snapshot, names: Sequence[str], shapes: Sequence[Sequence[int]]
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """(outer weights, momentum, revision) for a model with these parameters, verified. Refuses a
    snapshot whose shapes differ from the model's (a different model), naming the parameter."""
    outer, mom = snap.arrays("outer"), snap.arrays("momentum")
    for n, shape in zip(names, shapes, strict=True):
        for kind, held in (("outer", outer), ("momentum", mom)):
            if n in held and held[n].shape != tuple(shape):
                raise LocalError(f"{snap.path}: {kind}/{n} has shape {held[n].shape}, the model's is "
                                 f"{tuple(shape)}")
    return join_flat(outer, names), join_flat(mom, names), snap.revision
