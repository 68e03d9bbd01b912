"""The CheckFree experiment's report: modeled clock, the simulated baselines, the claims, JSON, PNG, table.

Pre-registered definitions (fixed before any failure run was trained):

- **Modeled clock**, in units of one no-failure iteration ``T`` (measured once by ``tune``; hours = units * T /
  3600). Costs are ratios taken from the paper's 500M system (91 s per CheckFree iteration, ~30 s to recover a
  stage, 151 s per redundant iteration): a rebuild (any neighbour rule or random re-init) costs 30/91 T per
  failure event; a checkpoint rollback costs a restart of 30/91 T per failure event plus the lost progress; a
  checkpoint save costs 0.1 T (a full state of weights + Adam at 16 bytes/parameter written at about 1 GB/s);
  redundant computation runs every iteration at 1.65 T and never stalls.
- **Checkpoint rollback** is simulated as the paper does: replay the same seed's no-failure curve; a failure (any
  stage, same schedule as the trained arms, extended past the run) resets the progress to the last checkpoint.
  Intervals {10, 25, 50, 100} and Young-Daly ``sqrt(2 * save * MTBF)``.
- **Target**: the seed-mean no-failure validation loss at step 1500 (75 % of the run); steps to target by linear
  interpolation between evaluations (every 50 steps).
- **Loss jump**: loss on 8 fixed validation windows right after the rebuild minus right before it.
- **Steps to recover**: with the gap = this run's training loss minus the same seed's no-failure training loss
  on the same batch, the first k >= 0 after the failure at which the mean gap over the next 10 steps is no more
  than the mean gap over the 20 steps before the failure; censored when the next failure or the end comes first.
- **Claims**: (1) mean loss jump cf-pre < uniform < copy < random at every p run; (2) at p in {0.0025, 0.005},
  cf-pre and cf+ reach the target in less modeled time than the best rollback interval; (3) cf+ is no worse than
  cf-pre: seed-mean final loss within +0.01 nats/byte.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from examples.checkfree_run import failure_schedule

REBUILD_COST = 30.0 / 91.0
RESTART_COST = 30.0 / 91.0
SAVE_COST = 0.1
REDUNDANT_FACTOR = 1.65
INTERVALS = (10, 25, 50, 100)
TARGET_FRACTION = 0.75
RECOVER_BEFORE, RECOVER_WINDOW = 20, 10
STAGES = 4
NO_WORSE_TOL = 0.01
ARM_ORDER = ["nofail", "redundant", "random", "copy", "uniform", "cf-pre", "cf-post", "cf+"]


def crossing(val: Sequence[Sequence[float]], target: float) -> Optional[float]:
    """First step at which the (step, loss) curve reaches ``target`` (linear between evaluations)."""
    for (s0, v0), (s1, v1) in zip(val, val[1:]):
        if v0 <= target:
            return float(s0)
        if v1 <= target:
            return s0 + (v0 - target) / (v0 - v1) * (s1 - s0)
    return None


def curve_at(val: Sequence[Sequence[float]], step: float) -> float:
    xs = [s for s, _ in val]
    ys = [v for _, v in val]
    return float(np.interp(step, xs, ys))


def young_daly(p: float) -> int:
    mtbf = 1.0 / (1.0 - (1.0 - p) ** STAGES)          # iterations between failures of any stage
    return max(1, int(round(math.sqrt(2.0 * SAVE_COST * mtbf))))


def rollback(nofail_val: Sequence[Sequence[float]], p: float, seed: int, interval: int, steps: int,
             target_step: Optional[float]) -> dict[str, Any]:
    sched = np.asarray(failure_schedule(p, seed, STAGES, steps * 20).any(axis=1), dtype=bool)
    progress, ckpt, clock = 0, 0, 0.0
    jumps, lost = [], []
    reached_iter: Optional[int] = None
    reached_time: Optional[float] = None
    final: Optional[float] = None
    need = None if target_step is None else math.ceil(target_step)
    for w in range(len(sched)):
        if sched[w]:
            jumps.append(curve_at(nofail_val, ckpt) - curve_at(nofail_val, progress))
            lost.append(progress - ckpt)
            progress = ckpt
            clock += RESTART_COST
        progress += 1
        clock += 1.0
        if progress % interval == 0:
            ckpt = progress
            clock += SAVE_COST
        if w + 1 == steps:
            final = curve_at(nofail_val, min(progress, steps))
        if need is not None and reached_iter is None and progress >= need:
            reached_iter, reached_time = w + 1, clock
        if w + 1 >= steps and (reached_iter is not None or need is None):
            break
    return {"final": final, "steps_to_target": reached_iter, "time_to_target": reached_time,
            "jumps": jumps, "recover_steps": lost, "failures_in_run": int(sched[:steps].sum())}


def recover_steps(train: Sequence[float], ref: Sequence[float], events: Sequence[dict[str, Any]]
                  ) -> tuple[list[int], int]:
    gap = np.asarray(train) - np.asarray(ref)
    steps = [e["step"] for e in events]
    out, censored = [], 0
    for i, t in enumerate(steps):
        if t < 1:
            censored += 1
            continue
        pre = float(gap[max(0, t - RECOVER_BEFORE):t].mean())
        end = steps[i + 1] if i + 1 < len(steps) else len(gap)
        k_found = None
        for k in range(0, end - t - RECOVER_WINDOW + 1):
            if float(gap[t + k:t + k + RECOVER_WINDOW].mean()) <= pre:
                k_found = k
                break
        if k_found is None:
            censored += 1
        else:
            out.append(k_found)
    return out, censored


def stats(xs: Sequence[Optional[float]]) -> dict[str, Any]:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    missing = len(xs) - len(vals)
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": len(xs), "not_reached": missing}
    mean = statistics.fmean(vals) if missing == 0 else None          # None: some seed never got there
    return {"mean": mean, "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "min": min(vals),
            "max": max(vals), "n": len(xs), "not_reached": missing}


def analyze(jsonl: Path, tune_path: Path, out_dir: Path, steps: int, prefix: str = "checkfree") -> dict[str, Any]:
    recs = [json.loads(l) for l in jsonl.read_text().splitlines() if l.strip()]
    recs = [r for r in recs if not r.get("partial") and r["steps"] == steps]
    tune = json.loads(tune_path.read_text())
    T = float(tune["iteration_seconds"])
    hours = T / 3600.0
    nofail = {r["member"]["seed"]: r for r in recs if r["member"]["arm"] == "nofail"}
    if not nofail:
        raise SystemExit("no complete no-failure run yet")
    target_step = TARGET_FRACTION * steps
    target = statistics.fmean(curve_at(r["val"], target_step) for r in nofail.values())
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    ps = sorted({r["member"]["p"] for r in recs if r["member"]["arm"] != "nofail"})
    for p in ps:
        seeds = sorted({r["member"]["seed"] for r in recs if r["member"]["p"] == p} & set(nofail))
        for seed in seeds:
            ref = nofail[seed]
            ref_cross = crossing(ref["val"], target)
            runs.setdefault(("nofail", p), []).append(
                {"seed": seed, "final": ref["val"][-1][1], "steps_to_target": ref_cross,
                 "time_to_target": ref_cross, "jumps": [], "recover_steps": [], "censored": 0, "events": 0})
            runs.setdefault(("redundant", p), []).append(
                {"seed": seed, "final": ref["val"][-1][1], "steps_to_target": ref_cross,
                 "time_to_target": None if ref_cross is None else ref_cross * REDUNDANT_FACTOR, "jumps": [],
                 "recover_steps": [], "censored": 0, "events": 0})
            for r in recs:
                m = r["member"]
                if m["p"] != p or m["seed"] != seed or m["arm"] == "nofail":
                    continue
                cross = crossing(r["val"], target)
                n_before = sum(1 for e in r["events"] if cross is not None and e["step"] < cross)
                rec, cens = recover_steps(r["train_loss"], ref["train_loss"], r["events"])
                middle = [e["jump"] for e in r["events"] if all(0 < s < STAGES - 1 for s in e["stages"])]
                runs.setdefault((m["arm"], p), []).append(
                    {"seed": seed, "final": r["val"][-1][1], "steps_to_target": cross,
                     "time_to_target": None if cross is None else cross + n_before * REBUILD_COST,
                     "jumps": [e["jump"] for e in r["events"]], "middle_jumps": middle,
                     "recover_steps": rec, "censored": cens, "events": len(r["events"]),
                     "degraded": sum(1 for e in r["events"] for h in e["how"].values() if h[1])})
            for interval in (*INTERVALS, young_daly(p)):
                sim = rollback(ref["val"], p, seed, interval, steps, ref_cross)
                name = f"rollback-{interval}" if interval in INTERVALS else f"rollback-yd{interval}"
                if interval in INTERVALS and interval == young_daly(p):
                    name = f"rollback-{interval}"
                runs.setdefault((name, p), []).append(
                    {"seed": seed, "final": sim["final"], "steps_to_target": sim["steps_to_target"],
                     "time_to_target": sim["time_to_target"], "jumps": sim["jumps"],
                     "recover_steps": sim["recover_steps"], "censored": 0, "events": sim["failures_in_run"]})
    summary: dict[str, Any] = {"target_val_loss": target, "target_rule": f"seed-mean no-failure val loss at step "
                               f"{target_step:g}", "iteration_seconds": T, "steps": steps,
                               "costs_in_iterations": {"rebuild": REBUILD_COST, "restart": RESTART_COST,
                                                       "save": SAVE_COST, "redundant_factor": REDUNDANT_FACTOR},
                               "young_daly_interval": {str(p): young_daly(p) for p in ps},
                               "lr": tune.get("best_lr"), "lr_tried": tune.get("lrs"),
                               "seeds_by_p": {str(p): sorted({x["seed"] for x in runs[("nofail", p)]}) for p in ps},
                               "arms": {}}
    for (arm, p), rs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        summary["arms"].setdefault(arm, {})[str(p)] = {
            "seeds": [x["seed"] for x in rs],
            "final_loss": stats([x["final"] for x in rs]),
            "loss_jump": stats([statistics.fmean(x["jumps"]) if x["jumps"] else None for x in rs]),
            "loss_jump_middle_stages": stats([statistics.fmean(x["middle_jumps"]) if x.get("middle_jumps")
                                              else None for x in rs]),
            "steps_to_target": stats([x["steps_to_target"] for x in rs]),
            "hours_to_target": stats([None if x["time_to_target"] is None else x["time_to_target"] * hours
                                      for x in rs]),
            "steps_to_recover": stats([statistics.fmean(x["recover_steps"]) if x["recover_steps"] else None
                                       for x in rs]),
            "recover_censored": sum(x["censored"] for x in rs), "failure_events": sum(x["events"] for x in rs),
            "degraded_rebuilds": sum(x.get("degraded", 0) for x in rs)}
    summary["post_hoc_loss_jump_by_lost_stage"] = jump_by_stage(recs, ps)
    summary["claims"] = claims(summary, ps)
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{prefix}_summary.json").write_text(json.dumps(summary, indent=1))
    from examples.checkfree_report import plot, table
    text = table(summary, ps)
    (out_dir / f"{prefix}_table.md").write_text(text)
    print(text)
    plot(summary, recs, nofail, ps, hours, out_dir / f"{prefix}.png")
    return summary


def jump_by_stage(recs: Sequence[dict[str, Any]], ps: Sequence[float]) -> dict[str, Any]:
    """Post hoc (added after the first results, a breakdown of the same events, not an arm): the mean loss
    jump per lost stage over single-stage failure events, pooled over seeds; 'multi' for events that lost
    several stages at once."""
    out: dict[str, Any] = {"note": "post hoc breakdown: mean loss jump (and event count) by lost stage, "
                                   "single-stage events pooled over seeds; 'multi': several stages at once"}
    for p in ps:
        cells: dict[str, dict[str, list[float]]] = {}
        for r in recs:
            m = r["member"]
            if m["p"] != p or m["arm"] == "nofail":
                continue
            for e in r["events"]:
                where = str(e["stages"][0]) if len(e["stages"]) == 1 else "multi"
                cells.setdefault(m["arm"], {}).setdefault(where, []).append(e["jump"])
        out[str(p)] = {arm: {k: [round(statistics.fmean(v), 5), len(v)] for k, v in sorted(c.items())}
                       for arm, c in cells.items()}
    return out


def _mean(summary: dict[str, Any], arm: str, p: float, what: str) -> Optional[float]:
    cell = summary["arms"].get(arm, {}).get(str(p))
    if cell is None:
        return None
    st = cell[what]
    return math.inf if st["mean"] is None and st["not_reached"] else st["mean"]


def claims(summary: dict[str, Any], ps: Sequence[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    c1 = {}
    for p in ps:
        js = [_mean(summary, a, p, "loss_jump") for a in ("cf-pre", "uniform", "copy", "random")]
        c1[str(p)] = None if None in js else bool(js[0] < js[1] < js[2] < js[3])  # type: ignore[operator]
    out["1_jump_gradnorm_lt_uniform_lt_copy_lt_random"] = {
        "per_p": c1, "holds": None if None in c1.values() or not c1 else all(c1.values())}
    c2 = {}
    for p in [p for p in ps if p <= 0.005]:
        rb = [v for a in summary["arms"] if a.startswith("rollback")
              if (v := _mean(summary, a, p, "hours_to_target")) is not None]
        best = min(rb) if rb else math.inf
        cf, cfp = _mean(summary, "cf-pre", p, "hours_to_target"), _mean(summary, "cf+", p, "hours_to_target")
        c2[str(p)] = None if cf is None or cfp is None else bool(cf < best and cfp < best)
    out["2_checkfree_and_plus_beat_best_rollback_time_to_target"] = {
        "per_p": c2, "holds": None if None in c2.values() or not c2 else all(c2.values())}
    c3 = {}
    for p in ps:
        a, b = _mean(summary, "cf+", p, "final_loss"), _mean(summary, "cf-pre", p, "final_loss")
        c3[str(p)] = None if a is None or b is None else bool(a <= b + NO_WORSE_TOL)
    out["3_plus_no_worse_than_checkfree_final_loss"] = {
        "per_p": c3, "tolerance": NO_WORSE_TOL, "holds": None if None in c3.values() or not c3 else all(c3.values())}
    return out
