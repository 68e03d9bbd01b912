"""CheckFree live, with real processes: the only replica of a middle stage is SIGKILLed while a joiner waits;
the joiner takes the stage, rebuilt from its neighbours' weights and gradient norms (fetched hash-verified
from their replicas), and training goes on until the swarm's last step; the loss recovers. The rebuilt weights
are bit for bit what the pure rule computes from the neighbours' weights and norms (``check_rebuilds``)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from examples.charlm import LMConfig
from examples.pipeline_lm import make_stages
from peer.sim.procs import LocalProcs
from peer.train.pipeline import weights_digest
from recovery.checkfree import CheckFree
from recovery.rebuild import NeighbourState
from tests.procs.test_pipeline_procs import Watch, start

pytestmark = pytest.mark.timeout(150)


def test_middle_stage_rebuilt_from_neighbours(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=["--heartbeat-interval", "0.1"])
    join = [coord.hostport]
    dump = procs.workdir / "j-rebuilds.json"
    common = ["--stages", "3", "--steps", "30", "--rebuild", "checkfree", "--admit-every", "1000",
              "--eval-every", "10", "--lr", "3e-3", "--digests"]
    ps = [start(procs, f"s{i}", join, [*common, "--stage", str(i), "--wait-for", "3"]) for i in range(3)]
    j = start(procs, "j", join, [*common, "--dump-rebuild", str(dump)], hold=True)
    w = Watch([*ps, j])
    w.until(lambda: w.committed() >= 10 and bool(w.of("holding", "j")), 100, "step 15 and a loaded joiner", procs)
    release(procs, "j")
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
    # bit for bit: the rule recomputed here from the neighbours' weights and norms as their own peers had them
    docs = check_rebuilds(dump, w, CheckFree(), 3)
    assert [(d["stage"], d["how"]) for d in docs] == [(1, "rebuild:checkfree")]
    assert sorted(docs[0]["neighbours"]) == ["0", "2"]


def release(procs: LocalProcs, name: str) -> None:
    stdin = procs.procs[name].popen.stdin
    assert stdin is not None
    stdin.write("go\n")
    stdin.flush()


def decode(arrays: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    return {n: np.frombuffer(base64.b64decode(v["b64"]), dtype=np.dtype(v["dtype"])).reshape(v["shape"]).copy()
            for n, v in arrays.items()}


def check_rebuilds(path: Path, w: Watch, rule: CheckFree, num_stages: int, width: int = 32,
                   block: int = 32) -> list[dict[str, Any]]:
    """Every rebuild in the rebuilding peer's dump (``--dump-rebuild``) against the other peers' reports
    (``--digests``): (1) each neighbour input it used is, by SHA-256, the weights that neighbour's own peers
    reported at the last committed step before the rebuild, with the gradient norms of that step's commit
    vote; (2) each (de)embedding copy it used is the owner's weights at the copy's refresh point, by the
    owner's own report, at most one step old; (3) the pure rule, recomputed here from those inputs, gives
    weights whose SHA-256 is the one the rebuilder loaded, and the same rule case."""
    docs: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    assert docs, "no rebuild was dumped"
    model = make_stages(LMConfig(block=block, width=width), num_stages, 1, 0)
    committed = [e for e in w.of("step") if e["committed"]]
    for rb in docs:
        c, s = rb["step"], rb["stage"]
        last = [e for e in committed if e["step"] == c - 1]
        assert last, f"no report of step {c - 1}"
        neighbours: dict[int, NeighbourState] = {}
        for key, nb in rb["neighbours"].items():
            j = int(key)
            weights, extra = decode(nb["weights"]), decode(nb["extra"])
            own = {e["wdigest"] for e in last if e["stage"] == j}
            assert own == {weights_digest(weights)}, (j, own)
            assert [nb["grad_norm"], nb["grad_norm_clipped"]] == last[0]["norms"][j]
            assert not nb["rebuilt"]
            for layer, rev in rb["copy_revs"].items():
                attr = "edge_in" if layer == "embedding" else "edge_out"
                part = {n: a for n, a in extra.items() if n.startswith(attr + ".")}
                assert part and c - 1 <= rev <= c, (layer, rev, c)
                owner = {e["edigest"][attr] for e in committed if e["step"] == rev - 1 and attr in e["edigest"]}
                assert owner == {weights_digest(part)}, (layer, rev)
            neighbours[j] = NeighbourState(j, weights, nb["grad_norm"], nb["grad_norm_clipped"], nb["rebuilt"],
                                           nb["swap_partner"], extra)
        shapes = {n: tuple(p.shape) for n, p in model[s].named_parameters()}
        expect = rule.rebuild(s, num_stages, shapes, neighbours)
        assert weights_digest(expect.weights) == rb["rebuilt_digest"]
        assert rb["how"] == f"rebuild:{expect.how}" + (" (degraded)" if expect.degraded else "")
    return docs
