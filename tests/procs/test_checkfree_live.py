"""CheckFree live, with real processes: the only replica of a middle stage is SIGKILLed while a joiner waits;
the joiner takes the stage, rebuilt from its neighbours' weights and gradient norms (fetched hash-verified
from their replicas), and training goes on until the swarm's last step; the loss recovers."""

from __future__ import annotations

import time

import pytest

from peer.sim.procs import LocalProcs
from tests.procs.test_pipeline_procs import Watch, start

pytestmark = pytest.mark.timeout(150)


def test_middle_stage_rebuilt_from_neighbours(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=["--heartbeat-interval", "0.1"])
    join = [coord.hostport]
    common = ["--stages", "3", "--steps", "30", "--rebuild", "checkfree", "--admit-every", "1000",
              "--eval-every", "10", "--lr", "3e-3"]
    ps = [start(procs, f"s{i}", join, [*common, "--stage", str(i), "--wait-for", "3"]) for i in range(3)]
    j = start(procs, "j", join, common, hold=True)
    w = Watch([*ps, j])
    w.until(lambda: w.committed() >= 10 and bool(w.of("holding", "j")), 100, "step 15 and a loaded joiner", procs)
    _release(procs, "j")
    w.until(lambda: bool(w.of("pending", "j")), 30, "the joiner to wait for admission", procs)
    procs.kill("s1")
    killed = time.time()
    w.until(lambda: all(w.of("done", n) for n in ("s0", "s2", "j")), 100, "the run to finish", procs)
    jd = w.of("done", "j")[0]
    assert jd["stage"] == 1 and jd["steps"] == 30
    rebuilt = [r for r in jd["recoveries"] if r["stage"] == 1]
    assert rebuilt and rebuilt[0]["how"] == "rebuild:checkfree" and rebuilt[0]["joiners"] == ["j"], rebuilt
    assert rebuilt[0]["to_commit_s"] is not None and rebuilt[0]["to_commit_s"] < 20
    # training went on: every step committed once on the survivors, and the loss recovered after the jump
    for n in ("s0", "s2"):
        assert [e["step"] for e in w.of("step", n) if e["committed"]] == list(range(30))
    losses = [(e["t"], e["loss"]) for e in w.of("step", "s0") if e["committed"]]
    before = [v for t, v in losses if t < killed][-3:]
    final = [v for t, v in losses][-3:]
    assert sum(final) / 3 <= sum(before) / 3 * 1.05, (before, final)


def _release(procs: LocalProcs, name: str) -> None:
    stdin = procs.procs[name].popen.stdin
    assert stdin is not None
    stdin.write("go\n")
    stdin.flush()
