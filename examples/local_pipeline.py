"""The pipeline main job: a coordinator and 4 stages x 2 replicas of ``examples.pipeline_lm`` on loopback train
the byte-level LM split into stages, while one replica is SIGKILLed partway and later the last replica of a
middle stage is SIGKILLed while a joiner waits (the joiner takes the stage: rebuilt from its neighbours by
CheckFree, since no replica survives). Ends with a table, a PNG of validation loss over time with the faults
marked, and (``--json``) one JSON object as the last line.

    python -m examples.local_pipeline                    # a few minutes on 2 CPU cores
    python -m examples.local_pipeline --steps 60 --json  # shorter; the last line is the JSON summary
    python -m examples.local_pipeline --rebuild none     # no rule: the run stops with StageLost (stage 1)

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

from examples.pipeline_lm import format_event
from peer.sim.events import EventStream
from peer.sim.procs import LocalProcs, Proc

FAST = ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "3", "--coordinator-timeout", "3",
        "--reform-window", "1.5", "--op-progress-timeout", "10"]
RESULTS = Path(__file__).resolve().parent / "results"


class PipeProcs(LocalProcs):
    def stage_peer(self, name: str, join: list[str], extra: list[str], hold: bool = False) -> Proc:
        args = ["--id", name, "--join", ",".join(join), "--events", *self.security_args(name), *FAST, *extra]
        if hold:
            args.append("--hold")
        return self.start(name, "examples.pipeline_lm", args, stdin=subprocess.PIPE if hold else subprocess.DEVNULL)

    def release(self, name: str) -> None:
        stdin = self.procs[name].popen.stdin
        assert stdin is not None
        stdin.write("go\n")
        stdin.flush()

    def __enter__(self) -> "PipeProcs":
        return self


class Events(EventStream):
    """The JSON event lines of every peer, as they come, printed readably."""

    every = 0.2

    def __init__(self, t0: float, quiet: bool) -> None:
        super().__init__()
        self.t0, self.quiet = t0, quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.t0:6.1f}s] {text}", flush=True)

    def on_event(self, e: dict[str, Any]) -> None:
        if e["event"] != "step" or not e["committed"] or e["stage"] == 0 or e["recoveries"]:
            self.say(format_event(e))   # one line per step (from stage 0's peers), all else


def run(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    t0 = time.time()
    ev = Events(t0, a.json_only)
    marks: list[tuple[float, str]] = []
    common = ["--steps", str(a.steps), "--rebuild", a.rebuild, "--stages", str(a.stages),
              "--micro-batches", str(a.micro_batches), "--eval-every", str(a.eval_every),
              "--admit-every", str(a.admit_every)]
    with PipeProcs(workdir) as lp:
        coord = lp.coordinator(extra=FAST)
        join = [coord.hostport]
        names = [f"s{s}r{r}" for s in range(a.stages) for r in range(a.replicas)]
        for n in names:
            ev.add(lp.stage_peer(n, join, [*common, "--stage", n[1], "--wait-for", str(len(names))]))
        ev.add(lp.stage_peer("joiner", join, common, hold=True))
        k1, k2 = a.steps // 4, a.steps // 2
        ev.until(lambda: ev.committed() >= k1, a.timeout, f"step {k1}")
        victim1 = "s1r1"
        lp.kill(victim1)
        marks.append((time.time() - t0, f"KILL {victim1}"))
        ev.say(f"SIGKILL {victim1} (one replica of stage 1)")
        kill1 = time.time()
        # the joiner waits (admitted only every --admit-every steps, or when a stage needs a member) ...
        ev.until(lambda: ev.committed() >= k2 and ev.committed() % a.admit_every not in (0, a.admit_every - 1),
                a.timeout, f"step {k2}")
        ev.until(lambda: bool(ev.of("holding", "joiner")), 60, "the joiner to load")
        lp.release("joiner")
        ev.until(lambda: bool(ev.of("pending", "joiner")), 30, "the joiner to be pending")
        victim2 = "s1r0"
        lp.kill(victim2)                      # ... while the last replica of middle stage 1 dies
        kill2 = time.time()
        marks.append((kill2 - t0, f"KILL {victim2} (JOINER WAITS)"))
        ev.say(f"SIGKILL {victim2} (the last replica of stage 1) while a joiner waits")
        live = [n for n in names if n not in (victim1, victim2)] + ["joiner"]
        ev.until(lambda: all(ev.of("done", n) or ev.of("stage_lost", n) or n in ev.eof for n in live),
                a.timeout, "the peers to finish")
        for n in live:
            try:
                lp.procs[n].popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass  # killed and reaped by LocalProcs.close
    return summarize(a, ev, names, live, marks, [(victim1, kill1), (victim2, kill2)], time.time() - t0)


def summarize(a: argparse.Namespace, ev: Events, names: list[str], live: list[str], marks: list[tuple[float, str]],
              kills: list[tuple[str, float]], wall: float) -> dict[str, Any]:
    done = {e["peer"]: e for e in ev.of("done")}
    lost = ev.of("stage_lost")
    first_t: dict[tuple[int, float], float] = {}
    for e in ev.of("eval"):   # every peer reports the same collective evaluation: keep one per step
        key = (e["step"], e["val"])
        first_t[key] = min(first_t.get(key, e["t"] - ev.t0), e["t"] - ev.t0)
    evals = sorted((s, v, t) for (s, v), t in first_t.items())
    steps = ev.of("step")
    committed = sorted({e["step"] for e in steps if e["committed"]})
    aborted = sorted({(e["step"], e["epoch"]) for e in steps if not e["committed"]})
    digests: dict[int, set[str]] = {}
    for d in done.values():
        digests.setdefault(d["stage"], set()).add(d["digest"])
    parity = bool(digests) and all(len(v) == 1 for v in digests.values()) and not lost
    recoveries: list[dict[str, Any]] = []
    ends = [t for _, t in kills[1:]] + [float("inf")]
    for (victim, t_kill), t_end in zip(kills, ends):
        after = [e for e in steps if e["committed"] and t_kill < e["t"] < t_end]
        first = min((e["t"] for e in after), default=None)
        rec = {"stage": int(victim[1]), "killed": victim,
               "seconds_to_commit": None if first is None else round(first - t_kill, 3)}
        hows = sorted({r["how"] for e in after for r in e["recoveries"] if r["stage"] == rec["stage"]
                       and not r["how"].endswith("(elsewhere)")})
        rec["how"] = ", ".join(hows) if hows else "rerouted through the surviving replica"
        if hows:
            movers = sorted({m for e in after for r in e["recoveries"] if r["stage"] == rec["stage"]
                             for m in r.get("moved", []) + r.get("joiners", [])})
            rec["taken_by"] = movers
        recoveries.append(rec)
    for e in steps:   # later recoveries (e.g. a replica copy for the joiner admitted at a later boundary)
        for r in e["recoveries"]:
            if e["peer"] in r.get("joiners", []) + r.get("moved", []) and r["how"] == "replica copy":
                recoveries.append({"stage": r["stage"], "how": "replica copy (joiner)", "taken_by": [e["peer"]],
                                   "seconds_to_commit": round(e["t"] - r["t"], 3)})
    table = []
    for n in names + ["joiner"]:
        mine = [e for e in steps if e["peer"] == n]
        table.append({"peer": n, "stage": done.get(n, {}).get("stage", mine[-1]["stage"] if mine else None),
                      "steps": sum(e["committed"] for e in mine),
                      "bytes_sent": done.get(n, {}).get("bytes_sent", mine[-1]["bytes_sent"] if mine else 0),
                      "status": "done" if n in done else ("killed" if n not in live else "stopped")})
    out = {"parity": parity, "steps_committed": len(committed), "steps_aborted": len(aborted),
           "val_before": evals[0][1] if evals else None, "val_after": evals[-1][1] if evals else None,
           "recoveries": recoveries, "stage_lost": [e["error"] for e in lost][:1], "peers": table,
           "wall_s": round(wall, 1), "evals": [[s, v, round(t, 2)] for s, v, t in evals],
           "marks": [[round(t, 2), m] for t, m in marks], "config": vars(a)}
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ev = summary["evals"]
    ax.plot([t for _, _, t in ev], [v for _, v, _ in ev], marker="o", ms=3, label="validation loss (nats/byte)")
    for t, m in summary["marks"]:
        ax.axvline(t, color="red", ls="--", lw=1)
        ax.text(t, ax.get_ylim()[1], " " + m, color="red", fontsize=7, va="top", rotation=90)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation loss")
    ax.set_title("pipeline: 4 stages x 2 replicas, byte-level LM on the stdlib")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(s: dict[str, Any]) -> None:
    print(f"\n{'peer':<8} {'stage':>5} {'steps':>6} {'MB sent':>8}  status")
    for r in s["peers"]:
        print(f"{r['peer']:<8} {str(r['stage']):>5} {r['steps']:>6} {r['bytes_sent'] / 1e6:>8.2f}  {r['status']}")
    print(f"\nswarm: val loss {s['val_before']} -> {s['val_after']}; steps committed {s['steps_committed']}, "
          f"aborted attempts {s['steps_aborted']}; parity {s['parity']}; {s['wall_s']} s")
    for r in s["recoveries"]:
        print(f"  recovery: stage {r['stage']} ({r.get('killed', '')}) by {r['how']} "
              f"{r.get('taken_by', '')}: {r['seconds_to_commit']} s to the next committed step")
    for e in s["stage_lost"]:
        print(f"  STOPPED: {e}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--admit-every", type=int, default=10)
    ap.add_argument("--rebuild", choices=["none", "checkfree", "checkfree-post"], default="checkfree")
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after this long per phase")
    ap.add_argument("--workdir", default="", help="keep logs here (default: a temporary directory)")
    ap.add_argument("--out", default=str(RESULTS), help="where the JSON and PNG go")
    ap.add_argument("--json", action="store_true", help="the last line is the JSON summary")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.stages < 3 or a.replicas < 2:
        ap.error("the scenario needs >= 3 stages and >= 2 replicas")
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="local-pipeline-"))
    summary = run(a, workdir)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    plot(summary, out / "pipeline_validation_loss.png")
    print_table(summary)
    print(f"wrote {out / 'pipeline_summary.json'} and {out / 'pipeline_validation_loss.png'}; logs in {workdir}")
    if a.json:
        print(json.dumps({k: summary[k] for k in ("parity", "steps_committed", "steps_aborted", "val_before",
                                                  "val_after", "recoveries", "stage_lost", "wall_s")}))
    return 0 if summary["parity"] else 1


if __name__ == "__main__":
    sys.exit(main())
