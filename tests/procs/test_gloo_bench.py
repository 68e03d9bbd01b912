"""Tests for peer.bench.gloo: the Gloo all-reduce baseline runs, reports, and cleans up."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from peer.bench.gloo import run_gloo_allreduce


def _child_pids() -> set[int]:
    """PIDs whose parent is this process (zombies included, i.e. not yet reaped)."""
    me = os.getpid()
    kids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # process exited while we looked
            continue
        # Field 4 (ppid) follows "pid (comm) state"; comm may contain spaces.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me:
            kids.add(int(entry.name))
    return kids


@pytest.mark.timeout(120)
def test_two_peer_allreduce_reports_bandwidth_and_reaps_children() -> None:
    before = _child_pids()
    res = run_gloo_allreduce(2, 1 << 20, iters=2, warmup=1)
    assert set(res) == {"backend", "peers", "bytes", "seconds_per_op", "busbw_gbps"}
    assert res["backend"] == "gloo"
    assert res["peers"] == 2
    assert res["bytes"] == 1 << 20
    assert res["seconds_per_op"] > 0
    assert res["busbw_gbps"] > 0
    expected = 2 * (2 - 1) / 2 * (1 << 20) / res["seconds_per_op"] / 1e9
    assert res["busbw_gbps"] == pytest.approx(expected)
    assert _child_pids() <= before


@pytest.mark.timeout(120)
def test_timeout_kills_and_reaps_children() -> None:
    before = _child_pids()
    # Far too short for the workers to even import torch: must raise, not hang or leak.
    with pytest.raises(RuntimeError, match="timed out"):
        run_gloo_allreduce(2, 1 << 20, iters=2, warmup=1, timeout_s=0.5)
    assert _child_pids() <= before


@pytest.mark.timeout(180)
@pytest.mark.parametrize("insecure,retain_mb", [(True, 256), (False, 0)])
def test_swarmtrain_bench_reports_its_costs(insecure: bool, retain_mb: float) -> None:
    """``swarmtrain bench allreduce``'s own side: a correct result and the per-op costs it reports (page
    faults, commit wait and copy, peak memory), with and without the freed-buffer malloc settings."""
    from peer.bench.allreduce import swarmtrain_allreduce

    before = _child_pids()
    res = swarmtrain_allreduce(2, 8 << 20, iters=3, warmup=1, slice_bytes=1 << 20, digest=True, timeout=120,
                               insecure=insecure, retain_freed_mb=retain_mb)
    assert res["peers"] == 2 and res["seconds_per_op"] > 0 and res["rel_error"] < 1e-6
    assert res["page_faults_per_op"] >= 0 and res["commit_copy_s"] > 0 and res["commit_wait_s"] >= 0
    assert res["peak_mem_over_buffer"] >= 1.0  # the caller's buffer itself counts 1
    # the peak is started afresh when the buffer is made (Linux): start-up and imports must not count, and
    # what an 8 MiB all-reduce holds at once stays well under the tens of MiB a peer process starts with
    assert not res["peak_mem_since_start"] and res["peak_mem_over_buffer"] < 6
    # the phases, from every member's timeline on one clock: a member's ring part is shorter than an op, and
    # no verdict arrives before the last member has finished its part (the coordinator waits for all)
    assert 0 < res["ring_s"] < res["seconds_per_op"] and res["verdict_rtt_s"] >= 0
    assert res["start_skew_s"] >= 0 and res["done_skew_s"] >= 0 and res["verdict_skew_s"] >= 0
    assert _child_pids() <= before
