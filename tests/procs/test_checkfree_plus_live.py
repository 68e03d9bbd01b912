"""CheckFree+ live, with real processes (``examples.pipeline_lm --rebuild checkfree+``: the swapped order, the
(de)embedding copies on the swap partners, refreshed every committed step):

- the only replica of the first stage (which owns the embedding) is SIGKILLed while a joiner waits: the joiner
  takes stage 0, rebuilt by copying its swap partner's blocks plus the embedding copy stage 1 holds
  (``rebuild:swap-copy``); training goes on to the last step and the loss recovers;
- the only replicas of two adjacent stages are SIGKILLed together: each is rebuilt from its nearest surviving
  stage by a peer moved from a stage with two replicas, reported as degraded (``copy-nearest``); the run goes on.

Both check the rebuilt weights bit for bit against the pure rule recomputed here from the neighbours' weights
and norms as their own peers reported them (``tests.procs.test_checkfree_live.check_rebuilds``)."""

from __future__ import annotations

import time

import pytest

from peer.sim.procs import LocalProcs
from recovery.checkfree import CheckFree, embedding_copies
from tests.procs.test_checkfree_live import check_rebuilds, release
from tests.procs.test_pipeline_procs import Watch, start

pytestmark = pytest.mark.timeout(150)

WIDTH, VOCAB, BLOCK = 32, 256, 32
EMBED_BYTES = 4 * (VOCAB * WIDTH + BLOCK * WIDTH)      # tok.weight + pos, float32
HEAD_BYTES = 4 * (2 * WIDTH + VOCAB * WIDTH)          # ln_f weight and bias + head.weight


def test_first_stage_rebuilt_from_swap_partner(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=["--heartbeat-interval", "0.1"])
    join = [coord.hostport]
    dump = procs.workdir / "j-rebuilds.json"
    common = ["--stages", "4", "--steps", "24", "--rebuild", "checkfree+", "--admit-every", "1000",
              "--eval-every", "1000", "--lr", "3e-3", "--digests"]
    ps = [start(procs, f"s{i}", join, [*common, "--stage", str(i), "--wait-for", "4"]) for i in range(4)]
    j = start(procs, "j", join, [*common, "--dump-rebuild", str(dump)], hold=True)
    w = Watch([*ps, j])
    w.until(lambda: w.committed() >= 8 and bool(w.of("holding", "j")), 100, "step 8 and a loaded joiner", procs)
    release(procs, "j")
    w.until(lambda: bool(w.of("pending", "j")), 30, "the joiner to wait for admission", procs)
    procs.kill("s0")
    killed = time.time()
    survivors = ("s1", "s2", "s3", "j")
    w.until(lambda: all(w.of("done", n) for n in survivors), 100, "the run to finish", procs)
    jd = w.of("done", "j")[0]
    assert jd["stage"] == 0 and jd["steps"] == 24
    rebuilt = [r for r in jd["recoveries"] if r["stage"] == 0 and r["how"].startswith("rebuild")]
    assert rebuilt and rebuilt[0]["how"] == "rebuild:swap-copy" and rebuilt[0]["joiners"] == ["j"], rebuilt
    assert rebuilt[0]["from"] == [1] and "embedding" in rebuilt[0]["copy_revs"]
    assert rebuilt[0]["to_commit_s"] is not None and rebuilt[0]["to_commit_s"] < 20
    for n in ("s1", "s2", "s3"):
        assert [e["step"] for e in w.of("step", n) if e["committed"]] == list(range(24))
    losses = [(e["t"], e["loss"]) for e in w.of("step", "s1") if e["committed"]]
    before = [v for t, v in losses if t < killed][-3:]
    final = [v for t, v in losses][-3:]
    assert sum(final) / 3 <= sum(before) / 3 * 1.05, (before, final)
    docs = check_rebuilds(dump, w, CheckFree(plus=True), 4)
    assert [(d["stage"], d["how"], sorted(d["neighbours"])) for d in docs] == [(0, "rebuild:swap-copy", ["1"])]
    # the copies' cost as measured, against the pure accounting (embedding_copies)
    want = embedding_copies(4, EMBED_BYTES, HEAD_BYTES).extra_bytes
    assert want == {1: EMBED_BYTES, 2: HEAD_BYTES}
    for n, stage in (("s1", 1), ("s2", 2)):
        cp = w.of("done", n)[0]["copies"]
        assert cp["every"] == 1 and cp["held_bytes"] == want[stage] and cp["refreshes"] >= 24
        assert cp["last_refresh_bytes_received"] == want[stage]     # every tensor of the copy, each step
    assert jd["copies"]["held_bytes"] == 0 and w.of("done", "s3")[0]["copies"]["held_bytes"] == 0


def test_two_adjacent_stages_lost_degraded(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=["--heartbeat-interval", "0.1"])
    join = [coord.hostport]
    layout = {"a0": 0, "a1": 0, "b": 1, "c": 2, "d0": 3, "d1": 3}
    common = ["--stages", "4", "--steps", "16", "--rebuild", "checkfree+", "--admit-every", "1000",
              "--eval-every", "1000", "--lr", "3e-3", "--digests", "--micro-batches", "2", "--wait-for", "6"]
    ps = [start(procs, n, join, [*common, "--stage", str(s), "--dump-rebuild", str(procs.workdir / f"{n}.json")])
          for n, s in layout.items()]
    w = Watch(ps)
    w.until(lambda: w.committed() >= 5, 100, "step 5", procs)
    procs.kill("b")
    procs.kill("c")
    survivors = ("a0", "a1", "d0", "d1")
    w.until(lambda: all(w.of("done", n) for n in survivors), 100, "the run to finish", procs)
    done = {n: w.of("done", n)[0] for n in survivors}
    assert sorted(d["stage"] for d in done.values()) == [0, 1, 2, 3]
    assert all(d["steps"] == 16 for d in done.values())
    movers = {n: d["stage"] for n, d in done.items() if d["stage"] != layout[n]}
    assert sorted(movers.values()) == [1, 2], movers
    for n, stage in movers.items():
        rec = [r for r in done[n]["recoveries"] if r["stage"] == stage and r["how"].startswith("rebuild")]
        assert rec and rec[0]["how"] == "rebuild:copy-nearest (degraded)", rec
        assert rec[0]["from"] == ([0] if stage == 1 else [3])
        docs = check_rebuilds(procs.workdir / f"{n}.json", w, CheckFree(plus=True), 4)
        assert [(d["stage"], d["how"]) for d in docs] == [(stage, "rebuild:copy-nearest (degraded)")]
        # the moved peer now holds the copy its new stage keeps (embedding on 1, head on 2), refreshed
        cp = done[n]["copies"]
        assert cp["held_bytes"] == (EMBED_BYTES if stage == 1 else HEAD_BYTES) and cp["refreshes"] > 0
    for n in survivors:
        assert [e["step"] for e in w.of("step", n) if e["committed"]] == list(range(16))
