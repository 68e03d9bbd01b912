"""Workloads a peer process can run from the CLI: repeated all-reduces that survive churn.

Each attempt is written as one JSON line to ``record`` (flushed at once), so a test or the simulator can
check, across processes, that every committed op has the same digest on every member (I1), that no op was
committed on one member and aborted on another (I2), and that each result equals the numpy reference
recomputed from the members' seeds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import IO, Any, Optional

import numpy as np

from collectives.errors import CoordinatorUnavailable, DeadlineExceeded, OpAborted, StaleError, TooFewPeers
from collectives import ring
from peer.core.states import NodeState
from peer.sim.inputs import input_for, seed_for
from peer.swarm import Swarm

__all__ = ["AllReduceWorkload", "input_for", "run_allreduce", "seed_for"]

log = logging.getLogger(__name__)


@dataclass
class AllReduceWorkload:
    elems: int = 262144
    op: str = "sum"
    ops: Optional[int] = None        # stop after this many committed ops
    duration: Optional[float] = None  # or after this many seconds
    op_timeout: float = 60.0
    min_members: int = 2
    pause: float = 0.0                # seconds between ops (a slower, more readable demo)
    codec: Optional[str] = None       # compressed all-reduce (fp16, bf16, int8)


def run_allreduce(swarm: Swarm, w: AllReduceWorkload, record: Optional[IO[str]] = None,
                  progress: Optional[IO[str]] = None, stop: Optional[threading.Event] = None) -> dict[str, Any]:
    """Loop until ``w.ops``/``w.duration`` is reached or ``stop`` is set (then the caller leaves gracefully)."""
    start = time.monotonic()
    attempt = committed = aborted = 0
    seed = -1
    x: Optional[np.ndarray] = None
    op_start, epoch0 = 0.0, 0
    members0: list[str] = []
    while True:
        if stop is not None and stop.is_set():
            break
        if w.ops is not None and committed >= w.ops:
            break
        if w.duration is not None and time.monotonic() - start >= w.duration:
            break
        try:
            x = None
            if swarm.state in (NodeState.JOINING, NodeState.PENDING):
                # A rejoin that overran its wait is still under way: an op submitted now would be refused
                # (LocalError), so wait for the admission (or the StaleError that sends us to rejoin again).
                swarm.wait_admitted(timeout=w.op_timeout)
            if swarm.peers_pending:
                swarm.update_topology(timeout=w.op_timeout)
            seed = seed_for(swarm.id, attempt)
            attempt += 1
            x = input_for(seed, w.elems)
            op_start, epoch0, members0 = time.monotonic(), swarm.epoch, swarm.members
            metrics = swarm.comm.all_reduce(x, op=w.op, timeout=w.op_timeout, codec=w.codec)
            committed += 1
            _write(record, {"peer": swarm.id, "committed": True, "seed": seed,
                            "key": f"{metrics['epoch']}:{metrics['group']}:{metrics['seq']}",
                            "members": metrics["members"], "digest": ring.digest(x).hex(),
                            "result_sum": float(x.astype(np.float64).sum()), "t": time.time(),
                            "duration_s": metrics["duration_s"], "bytes_sent": metrics.get("bytes_sent", 0),
                            "coordinator": swarm.is_coordinator})
            if progress is not None:
                progress.write(f"[{swarm.id}] op {committed} committed epoch={metrics['epoch']} "
                               f"members={len(metrics['members'])} {metrics['duration_s'] * 1e3:.0f} ms\n")
                progress.flush()
        except TooFewPeers as exc:
            swarm.wait_for_partner(time.monotonic() + 0.5, since=exc.epoch)  # then check the stop conditions again
        except OpAborted as exc:
            aborted += 1
            # I2: the aborted op must have left our buffer exactly as it was (None: no buffer was involved,
            # e.g. a topology update was aborted).
            restored = None if x is None else x.tobytes() == input_for(seed, w.elems).tobytes()
            _write(record, {"peer": swarm.id, "committed": False, "error": type(exc).__name__,
                            "reason": exc.reason or str(exc), "seed": seed, "t": time.time(),
                            "key": _key_of(exc), "restored": restored, "epoch": epoch0, "members": members0,
                            "duration_s": round(time.monotonic() - op_start, 4)})
            if progress is not None:
                progress.write(f"[{swarm.id}] op aborted ({exc.reason or exc}); retrying\n")
                progress.flush()
        except DeadlineExceeded as exc:
            # The op (or topology update) overran even its abort grace: typed, recorded, and we go on with a
            # fresh buffer (the old one is never read again).
            aborted += 1
            _write(record, {"peer": swarm.id, "committed": False, "error": type(exc).__name__, "reason": str(exc),
                            "seed": seed, "t": time.time(), "key": "", "restored": None, "epoch": epoch0,
                            "members": members0, "duration_s": round(time.monotonic() - op_start, 4)})
        except StaleError as exc:
            log.warning("%s: %s; rejoining", swarm.id, exc)
            _write(record, {"peer": swarm.id, "event": "stale", "t": time.time(), "reason": str(exc)})
            try:
                swarm.rejoin(timeout=w.op_timeout)
            except (StaleError, DeadlineExceeded, CoordinatorUnavailable) as again:
                # Not admitted (e.g. no coordinator reachable yet): record it and try again next turn.
                _write(record, {"peer": swarm.id, "event": "rejoin_failed", "error": type(again).__name__,
                                "reason": str(again), "t": time.time()})
                time.sleep(0.5)
        if w.pause:
            time.sleep(w.pause)
    return {"peer": swarm.id, "committed": committed, "aborted": aborted, **swarm.stats}


def _key_of(exc: OpAborted) -> str:
    return exc.key


def _write(record: Optional[IO[str]], obj: dict[str, Any]) -> None:
    if record is not None:
        record.write(json.dumps(obj) + "\n")
        record.flush()
