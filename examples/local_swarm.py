"""The main job: a coordinator and 4 local peers train a byte-level transformer LM on the Python stdlib with
DiLoCo, while one peer is killed (SIGKILL) and a new one joins partway. Ends with a table and a PNG plot
(matplotlib: losses and members per sync over time, the faults marked).

    python -m examples.local_swarm                        # ~3 minutes on 2 CPU cores
    python -m examples.local_swarm --outer-steps 40       # shorter
    python -m examples.local_swarm --workdir runs/swarm   # keep logs, events, the plot
    python -m examples.local_swarm --workdir runs/swarm --plot-only   # draw that run's plot again

Every process it starts is killed and reaped when it ends, also on errors or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from examples.train_swarm import format_round
from peer.sim.events import EventStream
from peer.sim.procs import LocalProcs, Proc

# failure detection sized for one loaded machine (the defaults are sized for the internet)
FAST = ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "3", "--coordinator-timeout", "3",
        "--reform-window", "1.5"]


class TrainProcs(LocalProcs):
    """LocalProcs that can also start ``examples.train_swarm`` peers (same env, security and clean-up).
    They start without waiting: each loads torch and the corpus (seconds) in parallel with the others."""

    def __enter__(self) -> "TrainProcs":
        return self

    def trainer(self, name: str, join: list[str], extra: list[str], hold: bool = False) -> Proc:
        args = ["--id", name, "--join", ",".join(join), "--events", *self.security_args(name), *extra]
        if hold:
            args.append("--hold")
        return self.start(name, "examples.train_swarm", args,
                          stdin=subprocess.PIPE if hold else subprocess.DEVNULL)

    def release(self, name: str) -> None:
        """Let a ``hold`` trainer join the swarm now."""
        stdin = self.procs[name].popen.stdin
        assert stdin is not None
        stdin.write("go\n")
        stdin.flush()


class Events(EventStream):
    """Reads the JSON event lines of every trainer as they come, prints them readably, keeps them."""

    def __init__(self, t0: float, log_path: Path) -> None:
        super().__init__()
        self.t0 = t0
        self.done: dict[str, dict[str, Any]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.revision = 0
        self.log = open(log_path, "a", encoding="utf-8")

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def on_event(self, e: dict[str, Any]) -> None:
        e["wall"] = time.time()
        self.log.write(json.dumps(e) + "\n")
        self.log.flush()
        name = e["peer"]
        if e["event"] == "round":
            self.last[name] = e
            self.revision = max(self.revision, e["revision"])
            print(f"[{time.monotonic() - self.t0:6.1f}s] {format_round(e)}", flush=True)
        elif e["event"] == "done":
            self.done[name] = e
        elif e["event"] == "listening":
            self.say(f"[{name}] up on {e['addr']} (model: {e['params']} parameters)")

    def note(self, record: dict[str, Any]) -> None:
        """Log a record of the harness (a fault it injected) next to the trainers' events, for ``--plot-only``."""
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def close(self) -> None:
        super().close()
        self.log.close()


def run(a: argparse.Namespace) -> int:
    workdir = (Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="swarmtrain-train-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    names = [f"peer{i}" for i in range(a.peers)]
    joiner = f"peer{a.peers}"
    train_args = ["--outer-steps", str(a.outer_steps), "--inner-steps", str(a.inner_steps), "--mode", a.mode,
                  "--codec", a.codec, "--lr", str(a.lr), *FAST]
    if a.mode == "streaming":  # one outer step per fragment sync
        train_args += ["--fragments", str(a.fragments)]
    faults: list[dict[str, Any]] = []
    ev = Events(t0, workdir / "events.jsonl")
    with TrainProcs(workdir) as lp:
        coord = lp.coordinator(extra=FAST)
        ev.say(f"coordinator listening on {coord.addr}; {a.peers} peers load the stdlib corpus and start")
        for n in names:
            ev.add(lp.trainer(n, [coord.hostport], [*train_args, "--wait-for", str(a.peers)]))
        # the late joiner starts now too (loading takes seconds) but holds until it is told to join
        ev.add(lp.trainer(joiner, [coord.hostport], train_args, hold=True))
        syncs = a.outer_steps * (a.fragments if a.mode == "streaming" else 1)  # revisions the run makes
        kill_at, join_at = int(syncs * a.kill_at), int(syncs * a.join_at)
        killed = joined = False
        victim = names[1]
        deadline = time.monotonic() + a.timeout
        while len(ev.done) < a.peers + 1 - (1 if killed else 0):
            ev.poll(0.2)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the swarm did not finish within {a.timeout:.0f}s (logs in {workdir}; "
                                   f"--workdir {workdir} --plot-only draws what happened)")
            if not killed and ev.revision >= kill_at:
                lp.kill(victim)
                killed = True
                faults.append({"wall": time.time(), "kind": "kill", "who": victim, "revision": ev.revision})
                ev.note({"event": "fault", **faults[-1]})
                ev.say(f"*** killed {victim} (SIGKILL) at outer step {ev.revision}: the others notice at their "
                       f"next sync, average without it, and carry on")
            if not joined and ev.revision >= join_at:
                joined = True
                faults.append({"wall": time.time(), "kind": "join", "who": joiner, "revision": ev.revision})
                ev.note({"event": "fault", **faults[-1]})
                ev.say(f"*** {joiner} joins: admitted at the next sync, it takes the outer state from the peers")
                lp.release(joiner)
            for name in ev.eof - set(ev.done) - {victim}:
                raise RuntimeError(f"{name} exited before finishing; log: {lp.log_tail(name)}")
        for name in list(ev.done):
            lp.procs[name].popen.wait(timeout=30)
    ev.close()
    summary = summarize(ev, faults, names + ([joiner] if joined else []), victim, a)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    plot_path = workdir / "validation_loss.png"
    plot(ev.events, faults, plot_path, subtitle=describe(a))
    print(f"\nplot: {plot_path}\nlogs and events: {workdir}")
    return 0 if summary["parity"] else 1


def summarize(ev: Events, faults: list[dict[str, Any]], names: list[str], victim: str,
              a: argparse.Namespace) -> dict[str, Any]:
    rounds = [e for e in ev.events if e.get("event") == "round"]
    per_peer = {}
    for n in names:
        d, last = ev.done.get(n), ev.last.get(n)
        mine = [e for e in rounds if e["peer"] == n]
        per_peer[n] = {
            "status": "killed" if n == victim else ("joined late, finished" if n == names[-1] and len(names) > a.peers
                                                     else "finished"),
            "steps": d["steps"] if d else (last["step"] if last else 0),
            "samples": d["samples"] if d else (last["samples"] if last else 0),
            "outer_steps": sum(1 for e in mine if e["committed"]),
            "bytes_sent": d["bytes_sent"] if d else (last["bytes_sent"] if last else 0),
            "first_revision": mine[0]["revision"] if mine else None,
        }
    vals = [e for e in rounds if e.get("val") is not None]
    finished = list(ev.done.values())
    digests = {d["digest"] for d in finished}
    committed = {e["revision"] for e in rounds if e["committed"]}
    return {
        "per_peer": per_peer,
        "val_before": vals[0]["val"] if vals else None,
        "val_after": finished[0]["val"] if finished else None,
        "outer_steps": len(committed),
        "syncs_retried_after_a_loss": len({e["revision"] for e in rounds if e["retried"]}),
        "syncs_discarded": len({(e["peer"], e["revision"]) for e in rounds
                                if not e["committed"] and e["kind"] != "entry"}),
        "faults": [{k: f[k] for k in ("kind", "who", "revision")} for f in faults],
        "faults_survived": sum(1 for f in faults if max(committed, default=0) > f["revision"]),
        "parity": len(digests) == 1 and len({d["revision"] for d in finished}) == 1,
        "final_digest": next(iter(digests)) if len(digests) == 1 else sorted(digests),
        "sync_every": a.inner_steps // (a.fragments if a.mode == "streaming" else 1),
        "mode": a.mode,
    }


def print_table(s: dict[str, Any]) -> None:
    print(f"\n{'peer':<8}{'status':<24}{'steps':>8}{'samples':>10}{'outer steps':>13}{'bytes sent':>13}")
    for n, r in s["per_peer"].items():
        print(f"{n:<8}{r['status']:<24}{r['steps']:>8}{r['samples']:>10}{r['outer_steps']:>13}"
              f"{r['bytes_sent'] / 1e6:>10.1f} MB")
    before, after = s["val_before"], s["val_after"]
    print(f"\nswarm: validation loss {before:.3f} -> {after:.3f} (nats/byte)" if before and after else "")
    what = "fragment syncs" if s["mode"] == "streaming" else "outer steps (syncs)"
    print(f"       {what} committed: {s['outer_steps']}, one every {s['sync_every']} inner steps ({s['mode']} mode)")
    print(f"       faults survived: {s['faults_survived']} of {len(s['faults'])} "
          f"({', '.join(f['kind'] + ' ' + f['who'] + ' at outer step ' + str(f['revision']) for f in s['faults'])})")
    print(f"       syncs that lost a member mid-way and were redone by the survivors: "
          f"{s['syncs_retried_after_a_loss']}; syncs discarded: {s['syncs_discarded']}")
    print(f"       parity: {'OK, every finishing peer holds the same outer weights (digest ' + str(s['final_digest'])[:16] + ')' if s['parity'] else 'VIOLATED ' + str(s['final_digest'])}")


def describe(a: argparse.Namespace) -> str:
    """The run's settings, one line (the plot's subtitle)."""
    mode = f"{a.mode}, {a.fragments} fragments" if a.mode == "streaming" else a.mode
    return (f"{a.peers} peers, H = {a.inner_steps} inner steps per outer step ({mode}), {a.outer_steps} outer "
            f"steps, codec {a.codec}")


PEER_COLORS = ["C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]  # no red or green: those mark kills and joins


def plot(events: list[dict[str, Any]], faults: list[dict[str, Any]], path: Path, subtitle: str = "") -> bool:
    """Draw the run from its event records (``events.jsonl``) into a PNG: losses over time (top, outer steps
    on the upper axis), members per sync (bottom), faults as vertical lines. Returns False (and draws nothing)
    when no sync was evaluated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [e for e in events if e.get("event") == "round"]
    vals = sorted({e["revision"]: (e["wall"], e["val"]) for e in rounds if e.get("val") is not None}.items())
    if not vals:
        return False
    start = min(e["wall"] for e in events)
    fig = Figure(figsize=(10, 6.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_m = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    peers = list(dict.fromkeys(e["peer"] for e in rounds))
    colors = {p: PEER_COLORS[i % len(PEER_COLORS)] for i, p in enumerate(peers)}
    for p in peers:  # each peer's mean training loss over the inner steps since its last sync
        mine = [e for e in rounds if e["peer"] == p and e["committed"] and e["kind"] != "entry"]
        ax.plot([e["wall"] - start for e in mine], [e["loss"] for e in mine], color=colors[p], linewidth=0.8,
                alpha=0.7, label=f"training loss, {p} (mean since its last sync)")
    ax.plot([w - start for _, (w, _) in vals], [v for _, (_, v) in vals], color="black", linewidth=2,
            label="validation loss of the outer weights")
    ax.set_ylabel("loss (nats/byte)")
    ax.grid(color="#e6e6e6")
    ax.legend(loc="center right", fontsize=8)  # the top right holds the fault labels
    # members per sync, as each peer saw it: committed (dot), its entry into the swarm (triangle), failed (x)
    for p in peers:
        mine = [e for e in rounds if e["peer"] == p]
        ok = [e for e in mine if e["kind"] != "entry" and e["committed"]]
        entry = [e for e in mine if e["kind"] == "entry"]
        bad = [e for e in mine if e["kind"] != "entry" and not e["committed"]]
        ax_m.plot([e["wall"] - start for e in ok], [e["members"] for e in ok], ".", color=colors[p],
                  markersize=4)
        ax_m.plot([e["wall"] - start for e in entry], [e["members"] for e in entry], "^", color=colors[p],
                  markersize=6)
        ax_m.plot([e["wall"] - start for e in bad], [e["members"] for e in bad], "x", color="#c81e1e",
                  markersize=8)
    ax_m.plot([], [], "^", color="#555555", linestyle="none", label="a peer's entry (first sync)")
    if any(not e["committed"] and e["kind"] != "entry" for e in rounds):
        ax_m.plot([], [], "x", color="#c81e1e", linestyle="none", label="sync not committed")
    most = max((e["members"] for e in rounds), default=1)
    ax_m.set_ylim(0, most + 1)
    ax_m.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_m.set_ylabel("members\nper sync")
    ax_m.set_xlabel("seconds since the first peer started")
    ax_m.grid(color="#e6e6e6")
    ax_m.legend(loc="lower right", fontsize=7.5, ncol=2)
    for i, f in enumerate(faults):  # labels stacked downwards, so that close faults do not overprint
        t = f["wall"] - start
        color = "#c81e1e" if f["kind"] == "kill" else "#1f8a3a"
        for a in (ax, ax_m):
            a.axvline(t, color=color, linestyle="--", linewidth=1.2)
        what = f"{f['who']} killed (SIGKILL)" if f["kind"] == "kill" else f"{f['who']} starts to join"
        ax.annotate(f"{what}\nat outer step {f['revision']}", (t, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4, -4 - 30 * i), textcoords="offset points", va="top", fontsize=9, color=color,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    # outer steps on the top axis, ticked at the times they were reached (and nowhere they were not)
    every = max(1, round(vals[-1][0] / 8 / 5) * 5) if vals[-1][0] > 10 else 1
    marks = [(w - start, r) for r, (w, _) in vals if r % every == 0]
    top = ax.secondary_xaxis("top")
    top.set_xticks([t for t, _ in marks], labels=[str(r) for _, r in marks])
    top.set_xlabel("outer step (committed syncs)")
    what = ", ".join(f"{f['who']} {'killed' if f['kind'] == 'kill' else 'starts to join'} at outer step {f['revision']}"
                     for f in faults)
    fig.suptitle("DiLoCo swarm on the Python stdlib" + (f": {what}" if what else "")
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.savefig(path, format="png")
    return True


def replot(workdir: Path) -> int:
    """``--plot-only``: draw the plot again from ``WORKDIR/events.jsonl`` (its fault records included)."""
    records = [json.loads(line) for line in (workdir / "events.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    faults = [r for r in records if r.get("event") == "fault"]
    events = [r for r in records if r.get("event") != "fault"]
    path = workdir / "validation_loss.png"
    if not plot(events, faults, path):
        print(f"no evaluated sync in {workdir / 'events.jsonl'}: nothing to plot", file=sys.stderr)
        return 1
    print(f"plot: {path}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4, help="peers at the start (default 4)")
    ap.add_argument("--outer-steps", type=int, default=100, help="outer steps to train (default 100)")
    ap.add_argument("--inner-steps", type=int, default=25, help="H: local steps between syncs (default 25)")
    ap.add_argument("--mode", choices=["sync", "eager", "streaming"], default="sync")
    ap.add_argument("--fragments", type=int, default=5, help="streaming: parameter fragments (divides H)")
    ap.add_argument("--codec", choices=["none", "fp16", "bf16", "int8"], default="none")
    ap.add_argument("--lr", type=float, default=4e-3, help="inner learning rate")
    ap.add_argument("--kill-at", type=float, default=0.35, help="kill peer1 at this fraction of the outer steps")
    ap.add_argument("--join-at", type=float, default=0.5, help="start a new peer at this fraction")
    ap.add_argument("--timeout", type=float, default=1800, help="give up after this many seconds")
    ap.add_argument("--workdir", default=None, help="keep logs, events and the plot here (default: a temp dir)")
    ap.add_argument("--plot-only", action="store_true",
                    help="train nothing: draw the plot again from WORKDIR/events.jsonl of an earlier run")
    a = ap.parse_args(argv)
    if a.plot_only:
        if not a.workdir:
            ap.error("--plot-only needs --workdir (the earlier run's directory)")
        return replot(Path(a.workdir))
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
