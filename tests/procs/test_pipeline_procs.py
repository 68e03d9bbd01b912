"""Pipeline peers as real processes (examples.pipeline_lm on a small generated corpus): a replica SIGKILLed
mid-step aborts the step everywhere, the retry commits on the survivors, every step commits exactly once and
the replicas stay bit-identical."""

from __future__ import annotations

import time

import pytest

from peer.sim.procs import LocalProcs
from tests.helpers import FAST_ARGS
from tests.pipeline_procs_helpers import Watch, start

pytestmark = pytest.mark.timeout(150)


def test_replica_sigkilled_mid_step(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    names = ["a0", "a1", "b0", "b1"]          # stage 0: a0 a1, stage 1: b0 b1
    ps = [start(procs, n, [coord.hostport], ["--stages", "2", "--steps", "16", "--stage", "0" if n[0] == "a"
                                              else "1", "--wait-for", "4"]) for n in names]
    w = Watch(ps)
    w.until(lambda: w.committed() >= 6, 90, "6 committed steps", procs)
    procs.kill("a1")                           # steps run back to back: the kill lands mid-step
    killed_at = time.time()
    w.until(lambda: all(w.of("done", n) for n in ("a0", "b0", "b1")), 90, "the survivors to finish", procs)
    for n in ("a0", "b0", "b1"):
        steps = w.of("step", n)
        committed = [e["step"] for e in steps if e["committed"]]
        assert committed == list(range(16)), committed          # each step committed exactly once
        aborted = [e for e in steps if not e["committed"]]
        assert aborted, f"{n}: the step in flight at the kill did not abort"
        # the aborted attempt's step is retried and committed after the kill, never half-applied
        assert all(e["step"] in committed for e in aborted)
        first_after = min(e["t"] for e in steps if e["committed"] and e["t"] > killed_at)
        assert first_after - killed_at < 20
    aborted_steps = {n: {e["step"] for e in w.of("step", n) if not e["committed"]} for n in ("a0", "b0", "b1")}
    assert aborted_steps["a0"] & aborted_steps["b0"] & aborted_steps["b1"]   # the same step, everywhere
    d = {n: w.of("done", n)[0] for n in ("a0", "b0", "b1")}
    assert d["b0"]["digest"] == d["b1"]["digest"]              # replicas bit-identical at the end
    assert d["a0"]["stage"] == 0 and d["b0"]["stage"] == 1
