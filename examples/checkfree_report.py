"""The CheckFree experiment's table (markdown) and figure (matplotlib PNG) from the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

ORDER = ["nofail", "redundant", "random", "copy", "uniform", "cf-pre", "cf-post", "cf+"]


def _arms(summary: dict[str, Any]) -> list[str]:
    rest = sorted((a for a in summary["arms"] if a not in ORDER),
                  key=lambda a: (a.startswith("rollback-yd"), int(a.split("-")[-1].lstrip("yd"))))
    return [a for a in ORDER if a in summary["arms"]] + rest


def _fmt(st: dict[str, Any], digits: int = 3, reach: bool = False) -> str:
    if st["mean"] is None:
        if not reach:
            return "n/a"
        return f"not reached ({st['not_reached']}/{st['n']})"
    return f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"


def table(summary: dict[str, Any], ps: Sequence[float]) -> str:
    lines = [f"Target validation loss {summary['target_val_loss']:.4f} nats/byte ({summary['target_rule']}); "
             f"one iteration = {summary['iteration_seconds']:.3f} s (modeled clock; costs in iterations: "
             f"{summary['costs_in_iterations']}); Young-Daly intervals {summary['young_daly_interval']}.", ""]
    for p in ps:
        seeds = summary["seeds_by_p"][str(p)]
        lines += [f"### p = {p} (per stage per iteration), seeds {seeds}", "",
                  "| arm | final val loss | loss jump | jump (middle stages) | steps to target | hours to target "
                  "| steps to recover | events (censored) |",
                  "|---|---|---|---|---|---|---|---|"]
        for arm in _arms(summary):
            c = summary["arms"][arm].get(str(p))
            if c is None:
                continue
            lines.append(f"| {arm} | {_fmt(c['final_loss'], 4)} | {_fmt(c['loss_jump'], 4)} | "
                         f"{_fmt(c['loss_jump_middle_stages'], 4)} | {_fmt(c['steps_to_target'], 0, True)} | "
                         f"{_fmt(c['hours_to_target'], 3, True)} | {_fmt(c['steps_to_recover'], 1)} | "
                         f"{c['failure_events']} ({c['recover_censored']}) |")
        lines.append("")
    post = summary.get("post_hoc_loss_jump_by_lost_stage", {})
    for p in ps:
        cells = post.get(str(p), {})
        if not cells:
            continue
        keys = sorted({k for c in cells.values() for k in c})
        lines += [f"Post hoc breakdown, p = {p}: mean loss jump by lost stage (events), seeds pooled", "",
                  "| arm | " + " | ".join(f"stage {k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
        for arm in [a for a in ORDER if a in cells]:
            lines.append(f"| {arm} | " + " | ".join(
                f"{cells[arm][k][0]:.4f} ({cells[arm][k][1]})" if k in cells[arm] else "-" for k in keys) + " |")
        lines.append("")
    lines.append("Claims:")
    for name, c in summary["claims"].items():
        lines.append(f"- {name}: {c['holds']} (per p: {c['per_p']})")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], recs: list[dict[str, Any]], nofail: dict[int, dict[str, Any]],
         ps: Sequence[float], hours: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, len(ps), figsize=(5.5 * len(ps), 8), squeeze=False)
    colors = {"nofail": "k", "random": "tab:red", "copy": "tab:orange", "uniform": "tab:olive",
              "cf-pre": "tab:blue", "cf-post": "tab:cyan", "cf+": "tab:purple"}
    for j, p in enumerate(ps):
        ax = axes[0][j]
        for arm, col in colors.items():
            rs = [r for r in recs if r["member"]["arm"] == arm and (arm == "nofail" or r["member"]["p"] == p)
                  and r["member"]["seed"] in summary["seeds_by_p"][str(p)]]
            if not rs:
                continue
            steps = np.array([s for s, _ in rs[0]["val"]], dtype=float)
            mean = np.mean([[v for _, v in r["val"]] for r in rs], axis=0)
            ax.plot(steps, mean, color=col, label=arm, lw=1.2)
        ax.axhline(summary["target_val_loss"], color="gray", ls=":", lw=1, label="target")
        ax.set_title(f"p = {p}: validation loss (seed mean)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("nats / byte")
        ax.set_ylim(top=min(ax.get_ylim()[1], summary["target_val_loss"] + 1.5))
        ax.legend(fontsize=7)
        ax = axes[1][j]
        names = [a for a in _arms(summary) if str(p) in summary["arms"][a]]
        vals: list[Optional[float]] = [summary["arms"][a][str(p)]["hours_to_target"]["mean"] for a in names]
        ys = [np.nan if v is None else v for v in vals]
        ax.barh(range(len(names)), ys, color=[colors.get(a, "tab:gray") for a in names])
        for i, v in enumerate(vals):
            if v is None:
                ax.text(0, i, " not reached", va="center", fontsize=7)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("modeled hours to target (seed mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
