"""Sparse expert sync (SPES) against dense baselines at toy scale: the pre-registered loss experiment of
issue 13. 4 workers simulated in one process with exact averaging (no network), equal tokens.

    nice -n 10 python -m examples.experts_experiment                  # the sweep, then the second seed
    python -m examples.experts_experiment --plot-only                 # table + plot again
    python -m examples.experts_experiment --bytes                     # bytes per sync, live 4-peer runs

Model (``examples.moe_lm``): width 32, 2 layers, 8 SwiGLU experts (hidden 64) top-2, context 64, load-balance
and z-loss. Every worker its own stream of random 64-byte windows of stdlib source, 8 per step; every
multi-worker arm 4 workers x STEPS steps (``--steps``, default 100: scaled down to fit
the shared 2-core machine; with H = 100 that is one sync at the end). Inner AdamW (0.9, 0.95), 10 warm-up
steps, then cosine to 10 %. The inner LR is swept for every arm on seed 0 (0.004, 0.008, 0.016); seed 1
runs each arm at its best LR; the table reports the mean. Order (so that a run cut short still has two seeds):
both seeds at the middle LR, then the rest of the sweep, then seed 1 where an arm's best LR is another. Arms (H in {25, 100}):

- ``single``: one worker alone (a quarter of the tokens); ``sync``: data parallel, every step;
- ``avg-H``: full-parameter averaging every H; ``diloco-H``: full-parameter DiLoCo every H (outer Nesterov
  lr 1.0, momentum 0.5: the best low-sync setting of examples/diloco_experiment.py, fixed before this run);
- ``spes-H``: r = 1, plain averaging (the paper): 2 of 8 experts per layer per worker;
- ``spes_outer-H``: as spes, with the DiLoCo outer step (1.0 / 0.5) on the shared parameters;
- ``spes_r2-H``: r = 2 owners per expert (4 of 8 per worker), owners averaged;
- ``spes_merge-H``: spes + merge warm-up (alpha0 0.05, T = STEPS, k = 2 of 7, at every sync).

Ownership, the averaging order and the merge are the code the swarm runs (``peer.train.experts_own``,
``peer.train.experts_merge``, ``peer.train.outer``). Memory per peer: bytes of gradients + AdamW state of
what a worker trains (12 bytes per trainable parameter). The verdict is a finding, not a gate.
Writes examples/results/experts_runs.jsonl (resumable), experts_summary.json and experts_loss.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from examples.charlm import Corpus, load_corpus
from examples.moe_lm import MoEConfig, MoELM, evaluate
from peer.train.experts import ExpertLayout, expert_map
from peer.train.experts_merge import MergeWarmup, merge_layer
from peer.train.experts_own import owned_by, owners
from peer.train.outer import outer_sgd

WORKERS, BATCH = 4, 8
STEPS = int(os.environ.get("EXPERTS_EXPERIMENT_STEPS", "100"))
MODEL = MoEConfig(width=32, layers=2, heads=2, experts=8, top_k=2, expert_hidden=64, block=64)
EVAL_EVERY, VAL_WINDOWS, WARMUP = 25, 96, 10
OUTER_LR, OUTER_MU = 1.0, 0.5
MERGE_ALPHA0, MERGE_K = 0.05, 2
ARMS = ("single", "sync", "avg", "diloco", "spes", "spes_outer", "spes_r2", "spes_merge")
RESULTS = Path(__file__).resolve().parent / "results"
IDS = [f"w{i}" for i in range(WORKERS)]


@dataclass(frozen=True)
class Run:
    arm: str
    H: int        # 0 for single, 1 for sync
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return self.arm if self.arm in ("single", "sync") else f"{self.arm}-{self.H}"

    @property
    def syncs(self) -> int:
        return 0 if self.arm == "single" else STEPS if self.arm == "sync" else math.ceil(STEPS / self.H)


def lr_at(step: int, peak: float) -> float:
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, STEPS - WARMUP)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def memory_bytes(run: Run, lay: ExpertLayout) -> int:
    """Per worker: gradients + AdamW moments of what it trains (4 + 8 bytes per trainable parameter)."""
    if not run.arm.startswith("spes"):
        return 12 * lay.size
    table = owners(IDS, lay.layers, lay.n_experts, 2 if run.arm == "spes_r2" else 1)
    mine = owned_by(table, IDS[0])
    return 12 * (lay.n_shared + sum(lay.bounds[x][1] - lay.bounds[x][0] for x in mine))


def run_one(run: Run, corpus: Corpus) -> dict[str, Any]:
    torch.manual_seed(run.seed)
    base = MoELM(MODEL)
    val = corpus.val_windows(MODEL.block, VAL_WINDOWS)
    n = 1 if run.arm == "single" else WORKERS
    gens = [torch.Generator().manual_seed(10_000 * run.seed + w) for w in range(n)]
    curve: list[tuple[int, float]] = [(0, evaluate(base, val))]
    t0 = time.time()
    lay0 = ExpertLayout(base, expert_map(base))
    if run.arm in ("single", "sync"):
        opt = adamw(list(base.parameters()), run.lr)
        for step in range(STEPS):
            xs, ys = zip(*(g_batch(corpus, g) for g in gens))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, run.lr)
            base.loss(torch.cat(xs), torch.cat(ys)).backward()    # sync: the 4 workers' batches together
            opt.step()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % EVAL_EVERY == 0:
                curve.append((step + 1, evaluate(base, val)))
        final = base
    else:
        final = _local_sgd(run, corpus, base, gens, val, curve)
    return {**asdict(run), "name": run.name, "syncs": run.syncs, "val_loss": evaluate(final, val),
            "curve": curve, "seconds": round(time.time() - t0, 1), "memory_bytes": memory_bytes(run, lay0),
            "tokens": STEPS * BATCH * MODEL.block * n, "steps": STEPS}


def _local_sgd(run: Run, corpus: Corpus, base: MoELM, gens: list[torch.Generator],
               val: tuple[torch.Tensor, torch.Tensor], curve: list[tuple[int, float]]) -> MoELM:
    """avg / diloco / spes*: WORKERS models, H local steps each, then the sync."""
    models = [copy.deepcopy(base) for _ in range(WORKERS)]
    lays = [ExpertLayout(m, expert_map(m)) for m in models]
    spes = run.arm.startswith("spes")
    table = owners(IDS, lays[0].layers, lays[0].n_experts, 2 if run.arm == "spes_r2" else 1) if spes else {}
    opts = []
    for w, lay in enumerate(lays):
        trainable = lay.freeze(owned_by(table, IDS[w])) if spes else list(models[w].parameters())
        opts.append(adamw(trainable, run.lr))
    theta = lays[0].flatten()                                             # (N,) the synced weights
    S = lays[0].n_shared
    outer = run.arm in ("diloco", "spes_outer")
    mom = np.zeros(theta.size if run.arm == "diloco" else S, np.float32)
    merge = MergeWarmup(alpha0=MERGE_ALPHA0, T=STEPS, k=MERGE_K) if run.arm == "spes_merge" else None
    step, syncs = 0, 0
    while step < STEPS:
        h = min(run.H, STEPS - step)
        for w in range(WORKERS):
            for k in range(h):
                for group in opts[w].param_groups:
                    group["lr"] = lr_at(step + k, run.lr)
                x, y = g_batch(corpus, gens[w])
                models[w].loss(x, y).backward()
                opts[w].step()
                opts[w].zero_grad(set_to_none=True)
        deltas = np.stack([np.subtract(theta, lay.flatten()) for lay in lays])   # (W, N) pseudo-gradients
        if not spes:
            avg: np.ndarray = np.asarray(np.mean(deltas, axis=0, dtype=np.float32))
            if outer:
                outer_sgd(theta, mom, avg, OUTER_LR, OUTER_MU, True, np.empty_like(avg))
            else:
                np.subtract(theta, avg, out=theta)
        else:
            avg = np.asarray(np.mean(deltas[:, :S], axis=0, dtype=np.float32))
            if outer:
                outer_sgd(theta[:S], mom, avg, OUTER_LR, OUTER_MU, True, np.empty_like(avg))
            else:
                np.subtract(theta[:S], avg, out=theta[:S])
            for ex, own in table.items():
                lo, hi = lays[0].bounds[ex]
                rows = [IDS.index(o) for o in own]
                np.subtract(theta[lo:hi], np.mean(deltas[rows, lo:hi], axis=0, dtype=np.float32),
                            out=theta[lo:hi])
            syncs += 1
            if merge is not None and merge.due(syncs, step + h):
                for layer in range(lays[0].layers):
                    merge_layer([theta[slice(*lays[0].bounds[(layer, e)])] for e in range(lays[0].n_experts)],
                                merge.alpha(step + h), merge.k)
        for lay in lays:
            lay.load(theta)
        prev, step = step, step + h
        if step // EVAL_EVERY > prev // EVAL_EVERY:
            curve.append((step, evaluate(models[0], val)))
    return models[0]


def g_batch(corpus: Corpus, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return corpus.batch("train", BATCH, MODEL.block, g)


# ---------------------------------------------------------------------------------------------- driver

_CORPUS: Optional[Corpus] = None


def _worker(run: Run) -> dict[str, Any]:
    global _CORPUS
    torch.set_num_threads(1)
    if _CORPUS is None:
        _CORPUS = load_corpus()
    return run_one(run, _CORPUS)


def grid(lrs: list[float], seed: int, hs: list[int]) -> list[Run]:
    runs = [Run(a, 0 if a == "single" else 1, lr, seed) for lr in lrs for a in ("sync", "single")]
    return runs + [Run(a, h, lr, seed) for lr in lrs for h in hs for a in ARMS[2:]]


def best_configs(results: list[dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["seed"] == seed and (r["name"] not in best or r["val_loss"] < best[r["name"]]["val_loss"]):
            best[r["name"]] = r
    return best


def edge_extensions(results: list[dict[str, Any]], seed: int) -> list[Run]:
    """POST HOC (added after seeing the pre-registered sweep): for an arm whose best LR is the smallest or
    largest it was tried at, one more run a factor 2 beyond it."""
    out = []
    for name, b in best_configs(results, seed).items():
        tried = sorted({r["lr"] for r in results if r["name"] == name and r["seed"] == seed})
        if len(tried) > 1 and b["lr"] in (tried[0], tried[-1]):
            out.append(Run(b["arm"], b["H"], b["lr"] / 2 if b["lr"] == tried[0] else b["lr"] * 2, seed))
    return out


def summarize(results: list[dict[str, Any]], sweep_seed: int) -> dict[str, Any]:
    picked = best_configs(results, sweep_seed)
    table: dict[str, dict[str, Any]] = {}
    for name, b in picked.items():
        rs = [r for r in results if r["name"] == name and r["lr"] == b["lr"]]
        tried = sorted({r["lr"] for r in results if r["name"] == name and r["seed"] == sweep_seed})
        table[name] = {"lr": b["lr"], "val_loss": float(np.mean([r["val_loss"] for r in rs])),
                       "seeds": {str(r["seed"]): round(r["val_loss"], 4) for r in rs}, "syncs": b["syncs"],
                       "memory_bytes_per_peer": b["memory_bytes"],
                       "sweep": {f"{r['lr']:g}": round(r["val_loss"], 4) for r in results
                                 if r["name"] == name and r["seed"] == sweep_seed},
                       "best_at_grid_edge": len(tried) > 1 and b["lr"] in (tried[0], tried[-1])}
    out: dict[str, Any] = {"table": table, "sweep_seed": sweep_seed, "steps_per_worker": STEPS,
                           "workers": WORKERS, "batch": BATCH, "model": asdict(MODEL)}
    if "single" in table and "sync" in table:
        gap = table["single"]["val_loss"] - table["sync"]["val_loss"]
        for row in table.values():
            row["gap_closed"] = (table["single"]["val_loss"] - row["val_loss"]) / gap if gap > 0 else None
    return out


def order_key(n: str) -> tuple[int, int, int]:
    arm, _, h = n.partition("-")
    return (int(h or 0), ARMS.index(arm), 0)


def print_table(summary: dict[str, Any]) -> None:
    t = summary["table"]
    print(f"\n{'arm':<18}{'lr':>7}{'val loss':>10}{'per seed':>16}{'syncs':>7}{'gap closed':>12}{'mem/peer':>11}"
          f"   sweep (seed {summary['sweep_seed']}: lr -> loss)")
    for n in sorted(t, key=order_key):
        r = t[n]
        seeds = "/".join(f"{v:.3f}" for v in r["seeds"].values())
        gc = r.get("gap_closed")
        gap = f"{100 * gc:.0f}%" if gc is not None else "-"
        edge = " (best at grid edge)" if r["best_at_grid_edge"] else ""
        sweep = ", ".join(f"{k}: {v:.3f}" for k, v in r["sweep"].items())
        print(f"{n:<18}{r['lr']:>7g}{r['val_loss']:>10.3f}{seeds:>16}{r['syncs']:>7}{gap:>12}"
              f"{r['memory_bytes_per_peer'] / 1e6:>9.2f}MB   {sweep}{edge}")
    if "bytes_per_sync" in summary:
        print("\nbytes per sync per peer (live 4-peer in-process runs, mean over peers and syncs):")
        for arm, b in summary["bytes_per_sync"].items():
            print(f"  {arm:<12} sent {b['sent'] / 1e3:9.1f} kB   received {b['received'] / 1e3:9.1f} kB"
                  f"   ({b['what']})")


def plot(results: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = {"single": "grey", "sync": "black", "avg": "tab:blue", "diloco": "tab:orange", "spes": "tab:green",
              "spes_outer": "tab:red", "spes_r2": "tab:purple", "spes_merge": "tab:brown"}
    for ax, h in zip(axes, (25, 100)):
        for name, row in summary["table"].items():
            arm, _, hh = name.partition("-")
            if hh and int(hh) != h:
                continue
            rs = [r for r in results if r["name"] == name and r["lr"] == row["lr"]]
            steps = [s for s, _ in rs[0]["curve"]]
            ys = [float(np.mean([dict((int(a), b) for a, b in r["curve"])[s] for r in rs])) for s in steps]
            ax.plot(steps, ys, label=f"{name} lr={row['lr']:g}", color=colors[arm],
                    linestyle="--" if arm in ("single", "sync") else "-")
        ax.set_title(f"H = {h} (mean of seeds, best inner lr)")
        ax.set_xlabel("steps per worker")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("validation loss (nats/byte)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _run_all(runs: list[Run], done: list[dict[str, Any]], res_path: Path, jobs: int) -> None:
    have = {(r["arm"], r["H"], r["lr"], r["seed"]) for r in done}
    todo = [r for r in runs if (r.arm, r.H, r.lr, r.seed) not in have]
    print(f"{len(todo)} runs to do ({len(runs) - len(todo)} already in {res_path})", flush=True)
    if not todo:
        return
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool, open(res_path, "a") as f:
        for i, r in enumerate(pool.imap_unordered(_worker, todo)):
            f.write(json.dumps(r) + "\n")
            f.flush()
            done.append(r)
            print(f"[{time.time() - t0:6.0f}s] {i + 1}/{len(todo)} {r['name']:<16} lr={r['lr']:<7g} "
                  f"seed={r['seed']} val={r['val_loss']:.3f} ({r['seconds']:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS), help="output directory")
    ap.add_argument("--lrs", default="0.004,0.008,0.016")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--H", default="25,100")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=None, help="steps per worker (default 100)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--extend-edges", action="store_true",
                    help="POST HOC: one LR beyond the grid's edge where an arm's best sits there (then seed 1 "
                         "at a new best); reported in a separate table, the pre-registered one is unchanged")
    ap.add_argument("--bytes", action="store_true", help="measure bytes per sync per arm (live runs) and exit")
    a = ap.parse_args()
    if a.steps is not None:
        os.environ["EXPERTS_EXPERIMENT_STEPS"] = str(a.steps)
        global STEPS
        STEPS = a.steps
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "experts_runs.jsonl"
    bytes_path = out / "experts_bytes.json"
    if a.bytes:
        from examples.local_experts import measure_bytes
        bytes_path.write_text(json.dumps(measure_bytes(MODEL), indent=1))
        print(f"wrote {bytes_path}")
        return
    done = [json.loads(line) for line in res_path.read_text().splitlines() if line.strip()] \
        if res_path.exists() else []
    done = [r for r in done if r.get("steps", STEPS) == STEPS]
    seeds = [int(x) for x in a.seeds.split(",")]
    if not a.plot_only:
        lrs = [float(x) for x in a.lrs.split(",")]
        hs = [int(x) for x in a.H.split(",")]
        mid = lrs[len(lrs) // 2]
        _run_all([r for s in seeds for r in grid([mid], s, hs)], done, res_path, a.jobs)
        _run_all(grid([x for x in lrs if x != mid], seeds[0], hs), done, res_path, a.jobs)
        picked = best_configs(done, seeds[0])
        _run_all([Run(b["arm"], b["H"], b["lr"], s) for s in seeds[1:] for b in picked.values()], done,
                 res_path, a.jobs)
    lrs = [float(x) for x in a.lrs.split(",")]
    if a.extend_edges and not a.plot_only:
        pre = [r for r in done if r["lr"] in lrs]
        _run_all(edge_extensions(pre, seeds[0]), done, res_path, a.jobs)
        picked = best_configs(done, seeds[0])
        _run_all([Run(b["arm"], b["H"], b["lr"], s) for s in seeds[1:] for b in picked.values()], done,
                 res_path, a.jobs)
    summary = summarize([r for r in done if r["lr"] in lrs], seeds[0])
    if any(r["lr"] not in lrs for r in done):
        summary["post_hoc_edge_extension"] = summarize(done, seeds[0])["table"]
    if bytes_path.exists():
        summary["bytes_per_sync"] = json.loads(bytes_path.read_text())
    (out / "experts_summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    if "post_hoc_edge_extension" in summary:
        print("\nPOST HOC (added after seeing the results above): one LR beyond the grid edge")
        print_table({"table": summary["post_hoc_edge_extension"], "sweep_seed": seeds[0]})
    plot([r for r in done if r["lr"] in lrs], summary, out / "experts_loss.png")
    print(f"wrote {out / 'experts_summary.json'}, {out / 'experts_loss.png'}")


if __name__ == "__main__":
    main()
