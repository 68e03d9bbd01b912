"""The pre-registered CheckFree experiment (issue 12): rebuild lost pipeline stages from their neighbours vs
random re-init, copy, uniform average, checkpoint rollback and redundant computation, at toy scale.

A LLaMA-style byte-level LM (width 128, 8 blocks in 4 stages of 2 plus the embedding/head, context 128, Adam)
on the stdlib text (``examples.charlm.load_corpus``); see ``examples.checkfree_run`` for the training rules and
``examples.checkfree_analysis`` for the modeled clock, the baselines simulated from the no-failure curves, and
the report.

    # 1. learning rate, tuned on the no-failure run (short runs), and the one-member iteration time
    python -m examples.checkfree_experiment tune --lrs 5e-4 1e-3 2e-3 4e-3 --steps 300
    # 2. the trained arms (skips runs already in the JSONL; at most 2 such processes at once on a small box)
    nice -n 10 python -m examples.checkfree_experiment train --p 0.005 --seeds 0 --arms nofail cf-pre cf+ copy
    # 3. the report: examples/results/checkfree_summary.json, checkfree.png, the table on stdout
    python -m examples.checkfree_experiment analyze
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from examples.charlm import load_corpus
from examples.checkfree_model import ModelConfig
from examples.checkfree_run import TRAINED_ARMS, Member, Trainer

RESULTS = Path(__file__).resolve().parent / "results"
JSONL = RESULTS / "checkfree_runs.jsonl"
TUNE = RESULTS / "checkfree_tune.json"
P_VALUES = (0.0025, 0.005, 0.01)
STEPS = 2000
EVAL_EVERY = 50

log = logging.getLogger("checkfree")


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if not rec.get("partial"):
                keys.add(rec["key"])
    return keys


def measure_iteration(corpus: Any, c: ModelConfig, iters: int = 12) -> float:
    """Seconds of one no-failure iteration of one run (median; the first two are warm-up)."""
    tr = Trainer([Member("nofail", 0.0, 0, 1e-3)], corpus, c, iters)
    for t in range(iters):
        tr.step(t)
    return statistics.median(tr.step_seconds[2:])


def config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(width=args.width, block=args.ctx, hidden=args.hidden or 8 * round(args.width * 8 / 3 / 8))


def cmd_tune(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    corpus = load_corpus()
    c = config(args)
    t_iter = measure_iteration(corpus, c)
    log.info("one-run iteration: %.3f s (loaded machine)", t_iter)
    members = [Member("nofail", 0.0, args.seed, lr) for lr in args.lrs]
    tr = Trainer(members, corpus, c, args.steps)
    recs = tr.run(args.eval_every)
    out = {"config": asdict(c), "steps": args.steps, "seed": args.seed, "lrs": args.lrs, "iteration_seconds": t_iter,
           "iteration_note": "median wall time of one no-failure iteration of one run, measured once with "
                             "1 torch thread on a 2-core machine shared with other jobs (load average > 6)",
           "final_val": {str(r["member"]["lr"]): r["val"][-1][1] for r in recs},
           "val": {str(r["member"]["lr"]): r["val"] for r in recs}}
    if TUNE.exists():   # a second call with more rates adds to the first (same model, seed and steps)
        prev = json.loads(TUNE.read_text())
        if all(prev[k] == out[k] for k in ("config", "steps", "seed")):
            out["lrs"] = sorted(set(prev["lrs"]) | set(args.lrs))
            out["final_val"] = {**prev["final_val"], **out["final_val"]}
            out["val"] = {**prev["val"], **out["val"]}
            out["iteration_seconds_all"] = prev.get("iteration_seconds_all", [prev["iteration_seconds"]]) + [t_iter]
            out["iteration_seconds"] = prev["iteration_seconds"]          # measured once: the first call's
    out["best_lr"] = float(min(out["final_val"], key=lambda k: out["final_val"][k]))
    RESULTS.mkdir(exist_ok=True)
    TUNE.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("final_val", "best_lr", "iteration_seconds")}))


def cmd_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    c = config(args)
    if args.lr is not None:
        lr = args.lr
    else:
        tune = json.loads(TUNE.read_text())
        if tune["config"] != asdict(c):
            raise SystemExit(f"the tune step ran another model config: {tune['config']}")
        lr = tune["best_lr"]
    done = done_keys(args.jsonl)
    members = []
    pairs = [(a, int(s)) for a, s in (r.split("@") for r in args.runs)] if args.runs else \
        [(arm, seed) for seed in args.seeds for arm in args.arms]
    for arm, seed in pairs:
        if arm not in TRAINED_ARMS:
            raise SystemExit(f"unknown arm {arm!r}; trained arms: {TRAINED_ARMS}")
        m = Member(arm, 0.0 if arm == "nofail" else args.p, seed, lr)
        if m.key not in done and m not in members:
            members.append(m)
    if not members:
        print("nothing to do: every run is already in", args.jsonl)
        return
    log.info("training %d run(s) in lockstep: %s", len(members), ", ".join(m.key for m in members))
    tr = Trainer(members, load_corpus(), c, args.steps)
    progress = args.jsonl.with_name(f"checkfree_progress_{args.tag}.json") if args.tag else None
    t0 = time.time()
    recs = tr.run(args.eval_every, progress)
    args.jsonl.parent.mkdir(exist_ok=True)
    with args.jsonl.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)          # another train process may append at the same time
        for r in recs:
            r["wall_seconds_process"] = time.time() - t0
            f.write(json.dumps(r) + "\n")
        f.flush()
    if progress is not None and progress.exists():
        progress.unlink()
    print(f"wrote {len(recs)} run(s) to {args.jsonl}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from examples.checkfree_analysis import analyze
    args.out.mkdir(parents=True, exist_ok=True)
    analyze(args.jsonl, args.tune, args.out, args.steps, args.prefix)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--width", type=int, default=128)
        sp.add_argument("--ctx", type=int, default=128)
        sp.add_argument("--hidden", type=int, default=0, help="SwiGLU width (default about 8/3 of the width)")

    t = sub.add_parser("tune")
    model_args(t)
    t.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3])
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    r = sub.add_parser("train")
    model_args(r)
    r.add_argument("--p", type=float, default=0.005)
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--arms", nargs="+", default=list(TRAINED_ARMS))
    r.add_argument("--runs", nargs="+", default=[], help="arm@seed pairs (instead of --seeds x --arms)")
    r.add_argument("--lr", type=float, default=None, help="default: best_lr of the tune step")
    r.add_argument("--steps", type=int, default=STEPS)
    r.add_argument("--eval-every", type=int, default=EVAL_EVERY)
    r.add_argument("--jsonl", type=Path, default=JSONL)
    r.add_argument("--tag", default="", help="write partial progress to checkfree_progress_<tag>.json")
    a = sub.add_parser("analyze")
    a.add_argument("--jsonl", type=Path, default=JSONL)
    a.add_argument("--steps", type=int, default=STEPS)
    a.add_argument("--tune", type=Path, default=TUNE, help="the tune step's JSON (its iteration time)")
    a.add_argument("--out", type=Path, default=RESULTS, help="where the summary, table and PNG go")
    a.add_argument("--prefix", default="checkfree", help="their file names: PREFIX_summary.json, ...")
    args = ap.parse_args(argv)
    {"tune": cmd_tune, "train": cmd_train, "analyze": cmd_analyze}[args.cmd](args)


if __name__ == "__main__":
    main()
