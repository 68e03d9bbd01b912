"""A timeline of a simulated run (``swarmtrain simulate --png``), drawn with matplotlib (Agg, no display).

Three panels share one time axis, in seconds since the fault window opened (the ``start`` record; shaded
grey before it and after the ``end`` record):

- peers: one row per peer process (and one for the standalone coordinator when a fault hits it): live,
  stopped (SIGSTOP), cut off (partition), a slow link (``slow`` until its ``fault_end``); how it went
  down (killed or crashed: a red cross; left or exited: a grey bar). Each fault is a marker on its
  target's row and a dotted line through every panel, labelled above the panels while they stay readable.
- members per op: one dot per committed op at its end time and member count, a red cross per aborted one
  (a drop shows when the swarm dropped a member, not when the process died).
- op duration: seconds from the first member starting an op to the last one finishing it (log scale).

Only the history is read (the records ``peer.sim.history`` documents), so a run can be re-drawn offline.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Optional

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

DPI = 100
MAX_FAULT_LABELS = 30      # more faults than this: markers and the legend only, no text per fault
STATE_COLORS = {"live": "#3caa50", "stopped": "#e6c828", "cut": "#f08220"}
STATE_OF = {"up": "live", "resumed": "live", "healed": "live", "stopped": "stopped", "cut": "cut"}
SLOW_COLOR = "#3a6fd8"
FAULT_COLORS = {"kill": "#c81e1e", "kill_coordinator": "#7a0a0a", "stall": "#b8960c", "leave": "#707070",
                "join": "#1f8a3a", "partition": "#e0701a", "slow": SLOW_COLOR, "reset": "#8c3cb4",
                "truncate": "#b4489c", "corrupt": "#d03c8c", "delay": "#1aa0b4", "skipped": "#b0b0b0"}
FAULT_MARKERS = {"kill": "X", "kill_coordinator": "X", "stall": "s", "leave": "v", "join": "^",
                 "partition": "D", "slow": ">", "reset": "*", "truncate": "P", "corrupt": "*", "delay": "d"}


def write_timeline(path: str | Path, history: list[dict[str, Any]], width: int = 1400) -> None:
    """Draw ``history`` (simulator records) into the PNG file ``path``, ``width`` pixels wide."""
    times = [float(h["t"]) for h in history if "t" in h] + [float(h["t_end"]) for h in history if "t_end" in h]
    if not times:
        raise ValueError("empty history: nothing to draw")
    t0 = next((float(h["t"]) for h in history if h.get("type") == "start"), min(times))
    t_end = next((float(h["t"]) for h in history if h.get("type") == "end"), None)
    lo, hi = min(times) - t0, max(times) - t0
    if hi - lo < 1e-3:
        hi = lo + 1.0

    faults = [h for h in history if h.get("type") == "fault"]
    rows = _rows(history, faults)
    labelled = bool(faults) and len(faults) <= MAX_FAULT_LABELS
    fig = Figure(figsize=(width / DPI, 1.6 + (0.9 if labelled else 0.0) + 0.32 * len(rows) + 2.6), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(3, 1, height_ratios=[max(len(rows), 2) * 0.32, 1.3, 1.3])
    ax_peers = fig.add_subplot(grid[0])
    ax_members = fig.add_subplot(grid[1], sharex=ax_peers)
    ax_dur = fig.add_subplot(grid[2], sharex=ax_peers)
    axes = (ax_peers, ax_members, ax_dur)

    _draw_peers(ax_peers, history, rows, t0, hi)
    _draw_ops(ax_members, ax_dur, history, t0)
    for ax in axes:
        ax.set_xlim(lo, hi + 0.01 * (hi - lo))
        ax.grid(axis="x", color="#e4e4e4", linewidth=0.8)
        ax.set_axisbelow(True)
        if lo < 0:
            ax.axvspan(lo, 0, color="#f0f0f0", zorder=0)
        if t_end is not None and t_end - t0 < hi:
            ax.axvspan(t_end - t0, hi + 0.01 * (hi - lo), color="#f0f0f0", zorder=0)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    ax_dur.set_xlabel(textwrap.fill("time since the fault window opened (s); grey: before it opened and after it "
                                    "closed", width=max(30, width // 8)))
    _draw_faults(axes, faults, rows, t0)

    title = "swarmtrain simulate: peers, ops and faults over time"
    meta = next((h for h in history if h.get("type") == "meta"), {})
    setting = [f"{meta['network']} network" if meta.get("network") else "",
               f"link {meta['link']}" if meta.get("link") else "",
               f"{meta['elems']} float32 per op" if meta.get("elems") else "",
               f"seed {meta['seed']}" if meta.get("seed") is not None else ""]
    if any(setting):
        title += "\n(" + ", ".join(filter(None, setting)) + ")"
    fig.suptitle(textwrap.fill(title, width=max(30, width // 8), replace_whitespace=False), fontsize=10)
    fig.legend(handles=_legend(history, faults), loc="outside lower center", ncol=min(8, max(1, width // 170)),
               fontsize=8, frameon=False)
    fig.savefig(Path(path), format="png")


def _rows(history: list[dict[str, Any]], faults: list[dict[str, Any]]) -> list[str]:
    """The peer rows, top to bottom in order of first appearance; the coordinator first when a fault hit it."""
    rows: list[str] = []
    for h in history:
        if h.get("type") == "peer" and h["peer"] not in rows:
            rows.append(h["peer"])
    if any(f.get("who") == "coordinator" for f in faults):
        rows.insert(0, "coordinator")
    return rows


def _y(rows: list[str], who: str) -> Optional[int]:
    return len(rows) - 1 - rows.index(who) if who in rows else None


def _draw_peers(ax: Axes, history: list[dict[str, Any]], rows: list[str], t0: float, hi: float) -> None:
    for p in rows:
        y = _y(rows, p)
        assert y is not None
        records = sorted((h for h in history if h.get("type") == "peer" and h["peer"] == p), key=lambda h: h["t"])
        spans: dict[str, list[tuple[float, float]]] = {k: [] for k in STATE_COLORS}
        state: Optional[str] = None
        since = 0.0
        for h in records:
            t = float(h["t"]) - t0
            if state is not None:
                spans[state].append((since, t - since))
            state, since = STATE_OF.get(h["state"]), t
            if h["state"] == "down":
                ended = h.get("how") in ("exited", "left")
                if ended:
                    ax.plot([t, t], [y - 0.32, y + 0.32], color="#707070", linewidth=2.5, solid_capstyle="butt")
                else:
                    ax.plot([t], [y], marker="X", markersize=9, color="#c81e1e", markeredgecolor="white",
                            linestyle="none", zorder=4)
        if state is not None:
            spans[state].append((since, hi - since))
        for name, color in STATE_COLORS.items():
            if spans[name]:
                ax.broken_barh(spans[name], (y - 0.3, 0.6), facecolors=color, edgecolor="none")
        for start, length in _slow_spans(history, p, t0, hi):
            ax.broken_barh([(start, length)], (y - 0.12, 0.24), facecolors=SLOW_COLOR, edgecolor="none",
                           zorder=3)
    ax.set_yticks(range(len(rows)), list(reversed(rows)), fontsize=9)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_ylabel("peers")
    ax.tick_params(axis="y", length=0)


def _slow_spans(history: list[dict[str, Any]], peer: str, t0: float, hi: float) -> list[tuple[float, float]]:
    """(start, length) of each slow-link fault on ``peer``, to its ``fault_end`` record (else to the end)."""
    out = []
    ends = sorted(float(h["t"]) - t0 for h in history
                  if h.get("type") == "fault_end" and h.get("kind") == "slow" and h.get("who") == peer)
    for f in sorted(float(h["t"]) - t0 for h in history
                    if h.get("type") == "fault" and h.get("kind") == "slow" and h.get("who") == peer):
        end = next((e for e in ends if e >= f), hi)
        out.append((f, end - f))
    return out


def _draw_ops(ax_members: Axes, ax_dur: Axes, history: list[dict[str, Any]], t0: float) -> None:
    ops = [h for h in history if h.get("type") == "op"]
    ok = [o for o in ops if o.get("verdict") == "commit"]
    bad = [o for o in ops if o.get("verdict") != "commit"]
    for ax, value in ((ax_members, lambda o: len(o.get("members") or [])),
                      (ax_dur, lambda o: max(float(o.get("duration_s") or 0.0), 1e-3))):
        ax.scatter([float(o["t_end"]) - t0 for o in ok], [value(o) for o in ok], s=7, color="#3caa50",
                   linewidths=0, zorder=3)
        ax.scatter([float(o["t_end"]) - t0 for o in bad], [value(o) for o in bad], s=40, marker="x",
                   color="#c81e1e", linewidths=1.5, zorder=4)
    most = max((len(o.get("members") or []) for o in ops), default=1)
    ax_members.set_ylim(0, most + 1)
    ax_members.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_members.set_ylabel("members\nper op")
    ax_dur.set_yscale("log")
    ax_dur.set_ylabel("op duration (s)")
    if not ops:
        ax_members.text(0.5, 0.5, "no ops recorded", transform=ax_members.transAxes, ha="center", va="center")


def _draw_faults(axes: tuple[Axes, ...], faults: list[dict[str, Any]], rows: list[str], t0: float) -> None:
    top = axes[0]
    label_tf = blended_transform_factory(top.transData, top.transAxes)
    for f in faults:
        t, kind, who = float(f["t"]) - t0, f.get("kind", "?"), f.get("who", "")
        color = FAULT_COLORS.get(kind, "#505050")
        for ax in axes:
            ax.axvline(t, color=color, linestyle=":", linewidth=1.0, alpha=0.9, zorder=2)
        y = _y(rows, who)
        if y is not None and kind in FAULT_MARKERS:
            top.plot([t], [y + 0.42], marker=FAULT_MARKERS[kind], markersize=7, color=color,
                     markeredgecolor="white", markeredgewidth=0.6, linestyle="none", zorder=5, clip_on=False)
        if len(faults) <= MAX_FAULT_LABELS:
            top.text(t, 1.02, f"{t:.1f}s {kind} {who}".rstrip(), transform=label_tf, rotation=40, fontsize=7.5,
                     color=color, ha="left", va="bottom", rotation_mode="anchor")


def _legend(history: list[dict[str, Any]], faults: list[dict[str, Any]]) -> list[Any]:
    """Legend entries for what the plot shows (a state or mark that never occurs gets none)."""
    peers = [h for h in history if h.get("type") == "peer"]
    states = {STATE_OF.get(h["state"]) for h in peers}
    downs = {h.get("how") in ("exited", "left") for h in peers if h["state"] == "down"}
    verdicts = {h.get("verdict") == "commit" for h in history if h.get("type") == "op"}
    labels = {"live": "live", "stopped": "stopped (SIGSTOP)", "cut": "cut off (partition)"}
    handles: list[Any] = [Patch(color=STATE_COLORS[k], label=labels[k]) for k in STATE_COLORS if k in states]
    if any(f.get("kind") == "slow" for f in faults):
        handles.append(Patch(color=SLOW_COLOR, label="slow link"))
    if False in downs:
        handles.append(Line2D([], [], marker="X", color="#c81e1e", linestyle="none", label="down: killed / crashed"))
    if True in downs:
        handles.append(Line2D([], [], color="#707070", linewidth=2.5, label="down: left / exited"))
    if True in verdicts:
        handles.append(Line2D([], [], marker="o", markersize=4, color="#3caa50", linestyle="none",
                              label="op committed"))
    if False in verdicts:
        handles.append(Line2D([], [], marker="x", color="#c81e1e", linestyle="none", label="op aborted"))
    for kind in dict.fromkeys(f.get("kind", "?") for f in faults):
        handles.append(Line2D([], [], color=FAULT_COLORS.get(kind, "#505050"), linestyle=":",
                              marker=FAULT_MARKERS.get(kind, ""), label=f"fault: {kind}"))
    return handles
