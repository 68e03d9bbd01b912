"""Table, summary JSON (the three claims of issue 15) and plot of the wall-clock experiment's runs.

    from examples.wallclock_report import report
    report(rows, budget=240, out=Path("examples/results"))   # rows: diloco_wallclock_runs.jsonl

The claims, as pre-registered (the target loss is the best data-parallel arm's final loss at 20 Mbit/s,
whichever of ``dp`` and ``ddp`` is lower):
(a) at 20 Mbit/s DiLoCo H = 50 (sync, fp32) reaches the target in at most half the budget;
(b) eager has higher compute utilisation than sync at H = 50 (the issue's goal, >= 95 %, is reported beside);
(c) int8 reaches a given loss no later than fp32 (H = 50, sync). The given loss: the target when both reach
    it, else the higher of their two final losses (a loss both reach).
Times come from the snapshots (peer 0 writes one after each committed sync, or every few seconds), so a
time-to-loss is the first snapshot at or below it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from examples.wallclock_state import time_to

SLOW, FAST = "20mbit", "100mbit"


def _latest(rows: list[dict[str, Any]], budget: float) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r["budget_s"] == budget:
            out[(r["arm"], r["link"])] = r       # a later line replaces an earlier one
    return out


def _inside(r: dict[str, Any], budget: float) -> list[dict[str, Any]]:
    return [p for p in r.get("curve", []) if p["t"] <= budget]


def claims(by: dict[tuple[str, str], dict[str, Any]], budget: float) -> dict[str, Any]:
    dps = [by[(arm, SLOW)]["final_val"] for arm in ("dp", "ddp")
           if (arm, SLOW) in by and by[(arm, SLOW)]["final_val"] is not None]
    target: Optional[float] = min(dps) if dps else None
    out: dict[str, Any] = {"target_loss": target, "budget_s": budget}

    def t_to(arm: str, loss: Optional[float]) -> Optional[float]:
        r = by.get((arm, SLOW))
        return None if r is None or loss is None else time_to(_inside(r, budget), loss)

    t50 = t_to("diloco-50", target)
    out["a"] = {"claim": "at 20 Mbit/s DiLoCo H=50 reaches the best data-parallel final loss in <= half the budget",
                "time_s": t50, "half_budget_s": budget / 2,
                "value": None if target is None or ("diloco-50", SLOW) not in by else (t50 is not None and
                                                                                        t50 <= budget / 2)}
    sync, eager = by.get(("diloco-50", SLOW)), by.get(("diloco-50-eager", SLOW))
    us, ue = (sync or {}).get("utilisation"), (eager or {}).get("utilisation")
    out["b"] = {"claim": "eager has higher compute utilisation than sync at H=50 (goal >= 95 %)",
                "sync": us, "eager": ue, "value": None if us is None or ue is None else ue > us,
                "goal_95_met": None if ue is None else ue >= 0.95}
    fp, i8 = by.get(("diloco-50", SLOW)), by.get(("diloco-50-int8", SLOW))
    c: dict[str, Any] = {"claim": "int8 reaches a given loss no later than fp32 (H=50 sync, 20 Mbit/s)",
                         "value": None}
    if fp is not None and i8 is not None and fp["final_val"] is not None and i8["final_val"] is not None:
        both = target is not None and t_to("diloco-50", target) is not None and t_to("diloco-50-int8", target) \
            is not None
        loss = target if both else max(fp["final_val"], i8["final_val"])
        tf, ti = t_to("diloco-50", loss), t_to("diloco-50-int8", loss)
        c.update({"loss": loss, "loss_is": "target" if both else "the higher final loss of the two",
                  "fp32_s": tf, "int8_s": ti, "value": ti is not None and (tf is None or ti <= tf)})
    out["c"] = c
    return out


def report(rows: list[dict[str, Any]], budget: float, out: Path) -> dict[str, Any]:
    by = _latest(rows, budget)
    cl = claims(by, budget)
    target = cl["target_loss"]
    arms: dict[str, Any] = {}
    for (arm, link), r in by.items():
        peers = [p for p in r.get("per_peer", []) if p]
        arms[f"{arm}@{link}"] = {
            "arm": arm, "link": link, "final_loss": r["final_val"], "final_t": r.get("final_t"),
            "final_samples": r.get("final_samples"),
            "time_to_target_s": None if target is None else time_to(_inside(r, budget), target),
            "compute_utilisation": r.get("utilisation"),
            "steps_per_peer": [p["steps"] for p in peers], "syncs": max((p["syncs"] for p in peers), default=0),
            "link_tx_mb_per_peer": round(sum(p["link_tx"] for p in peers) / max(1, len(peers)) / 1e6, 1),
            "load_before": r.get("load_before"), "load_after": r.get("load_after"), "errors": r.get("errors", [])}
    summary = {"issue": 15, "budget_s": budget, "arms": arms, "claims": cl,
               "command": "python -m examples.diloco_wallclock" + ("" if budget == 240 else f" --budget {budget:g}")}
    (out / "diloco_wallclock_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print_table(summary)
    plot(by, budget, target, out / "diloco_wallclock_loss.png")
    return summary


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(summary: dict[str, Any]) -> None:
    cl = summary["claims"]
    print(f"\nwall-clock budget {summary['budget_s']:g} s per arm; target = best data-parallel final loss at "
          f"20 Mbit/s = {_fmt(cl['target_loss'], '.3f')}")
    print(f"{'arm':18s} {'link':8s} {'final val':>9s} {'t->target':>9s} {'util':>6s} {'steps/peer':>10s} "
          f"{'syncs':>6s} {'samples':>9s} {'MB sent':>8s} {'load':>10s}")
    for key in sorted(summary["arms"], key=lambda k: (summary["arms"][k]["link"] != SLOW, k)):
        r = summary["arms"][key]
        steps = r["steps_per_peer"]
        print(f"{r['arm']:18s} {r['link']:8s} {_fmt(r['final_loss'], '9.3f')} "
              f"{_fmt(r['time_to_target_s'], '9.1f')} {_fmt(r['compute_utilisation'], '6.1%')} "
              f"{(str(min(steps)) if steps else '-'):>10s} {r['syncs']:6d} {_fmt(r['final_samples'], '9.0f')} "
              f"{r['link_tx_mb_per_peer']:8.1f} {_fmt(r['load_before'], '4.1f')}/{_fmt(r['load_after'], '4.1f')}"
              + (f"  errors: {len(r['errors'])}" if r["errors"] else ""))
    for k in ("a", "b", "c"):
        c = cl[k]
        detail = {kk: v for kk, v in c.items() if kk not in ("claim", "value")}
        print(f"({k}) {c['claim']}: {c['value']}  {json.dumps(detail)}")


def plot(by: dict[tuple[str, str], dict[str, Any]], budget: float, target: Optional[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(13, 5))
    colours = {"dp": "black", "ddp": "grey", "diloco-10": "tab:blue", "diloco-50": "tab:orange",
               "diloco-50-eager": "tab:green", "diloco-50-int8": "tab:red"}
    for (arm, link), r in sorted(by.items()):
        pts = _inside(r, budget)
        if not pts:
            continue
        style = "-" if link == SLOW else "--"
        label = f"{arm} @ {link}"
        ax_t.plot([p["t"] for p in pts], [p["val"] for p in pts], style, color=colours.get(arm), label=label)
        ax_s.plot([p["samples"] for p in pts], [p["val"] for p in pts], style, color=colours.get(arm), label=label)
    for ax in (ax_t, ax_s):
        if target is not None:
            ax.axhline(target, color="black", linewidth=0.6, linestyle=":")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    ax_t.set_xlabel("wall-clock since the common start (s)")
    ax_s.set_xlabel("samples (64-byte windows, all peers) in the delivered weights")
    ax_t.axvline(budget / 2, color="black", linewidth=0.6, linestyle="-.")
    ax_t.set_title("4 peers, each in its own namespace; tbf links (solid 20 Mbit/s, dashed 100)")
    ax_s.set_title("same runs against samples")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
