"""The peer side of ``swarmtrain bench allreduce``: time all-reduces among exactly ``expect`` members."""

from __future__ import annotations

import resource
import time
from typing import Any, Optional

import numpy as np

from peer.sim.workload import input_for
from peer.swarm import Swarm


def bench_worker(swarm: Swarm, elems: int, iters: int, warmup: int, expect: int,
              timeout: float = 300.0, codec: Optional[str] = None) -> dict[str, Any]:
    """Time ``iters`` all-reduces of ``elems`` float32 among exactly ``expect`` members, then measure the
    error of one all-reduce of random data against the exact (float64) sum."""
    swarm.wait_for_members(expect, timeout)
    # Everything but the buffer: the peak is measured against this. The process's own peak so far (start-up,
    # imports) can be higher than what it holds now: start the peak afresh from here, or it would count.
    peak_from_here = _reset_peak()
    rss_before = _rss_bytes()
    x = np.ones(elems, dtype=np.float32)
    for _ in range(warmup):
        swarm.comm.all_reduce(x, timeout=timeout, codec=codec)
        x.fill(1.0)
    if swarm.peers_pending:  # e.g. a faster ring order from the bandwidth probes: apply it before timing
        swarm.update_topology(timeout=timeout)
    swarm.comm.barrier(timeout=timeout)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    waits, copies = [], []
    timeline = []  # per op: started, our part done, verdict in, finished (the driver's monotonic clock)
    for _ in range(iters):
        m = swarm.comm.all_reduce(x, timeout=timeout, codec=codec)
        verdict = m.get("verdict_s", 0.0)
        waits.append(verdict - m.get("local_done_s", 0.0))  # our part done -> the verdict is in
        copies.append(m.get("duration_s", 0.0) - verdict)   # the commit: the result into the caller's buffer
        if "verdict_s" in m:
            t = m["started_at"]
            timeline.append((t, t + m["local_done_s"], t + verdict, t + m["duration_s"]))
    elapsed = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0  # pages mapped in while timed
    peak = _peak_rss_bytes() if peak_from_here else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ok = codec is not None or bool(np.all(x == np.float32(expect) ** iters))
    members = swarm.members
    y = input_for(members.index(swarm.id), elems)
    swarm.comm.all_reduce(y, timeout=timeout, codec=codec)
    exact = sum(input_for(i, elems).astype(np.float64) for i in range(len(members)))
    rel_error = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
    swarm.comm.barrier(timeout=timeout)
    return {"peer": swarm.id, "seconds_per_op": elapsed / iters, "correct": ok, "members": len(members),
            "rel_error": rel_error, "ring": members, "page_faults_per_op": faults / max(1, iters),
            "commit_wait_s": sum(waits) / max(1, len(waits)),
            "commit_copy_s": sum(copies) / max(1, len(copies)),
            "timeline": timeline,
            # peak resident memory while all-reducing, beyond what the process held before the buffer
            # existed, in units of the buffer (the caller's buffer itself counts 1)
            "peak_mem_over_buffer": (peak - rss_before) / max(1, x.nbytes),
            "peak_mem_since_start": not peak_from_here}  # True: the peak may predate the buffer (no /proc)


def _rss_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return 0


def _reset_peak() -> bool:
    """Start this process's peak resident set afresh from what it holds now (Linux >= 4.0: writing 5 to
    /proc/self/clear_refs resets VmHWM). False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return _peak_rss_bytes() > 0
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM) since the last ``_reset_peak``; 0 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0
