"""Does DiLoCo's claim hold at toy scale? 4 workers simulated in one process (exact averaging, no network).

    python -m examples.diloco_experiment --out runs/diloco_experiment --warm-arms 150:25,30:25,30:50
    python -m examples.diloco_experiment --out runs/diloco_experiment --plot-only     # table + plot again
    # then the outer momentum: for each momentum mu, outer lr = a * (1 - mu) for each amplification a
    python -m examples.diloco_experiment --out runs/diloco_experiment --lrs 0.004 --H 10,25,50 \
        --outer-momenta 0.5,0.7,0.8 --outer-amps 1,2,3 --warm-arms 30:25,30:50 --warm-outer-sweep
    # added after seeing those results (post hoc): H = 20 after 30 warm-up steps fills the 60-sync budget (59)
    python -m examples.diloco_experiment --out runs/diloco_experiment --lrs 0.004 --H "" \
        --outer-momenta 0.5,0.7 --outer-amps 1.5,2,3 --warm-arms 30:20 --warm-outer-sweep

(~60 runs of 0.5-2 CPU-minutes each, ~60 more for the momentum sweep; resumable: finished runs are kept in results.jsonl and skipped.)

Every arm sees the same data (each worker its own stream of random 64-byte windows of stdlib source, 16 per
step) and the same initial weights per seed; every multi-worker arm processes the same total tokens (4
workers x 600 steps). Inner optimizer AdamW (betas 0.9/0.95), 30 warm-up steps then cosine to 10 %. Arms:

- ``single``: one worker alone for 600 steps (a quarter of the tokens): what one machine reaches meanwhile;
- ``sync``: synchronous data parallel, gradients averaged every step (= one model on the 4 workers' batches);
- ``diloco-H``: H inner steps per worker, then the average pseudo-gradient takes an outer Nesterov step
  (momentum 0.9 unless ``--outer-momenta`` sweeps it; ``peer.diloco.outer_sgd``, the code the swarm runs);
- ``avg-H``: plain parameter averaging every H steps (outer lr 1, no momentum);
- ``*-warmW`` (``--warm-arms W:H``): the same after W synchronous steps (counted as W syncs; DiLoCo's outer
  lr 0.7 and momentum 0.9 unless ``--warm-outer-sweep``).

The inner learning rate (and DiLoCo's outer one, 0.2/0.4/0.7, and optionally its outer momentum) is swept on
seed 0, once more beyond any optimum at the edge of the grid (an outer configuration tried at one inner LR
only gets half and double that LR at its best); seed 1 runs at each arm's best configuration and the table reports the mean
over both. Pass: the best DiLoCo arm with >= 10x fewer syncs than ``sync`` closes >= 60 % of the gap between
``single`` and ``sync``, and Nesterov is no worse than plain averaging under the same schedule.
Writes results.jsonl, summary.json and loss.png (validation loss curves, best configuration per arm).
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

from examples.charlm import CharLM, Corpus, LMConfig, evaluate, load_corpus
from peer.train.diloco import flatten_params, load_params, outer_sgd

WORKERS, BATCH = 4, 16
STEPS = int(os.environ.get("DILOCO_EXPERIMENT_STEPS", "600"))  # steps per worker (--steps sets it)
MODEL = LMConfig(width=64, layers=2, heads=4, block=64)
EVAL_EVERY, VAL_WINDOWS = 100, 256
WARMUP = 30           # inner LR warm-up steps, then cosine decay to 10 %
# arms added after the planned ones' results were seen (labelled so in the plot and the results README)
POST_HOC = ("diloco-20-warm30", "avg-20-warm30")


@dataclass(frozen=True)
class Run:
    arm: str          # single | sync | diloco | avg
    H: int            # sync interval (1 for sync, 0 for single)
    lr: float         # inner learning rate
    seed: int
    warm_sync: int = 0  # synchronous steps before the first DiLoCo round (the pilot's warm-up)
    outer_lr: float = 0.7  # DiLoCo's outer learning rate (Nesterov); averaging uses 1.0
    outer_momentum: float = 0.9  # DiLoCo's outer (Nesterov) momentum; averaging uses 0 (rows without it: 0.9)

    @property
    def key(self) -> tuple[str, int, float, int, int, float, float]:
        d = self.arm == "diloco"
        return (self.arm, self.H, self.lr, self.seed, self.warm_sync, self.outer_lr if d else 0.0,
                self.outer_momentum if d else 0.0)

    @property
    def name(self) -> str:
        base = self.arm if self.arm in ("single", "sync") else f"{self.arm}-{self.H}"
        return base + (f"-warm{self.warm_sync}" if self.warm_sync else "")

    @property
    def syncs(self) -> int:
        if self.arm == "single":
            return 0
        if self.arm == "sync":
            return STEPS
        return self.warm_sync + math.ceil((STEPS - self.warm_sync) / self.H)


def lr_at(step: int, peak: float) -> float:
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, STEPS - WARMUP)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def run_one(run: Run, corpus: Corpus) -> dict[str, Any]:
    torch.manual_seed(run.seed)
    base = CharLM(MODEL)
    val = corpus.val_windows(MODEL.block, VAL_WINDOWS)
    n = 1 if run.arm == "single" else WORKERS
    gens = [torch.Generator().manual_seed(10_000 * run.seed + w) for w in range(n)]
    curve: list[tuple[int, float]] = [(0, evaluate(base, val))]
    t0 = time.time()
    model = base
    opt = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sync_steps = STEPS if run.arm in ("single", "sync") else run.warm_sync
    for step in range(sync_steps):
        xs, ys = zip(*(g_batch(corpus, g) for g in gens))
        x, y = torch.cat(xs), torch.cat(ys)                   # sync: the 4 workers' batches, averaged
        for group in opt.param_groups:
            group["lr"] = lr_at(step, run.lr)
        model.loss(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % EVAL_EVERY == 0:
            curve.append((step + 1, evaluate(model, val)))
    if run.arm in ("diloco", "avg"):
        # each worker starts from the (warmed-up) model with a copy of its inner optimizer state
        models = [copy.deepcopy(model) for _ in range(n)]
        params = [list(m.parameters()) for m in models]
        opts = []
        for m in models:
            o = torch.optim.AdamW(m.parameters(), lr=run.lr, betas=(0.9, 0.95), weight_decay=0.0)
            o.load_state_dict(copy.deepcopy(opt.state_dict()))
            opts.append(o)
        theta = flatten_params(params[0])
        mom = np.zeros_like(theta)
        outer_lr, mu, nesterov = (run.outer_lr, run.outer_momentum, True) if run.arm == "diloco" else (1.0, 0.0, False)
        step = sync_steps
        while step < STEPS:
            h = min(run.H, STEPS - step)
            for w in range(n):
                for k in range(h):
                    for group in opts[w].param_groups:
                        group["lr"] = lr_at(step + k, run.lr)
                    x, y = g_batch(corpus, gens[w])
                    models[w].loss(x, y).backward()
                    opts[w].step()
                    opts[w].zero_grad(set_to_none=True)
            deltas = [theta - flatten_params(p) for p in params]       # pseudo-gradients, (N,) each
            avg = np.asarray(np.mean(deltas, axis=0, dtype=np.float32))  # exact averaging of 4 workers
            outer_sgd(theta, mom, avg, outer_lr, mu, nesterov, np.empty_like(avg))
            for p in params:
                load_params(p, theta)
            prev, step = step, step + h
            if step // EVAL_EVERY > prev // EVAL_EVERY:
                curve.append((step, evaluate(models[0], val)))
        model = models[0]
    return {**asdict(run), "name": run.name, "syncs": run.syncs, "val_loss": evaluate(model, val),
            "curve": curve, "seconds": round(time.time() - t0, 1),
            "tokens": STEPS * BATCH * MODEL.block * n}


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


def outer_configs(outer_lrs: list[float], momenta: list[float], amps: list[float]) -> list[tuple[float, float]]:
    """(outer lr, momentum) pairs: every outer lr at every momentum, or, with ``amps``, outer lr = a * (1 - mu)
    for each a (a = lr / (1 - mu) is the steady-state amplification of a constant pseudo-gradient)."""
    if amps:
        return [(round(a * (1 - mu), 6), mu) for mu in momenta for a in amps]
    return [(o, mu) for mu in momenta for o in outer_lrs]


def grid(lrs: list[float], seed: int, hs: list[int], outer: list[tuple[float, float]]) -> list[Run]:
    runs = []
    for lr in lrs:
        runs += [Run("single", 0, lr, seed), Run("sync", 1, lr, seed)]
        runs += [Run("avg", h, lr, seed) for h in hs]
    for h in hs:  # DiLoCo by sync interval, the first H first
        runs += [Run("diloco", h, lr, seed, outer_lr=o, outer_momentum=mu) for lr in lrs for o, mu in outer]
    return runs


def warm_arms(spec: str, lr: float, seed: int, outer: list[tuple[float, float]]) -> list[Run]:
    """``"150:25,30:50"``: DiLoCo (at each (outer lr, momentum) of ``outer``) and plain averaging after WARM
    synchronous steps, with sync interval H, at one inner LR (not swept: the one tuned for the arms without
    warm-up)."""
    runs = []
    for item in filter(None, spec.split(",")):
        warm, h = (int(x) for x in item.split(":"))
        runs.append(Run("avg", h, lr, seed, warm_sync=warm))
        runs += [Run("diloco", h, lr, seed, warm, o, mu) for o, mu in outer]
    return runs


def _mu(r: dict[str, Any]) -> float:
    """A result row's outer momentum (rows written before it was a parameter ran at 0.9)."""
    return r.get("outer_momentum", 0.9)


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    d = r["arm"] == "diloco"
    return (r["arm"], r["H"], r["lr"], r["seed"], r["warm_sync"], r["outer_lr"] if d else 0.0, _mu(r) if d else 0.0)


def best_configs(results: list[dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Per arm, the run (inner LR, and outer LR and momentum for DiLoCo) with the lowest validation loss on the sweep seed."""
    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["seed"] == seed and (r["name"] not in best or r["val_loss"] < best[r["name"]]["val_loss"]):
            best[r["name"]] = r
    return best


def edge_extensions(results: list[dict[str, Any]], seed: int) -> list[Run]:
    """If an arm's best inner LR is the smallest or largest it was tried with (at its best outer LR and
    momentum), one more run a factor 2 beyond it: the sweep should bracket every arm's optimum. A best outer
    configuration tried at one inner LR only gets both (not for warm-up arms: their inner LR is not swept)."""
    out = []
    for name, b in best_configs(results, seed).items():
        tried = sorted({r["lr"] for r in results if r["name"] == name and r["seed"] == seed
                        and r.get("outer_lr") == b.get("outer_lr") and _mu(r) == _mu(b)})
        if len(tried) < 2 and b["warm_sync"]:
            continue
        for edge, lr in ((tried[0], b["lr"] / 2), (tried[-1], b["lr"] * 2)):
            if b["lr"] == edge:
                out.append(Run(b["arm"], b["H"], lr, seed, b["warm_sync"], b.get("outer_lr", 0.7), _mu(b)))
    return out


def summarize(results: list[dict[str, Any]], sweep_seed: int) -> dict[str, Any]:
    """The configuration picked per arm on the sweep seed, the mean over seeds there, and the pass criterion."""
    picked = best_configs(results, sweep_seed)
    table = {}
    for name, b in picked.items():
        rs = [r for r in results if _key(r)[:3] + _key(r)[4:] == _key(b)[:3] + _key(b)[4:]]
        sweep = {}
        for r in sorted(results, key=lambda r: (-_mu(r), r.get("outer_lr", 0), r["lr"])):
            if r["name"] == name and r["seed"] == sweep_seed:
                k = f"{r['lr']:g}" + (f"/{r['outer_lr']:g}/{_mu(r):g}" if r["arm"] == "diloco" else "")
                sweep[k] = round(r["val_loss"], 4)
        lrs = sorted({r["lr"] for r in results if r["name"] == name and r["seed"] == sweep_seed
                      and r.get("outer_lr") == b.get("outer_lr") and _mu(r) == _mu(b)})
        d = b["arm"] == "diloco"
        table[name] = {"lr": b["lr"], "outer_lr": b.get("outer_lr") if d else None,
                       "outer_momentum": _mu(b) if d else None,
                       "val_loss": float(np.mean([r["val_loss"] for r in rs])),
                       "seeds": {r["seed"]: round(r["val_loss"], 4) for r in rs}, "syncs": b["syncs"],
                       "sweep": sweep, "best_at_grid_edge": len(lrs) > 1 and b["lr"] in (lrs[0], lrs[-1])}
    out: dict[str, Any] = {"table": table, "sweep_seed": sweep_seed}
    if "single" in table and "sync" in table:
        single, sync = table["single"]["val_loss"], table["sync"]["val_loss"]
        gap = single - sync
        for name, row in table.items():
            row["gap_closed"] = (single - row["val_loss"]) / gap if gap > 0 else float("nan")
        cands = [n for n, r in table.items() if n.startswith("diloco") and r["syncs"] * 10 <= table["sync"]["syncs"]]
        best = max(cands, key=lambda n: table[n]["gap_closed"]) if cands else None
        nesterov_ok = {n: table[n]["val_loss"] <= table[n.replace("diloco", "avg")]["val_loss"]
                       for n in table if n.startswith("diloco") and n.replace("diloco", "avg") in table}
        out.update(best_diloco=best, best_gap_closed=table[best]["gap_closed"] if best else None,
                   nesterov_no_worse=nesterov_ok,
                   passed=bool(best and table[best]["gap_closed"] >= 0.6 and all(nesterov_ok.values())))
    return out


def print_table(summary: dict[str, Any]) -> None:
    t = summary["table"]
    order = sorted(t, key=lambda n: (n not in ("single", "sync"), "warm" in n, n.split("-")[0],
                                     int((n.split("-") + ["0"])[1]), n))
    print(f"\n{'arm':<20}{'lr':>15}{'val loss':>10}{'per seed':>16}{'syncs':>7}{'gap closed':>12}"
          f"   sweep (seed {summary['sweep_seed']}: inner lr[/outer lr/outer momentum] -> loss)")
    for n in order:
        r = t[n]
        seeds = "/".join(f"{v:.3f}" for v in r["seeds"].values())
        edge = " (best at grid edge)" if r["best_at_grid_edge"] else ""
        sweep = ", ".join(f"{k}: {v:.3f}" for k, v in r["sweep"].items())
        lr = f"{r['lr']:g}" + (f"/{r['outer_lr']:g}/{r.get('outer_momentum', 0.9):g}"
                               if r["outer_lr"] is not None else "")
        print(f"{n:<20}{lr:>15}{r['val_loss']:>10.3f}{seeds:>16}{r['syncs']:>7}"
              f"{100 * r.get('gap_closed', float('nan')):>11.0f}%   {sweep}{edge}")
    if "passed" in summary:
        print(f"\nbest DiLoCo with >= 10x fewer syncs: {summary['best_diloco']} closes "
              f"{100 * summary['best_gap_closed']:.0f}% of the single->sync gap; Nesterov no worse than "
              f"averaging: {summary['nesterov_no_worse']}; PASS={summary['passed']}")


def bytes_per_outer_step(n_params: int, workers: int = WORKERS) -> dict[str, int]:
    """Bytes each peer sends for one outer step's pseudo-gradient all-reduce (ring: 2(n-1)/n x payload),
    plus the 4-byte weight all-reduce; codecs change the payload width (int8: +8 header bytes per slice)."""
    ring = 2 * (workers - 1) / workers
    width = {"none": 4, "fp16": 2, "bf16": 2, "int8": 1}
    return {c: int(ring * (n_params * w + 4)) for c, w in width.items()}


def plot(results: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    """Validation loss against steps per worker, each arm at its picked configuration (mean of its seeds):
    arms without warm-up on the left, warm-up arms on the right, the single worker and data parallel on
    both as references. One hue per sync schedule; DiLoCo solid, plain averaging dashed in the same hue."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = summary["table"]
    hues = {"10": "C0", "25": "C2", "50": "C3", "20-warm30": "C6", "25-warm30": "C9", "50-warm30": "C4",
            "25-warm150": "C1"}
    fig = Figure(figsize=(13, 6.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, 2, sharey=True)
    for ax, warm in zip(panels, (False, True)):
        names = [n for n in table if n in ("single", "sync") or ("warm" in n) == warm]
        names.sort(key=lambda n: (n not in ("single", "sync"), n.split("-")[1:], n.startswith("avg")))
        for name in names:
            r = table[name]
            runs = [x for x in results if x["name"] == name and x["lr"] == r["lr"]
                    and (r["outer_lr"] is None
                         or (x.get("outer_lr") == r["outer_lr"] and _mu(x) == r["outer_momentum"]))]
            steps = [st for st, _ in runs[0]["curve"]][1:]  # from the first evaluation after step 0 (loss 5.36)
            ys = [float(np.mean([dict(x["curve"])[st] for x in runs])) for st in steps]
            schedule = name.partition("-")[2]
            color = {"single": "#888888", "sync": "black"}.get(name, hues.get(schedule, "C7"))
            label = (f"{name}: {r['syncs']} syncs, lr {r['lr']:g}"
                     + (f", outer lr {r['outer_lr']:g}, momentum {r['outer_momentum']:g}"
                        if r["outer_lr"] is not None else "")
                     + f" -> {r['val_loss']:.3f}" + (" (post hoc)" if name in POST_HOC else ""))
            ax.plot(steps, ys, color=color, linestyle="--" if name.startswith("avg") else "-",
                    linewidth=2.2 if name in ("single", "sync") else 1.5, marker="o", markersize=3, label=label)
        ax.set_title("after W synchronous warm-up steps (diloco-H-warmW)" if warm else "no warm-up", fontsize=10)
        ax.set_xlabel("steps per worker (16 windows of 64 bytes each)")
        ax.grid(color="#e6e6e6")
        ax.legend(fontsize=7.5, loc="upper right", title="arm: syncs, picked config -> final val loss",
                  title_fontsize=7.5)
    panels[0].set_ylabel("validation loss (nats/byte), mean of seeds")
    fig.suptitle(f"DiLoCo vs data parallel, {WORKERS} workers simulated in one process: validation loss "
                 f"(inner lr etc. picked on seed {summary['sweep_seed']}; solid: DiLoCo, dashed: plain averaging)",
                 fontsize=11)
    fig.savefig(path, format="png")


def _run_all(runs: list[Run], done: list[dict[str, Any]], res_path: Path, jobs: int) -> None:
    have = {_key(r) for r in done}
    todo = [r for r in runs if r.key not in have]
    todo.sort(key=lambda r: r.arm == "single")  # longest first, so the workers finish together
    print(f"{len(todo)} runs to do ({len(runs) - len(todo)} already in {res_path})", flush=True)
    if not todo:
        return
    t0 = time.time()
    with mp.get_context("spawn").Pool(jobs) as pool, open(res_path, "a") as f:
        for i, r in enumerate(pool.imap_unordered(_worker, todo)):
            f.write(json.dumps(r) + "\n")
            f.flush()
            done.append(r)
            print(f"[{time.time() - t0:6.0f}s] {i + 1}/{len(todo)} {r['name']:<18} lr={r['lr']:<7g} "
                  + (f"outer={r['outer_lr']:g}/{_mu(r):g} " if r["arm"] == "diloco" else "")
                  + f"seed={r['seed']} val={r['val_loss']:.3f} ({r['seconds']:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/diloco_experiment", help="output directory")
    ap.add_argument("--lrs", default="0.002,0.004,0.008", help="inner learning rates to sweep")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--H", default="10,25,50", help="sync intervals for DiLoCo and averaging (\"\": none, only the warm-up arms)")
    ap.add_argument("--outer-lrs", default="0.2,0.4,0.7", help="DiLoCo outer learning rates to sweep")
    ap.add_argument("--outer-momenta", default="0.9", help="DiLoCo outer (Nesterov) momenta to sweep")
    ap.add_argument("--outer-amps", default="", metavar="A,...",
                    help="instead of --outer-lrs: outer lr = A * (1 - momentum) for each A (A = lr / (1 - mu), "
                         "the steady-state amplification)")
    ap.add_argument("--warm-arms", default="", metavar="WARM:H,...",
                    help="extra arms: DiLoCo and averaging with sync interval H after WARM synchronous steps "
                         "(the pilot used 150:25)")
    ap.add_argument("--warm-lr", type=float, default=0.004, help="inner LR of the warm-up arms")
    ap.add_argument("--warm-outer-sweep", action="store_true",
                    help="sweep the warm-up arms' outer lr and momentum like the others' (default: 0.7, 0.9)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (1 thread each)")
    ap.add_argument("--steps", type=int, default=None, help="steps per worker (default 600; small for a smoke run)")
    ap.add_argument("--plot-only", action="store_true", help="re-render the table and plot from results.jsonl")
    a = ap.parse_args()
    if a.steps is not None:  # workers are spawned processes: they read it from the environment
        os.environ["DILOCO_EXPERIMENT_STEPS"] = str(a.steps)
        global STEPS
        STEPS = a.steps
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.jsonl"
    done = [json.loads(l) for l in res_path.read_text().splitlines() if l.strip()] if res_path.exists() else []
    seeds = [int(x) for x in a.seeds.split(",")]
    if not a.plot_only:
        # phase 1: the LR sweep on the first seed (extended once where an optimum sits at the grid's edge);
        # phase 2: the other seeds at each arm's best configuration
        floats = lambda s: [float(x) for x in filter(None, s.split(","))]  # noqa: E731
        outer = outer_configs(floats(a.outer_lrs), floats(a.outer_momenta), floats(a.outer_amps))
        sweep = grid(floats(a.lrs), seeds[0], [int(x) for x in filter(None, a.H.split(","))], outer)
        sweep += warm_arms(a.warm_arms, a.warm_lr, seeds[0], outer if a.warm_outer_sweep else [(0.7, 0.9)])
        _run_all(sweep, done, res_path, a.jobs)
        _run_all(edge_extensions(done, seeds[0]), done, res_path, a.jobs)
        picked = best_configs(done, seeds[0])
        confirm = [Run(b["arm"], b["H"], b["lr"], seed, b["warm_sync"], b.get("outer_lr", 0.7), _mu(b))
                   for seed in seeds[1:] for b in picked.values()]
        _run_all(confirm, done, res_path, a.jobs)
    summary = summarize(done, seeds[0])
    n_params = sum(p.numel() for p in CharLM(MODEL).parameters())
    summary["model_params"] = n_params
    summary["bytes_per_outer_step_per_peer"] = bytes_per_outer_step(n_params)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    print(f"\nbytes each peer sends per outer step (model {n_params} params, {WORKERS} peers): "
          f"{summary['bytes_per_outer_step_per_peer']}")
    plot(done, summary, out / "loss.png")
    print(f"wrote {out / 'summary.json'}, {out / 'loss.png'}")


if __name__ == "__main__":
    main()
