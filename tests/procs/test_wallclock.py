"""The wall-clock experiment's plumbing (examples/diloco_wallclock.py): one tiny arm with real peer processes
in network namespaces (skipped where namespaces cannot be created), and the claim logic on made-up curves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from examples.charlm import Corpus
from examples.diloco_wallclock import fill_curves, run_arm
from examples.wallclock_report import claims, report
from examples.wallclock_state import Evaluator, make_warm_start, save_corpus
from peer.sim.netns import leftovers, probe

NETNS_OK, NETNS_WHY = probe()


def tiny_corpus() -> Corpus:
    g = torch.Generator().manual_seed(0)
    text = torch.randint(32, 127, (60_000,), generator=g, dtype=torch.uint8)
    return Corpus(text[:50_000].clone(), text[50_000:].clone(), 1, 1)


@pytest.mark.timeout(150)
@pytest.mark.skipif(not NETNS_OK, reason=f"network namespaces unavailable: {NETNS_WHY}")
def test_one_tiny_arm_in_namespaces(tmp_path: Path) -> None:
    corpus = tiny_corpus()
    save_corpus(tmp_path / "corpus.npz", corpus)
    warm = make_warm_start(tmp_path / "warm.npz", corpus, steps=2)
    a = argparse.Namespace(peers=2, budget=4.0, snap_every=0.5, corpus=corpus, evaluator=Evaluator(corpus, warm))
    row = run_arm("diloco-10", "100mbit", a, warm, tmp_path)
    assert row["final_val"] is not None and len(row["curve"]) <= 3     # warm start, first and last snapshot
    fill_curves([row], 4.0, a.evaluator, points=4)
    assert row["errors"] == [], row["errors"]
    peers = row["per_peer"]
    assert len(peers) == 2 and all(p is not None for p in peers)
    for p in peers:
        assert p["wall_s"] >= 4.0 and 0 < p["utilisation"] <= 1 and p["steps"] >= 10 and p["steps"] % 10 == 0
        assert p["link_tx"] > 0                      # the pseudo-gradients crossed the shaped link
    assert peers[0]["steps"] == peers[1]["steps"]     # both stopped at the same sync boundary
    curve = row["curve"]
    assert curve[0]["t"] == 0.0 and len(curve) >= 2 and all(r["val"] > 0 for r in curve)
    assert row["final_val"] is not None and row["load_before"] >= 0
    # every namespace and link of the arm's fabric is gone
    assert leftovers(row["fabric"]) == []
    summary = report([row], 4.0, tmp_path)
    assert (tmp_path / "diloco_wallclock_loss.png").stat().st_size > 1000
    assert summary["claims"]["a"]["value"] is None    # no data-parallel arm ran: no target, no verdict


def _row(arm: str, curve: list[tuple[float, float]], util: float = 0.5) -> dict[str, Any]:
    pts = [{"t": t, "val": v, "samples": 64.0 * i, "steps": i, "syncs": i} for i, (t, v) in enumerate(curve)]
    return {"arm": arm, "link": "20mbit", "budget_s": 100.0, "curve": pts, "final_val": pts[-1]["val"],
            "utilisation": util}


def test_claims_from_curves() -> None:
    by = {(r["arm"], r["link"]): r for r in [
        _row("dp", [(0, 3.0), (100, 2.5)]), _row("ddp", [(0, 3.0), (100, 2.4)]),
        _row("diloco-50", [(0, 3.0), (30, 2.45), (45, 2.39), (100, 2.2)], util=0.8),
        _row("diloco-50-eager", [(0, 3.0), (100, 2.3)], util=0.97),
        _row("diloco-50-int8", [(0, 3.0), (40, 2.38), (100, 2.25)])]}
    c = claims(by, 100.0)
    assert c["target_loss"] == 2.4                     # the better data-parallel arm
    assert c["a"]["time_s"] == 45 and c["a"]["value"] is True
    assert c["b"]["value"] is True and c["b"]["goal_95_met"] is True
    assert c["c"]["loss"] == 2.4 and c["c"]["int8_s"] == 40 and c["c"]["value"] is True
    by[("diloco-50", "20mbit")] = _row("diloco-50", [(0, 3.0), (60, 2.41), (100, 2.35)], util=0.99)
    c = claims(by, 100.0)
    assert c["a"]["value"] is False and c["b"]["value"] is False
    assert c["c"]["fp32_s"] == 100 and c["c"]["value"] is True
