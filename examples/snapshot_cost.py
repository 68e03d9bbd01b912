"""Step time with and without snapshots for the pipeline and for expert sync, measured in the same run.

    nice -n 10 python -m examples.snapshot_cost [--steps 40] [--repeats 2] [--every 5] [--sync-steps 5] [--json]

Two live in-process swarms over loopback (a coordinator and 2 peers each, as ``examples.local_experts``):

- pipeline: ``examples.pipeline_lm``'s LM split into 2 stages (1 replica each), a snapshot every
  ``--every`` committed steps (``resume_and_snapshot``: each peer its stage's weights and AdamW state);
- experts: ``examples.moe_lm``'s small MoE LM on ``ExpertSync`` (r = 1, a sync every ``--sync-steps``
  steps), a snapshot of every committed sync (``experts_snapshots.attach_snapshots``).

Each workload runs ``--repeats`` times without and with snapshots, alternating (so a drift in the machine's
load hits both), on fresh swarms; the step time is each peer's wall time over its training loop divided by
its steps (the first step, whose timing includes start-up, excluded). Prints per mode the mean ms/step, the
ratio with/without, and what the snapshotter spent copying (the part a step waits for).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from examples.charlm import LMConfig
from examples.local_experts import SMALL, LocalSwarm, _check, _form, _threads
from examples.moe_lm import MoELM
from examples.pipeline_lm import batches, make_stages, synthetic_corpus
from peer.swarm import Swarm
from peer.train.experts import ExpertSync, expert_map
from peer.train.experts_snapshots import attach_snapshots
from peer.train.pipeline import Pipeline
from peer.train.pipeline_snapshots import StageLayout, resume_and_snapshot
from recovery.snapshot_writer import Snapshotter

CORPUS = synthetic_corpus()


def _pipeline_peer(s: Swarm, stage: int, steps: int, every: int, snap_dir: Optional[Path]) -> dict[str, float]:
    cfg = LMConfig(block=64, width=64)
    stages = make_stages(cfg, 2, 1, seed=0)
    get_batch = batches(CORPUS, 4, cfg.block, seed=1)
    pipe = Pipeline(s, stages, lambda ps: torch.optim.AdamW(ps, 1e-3), micro_batches=2, example=get_batch(0, 0),
                    stage=stage, op_timeout=120, join_timeout=120)
    snaps = resume_and_snapshot(pipe, StageLayout.numbered(stages), None, snap_dir or "", every=every)
    try:
        pipe.step(get_batch)                    # start-up (and the first step's stage assignment)
        t0 = time.perf_counter()
        while pipe.committed < steps:
            pipe.step(get_batch)
        dt = time.perf_counter() - t0
    finally:
        if snaps is not None:
            snaps.close(120)
    return {"ms": 1000 * dt / (steps - 1), "copy_ms": 1000 * snaps.copy_seconds if snaps else 0.0,
            "write_ms": 1000 * snaps.write_seconds if snaps else 0.0,
            "written": len(snaps.written) if snaps else 0}


def _experts_peer(s: Swarm, index: int, steps: int, sync_steps: int, snap_dir: Optional[Path]
                  ) -> dict[str, float]:
    torch.manual_seed(0)
    model = MoELM(SMALL)
    opt = ExpertSync(model, lambda ps: torch.optim.AdamW(ps, 3e-3), s, experts=expert_map(model),
                     sync_steps=sync_steps, owners_per_expert=1, op_timeout=120, alone_wait=30, join_timeout=120)
    snaps = Snapshotter(snap_dir, every=1, keep=2, meta={"peer": s.id}) if snap_dir else None
    if snaps is not None:
        attach_snapshots(opt, snaps)
    gen = torch.Generator().manual_seed(100 + index)

    def step() -> None:
        x, y = CORPUS.batch("train", 8, SMALL.block, gen)
        model.loss(x, y).backward()
        opt.step(samples=len(x))
        opt.zero_grad()

    try:
        step()
        t0 = time.perf_counter()
        for _ in range(steps - 1):
            step()
        dt = time.perf_counter() - t0
        opt.finish()
    finally:
        if snaps is not None:
            snaps.close(120)
    return {"ms": 1000 * dt / (steps - 1), "copy_ms": 1000 * snaps.copy_seconds if snaps else 0.0,
            "write_ms": 1000 * snaps.write_seconds if snaps else 0.0,
            "written": len(snaps.written) if snaps else 0, "syncs": opt.syncs}


def _run(kind: str, steps: int, sync_steps: int, every: int, snap_root: Optional[Path]) -> list[dict[str, float]]:
    ls = LocalSwarm()
    try:
        peers = [ls.peer(f"p{i}") for i in range(2)]
        _form(ls, peers)
        dirs = [snap_root / f"{kind}-{p.id}" if snap_root else None for p in peers]
        fns: list[Callable[[], Any]]
        if kind == "pipeline":
            fns = [functools.partial(_pipeline_peer, p, i, steps, every, dirs[i]) for i, p in enumerate(peers)]
        else:
            fns = [functools.partial(_experts_peer, p, i, steps, sync_steps, dirs[i]) for i, p in enumerate(peers)]
        out = _threads(fns, 600)
        _check(out)
        return out
    finally:
        ls.close()


def measure(steps: int = 40, repeats: int = 2, sync_steps: int = 5, every: int = 5) -> dict[str, Any]:
    res: dict[str, Any] = {"steps": steps, "repeats": repeats, "sync_steps": sync_steps, "pipeline_every": every}
    for kind in ("pipeline", "experts"):
        ms: dict[str, list[float]] = {"none": [], "snapshots": []}
        copy, write, written = [], [], []
        for _ in range(repeats):
            ms["none"] += [r["ms"] for r in _run(kind, steps, sync_steps, every, None)]
            with tempfile.TemporaryDirectory() as tmp:
                rs = _run(kind, steps, sync_steps, every, Path(tmp))
            ms["snapshots"] += [r["ms"] for r in rs]
            copy += [r["copy_ms"] for r in rs]
            write += [r["write_ms"] for r in rs]
            written += [r["written"] for r in rs]
        none, snap = sum(ms["none"]) / len(ms["none"]), sum(ms["snapshots"]) / len(ms["snapshots"])
        res[kind] = {"none_ms": round(none, 2), "snapshots_ms": round(snap, 2), "ratio": round(snap / none, 3),
                     "none_runs_ms": [round(x, 2) for x in ms["none"]],
                     "snapshots_runs_ms": [round(x, 2) for x in ms["snapshots"]],
                     "copy_ms_per_peer_run": round(sum(copy) / len(copy), 2),
                     "write_ms_per_peer_run": round(sum(write) / len(write), 2),
                     "snapshots_written_per_peer_run": sum(written) / len(written)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m examples.snapshot_cost", description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sync-steps", type=int, default=5)
    ap.add_argument("--every", type=int, default=5, help="pipeline: a snapshot every K committed steps")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    res = measure(a.steps, a.repeats, a.sync_steps, a.every)
    if a.json:
        print(json.dumps(res))
        return
    for kind in ("pipeline", "experts"):
        r = res[kind]
        print(f"{kind:9s} no snapshots {r['none_ms']:8.2f} ms/step   snapshots {r['snapshots_ms']:8.2f} ms/step"
              f"   ratio {r['ratio']:.3f}   (per peer per run: copy {r['copy_ms_per_peer_run']:.1f} ms, "
              f"write thread {r['write_ms_per_peer_run']:.1f} ms, "
              f"{r['snapshots_written_per_peer_run']:.0f} snapshots written)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
