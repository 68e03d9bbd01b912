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
                    if len(self._free) < 3:  # enough that steady state never allocates
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


# ============================================================================ benchmark

def bench(root: PathLike, state_mb: float = 64.0, steps: int = 60, every: int = 5, step_ms: float = 20.0
          ) -> dict[str, float]:
    """Step time of a loop doing ``step_ms`` of numpy work per step, with a snapshot of ``state_mb`` every
    ``every`` steps: none; background (``Snapshotter``: the step waits for the copy only); synchronous
    (``write_snapshot`` inside the step: what the background writer saves). Milliseconds per step (mean,
    median, max), and the mean time of one capture (the copy: all a step waits for in the background mode;
    the first captures also fault in fresh buffers; the rest of any slowdown is the writer thread's CPU
    and memory bandwidth, hashing included)."""
    rng = np.random.default_rng(0)
    state = rng.standard_normal(int(state_mb * (1 << 20) / 4)).astype(np.float32)   # (N,) the shared state
    a = rng.standard_normal((256, 256)).astype(np.float32)
    reps = 1
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < step_ms / 1000:   # calibrate the work of one step
        a = np.tanh(a @ a * np.float32(1e-2))
        reps += 1

    def work() -> None:
        nonlocal a
        for _ in range(reps):
            a = np.tanh(a @ a * np.float32(1e-2))

    out: dict[str, float] = {"state_mb": state_mb, "every": every, "steps": steps}
    for mode in ("none", "background", "sync"):
        d = Path(root) / mode
        snaps = Snapshotter(d, every=every, keep=2) if mode == "background" else None
        times = []
        for step in range(1, steps + 1):
            t = time.perf_counter()
            work()
            state[step % state.size] += 1  # the state changes every step
            if step % every == 0:
                specs = [TensorSpec("outer", "w", state)]
                if snaps is not None:
                    snaps.capture(step, specs)
                elif mode == "sync":
                    write_snapshot(d, step, specs, keep=2)
            times.append(time.perf_counter() - t)
        if snaps is not None:
            snaps.close(600)
            out["background_written"], out["background_skipped"] = len(snaps.written), snaps.skipped
            out["background_capture_ms"] = 1000 * snaps.copy_seconds / (steps // every)  # the copy, per capture
        out[f"{mode}_mean_ms"] = 1000 * sum(times) / len(times)
        out[f"{mode}_median_ms"] = 1000 * sorted(times)[len(times) // 2]
        out[f"{mode}_max_ms"] = 1000 * max(times)
    return out


if __name__ == "__main__":
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m recovery.snapshot_writer",
                                 description="Step time without snapshots, with background and with "
                                             "synchronous snapshots (a temp dir unless --dir).")
    ap.add_argument("--state-mb", type=float, default=64.0)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--step-ms", type=float, default=20.0)
    ap.add_argument("--dir", default="")
    ns = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ns.dir or None) as tmp:
        print(json.dumps(bench(tmp, ns.state_mb, ns.steps, ns.every, ns.step_ms)))
