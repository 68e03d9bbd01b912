"""On slow links, does DiLoCo reach a given loss sooner in wall-clock than data parallel? (issue 15)

    python -m examples.diloco_wallclock                          # the pre-registered run: ~45 min
    python -m examples.diloco_wallclock --budget 180             # 3 minutes per arm instead of 4
    python -m examples.diloco_wallclock --budget 20 --out /tmp/wc --arms dp,diloco-50 --no-fast   # smoke run
    python -m examples.diloco_wallclock --report-only            # table, summary and plot from the JSONL again

Pre-registered in issue 15: 4 peers, each in its own network namespace (``peer.sim.netns``) with a 20 Mbit/s
link (tbf, both directions), 1 torch thread each, the main job's byte-level LM (``examples.charlm``, 121k
parameters) on the stdlib text; every arm gets the same wall-clock budget after the same warm start (30
synchronous steps of 4 x 16 windows with the LR warming up to 4e-3, weights and AdamW state saved once), at
the inner LR tuned in the toy experiment (4e-3, constant after the warm start: arms make different numbers
of steps in the same time, so no step-count schedule would treat them alike). Arms:

    dp               swarmtrain data parallel: gradients all-reduced every step (the README's loop)
    ddp              torch.distributed DDP over Gloo on the same shaped links
    diloco-10        DiLoCo H = 10, sync   (outer LR 0.6, momentum 0.7: the toy experiment's best at H = 10)
    diloco-50        DiLoCo H = 50, sync   (outer LR 1.0, momentum 0.5: its best at H = 50, also after warm-up)
    diloco-50-eager  DiLoCo H = 50, eager
    diloco-50-int8   DiLoCo H = 50, sync, int8 codec for the pseudo-gradient average

then the two arms with the lowest final validation loss at 20 Mbit/s again at 100 Mbit/s. The coordinator
(membership and verdicts only, no tensors) sits in its own unshaped namespace; DDP needs none. Peer 0 writes
weight snapshots (DiLoCo: the outer weights after each committed sync; data parallel: every ``--snap-every``
seconds); the runner evaluates them after the arm (256 fixed validation windows, nats per byte), so evaluation
costs no training time. ``uptime`` load is recorded before and after each arm.

Writes ``<out>/diloco_wallclock_runs.jsonl`` (one line per arm and link; resumable: finished arms are
skipped), ``diloco_wallclock_summary.json`` (the claims), ``diloco_wallclock_loss.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from collectives.errors import DeadlineExceeded
from examples.charlm import load_corpus
from examples.wallclock_report import report
from examples.wallclock_state import LR, WORKERS, Evaluator, make_warm_start, save_corpus
from examples.wallclock_worker import DDP_PORT
from peer.bench.shaped import ShapedProcs
from peer.sim.netns import parse_link

ARMS: dict[str, dict[str, Any]] = {
    "dp": {"arm": "dp"},
    "ddp": {"arm": "ddp"},
    "diloco-10": {"arm": "diloco", "H": 10, "mode": "sync", "codec": "none", "outer_lr": 0.6, "outer_momentum": 0.7},
    "diloco-50": {"arm": "diloco", "H": 50, "mode": "sync", "codec": "none", "outer_lr": 1.0, "outer_momentum": 0.5},
    "diloco-50-eager": {"arm": "diloco", "H": 50, "mode": "eager", "codec": "none", "outer_lr": 1.0,
                        "outer_momentum": 0.5},
    "diloco-50-int8": {"arm": "diloco", "H": 50, "mode": "sync", "codec": "int8", "outer_lr": 1.0,
                       "outer_momentum": 0.5},
}
SLOW, FAST = "20mbit", "100mbit"
SETUP_S = 300.0           # starting 4 trainers (torch, the corpus) and forming the swarm, at most
GRACE_S = 90.0            # after the budget: the last step or sync, then leaving


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10, check=False).stdout.strip()


def worker_args(name: str, spec: dict[str, Any], rank: int, ip: str, a: argparse.Namespace, warm: Path,
                snapdir: Path, join: str, master: str, security: list[str]) -> list[str]:
    args = ["--arm", spec["arm"], "--name", name, "--rank", str(rank), "--world", str(a.peers), "--host", ip,
            "--warm", str(warm), "--corpus", str(warm.parent / "corpus.npz"), "--budget", str(a.budget), "--snapdir", str(snapdir),
            "--snap-every", str(a.snap_every), "--lr", str(LR)]
    if spec["arm"] == "ddp":
        args += ["--ddp-master", master]
    else:
        args += ["--join", join, *security]
    if spec["arm"] == "diloco":
        args += ["--H", str(spec["H"]), "--mode", spec["mode"], "--codec", spec["codec"],
                 "--outer-lr", str(spec["outer_lr"]), "--outer-momentum", str(spec["outer_momentum"])]
    return args


def run_arm(arm: str, link: str, a: argparse.Namespace, warm: Path, workdir: Path) -> dict[str, Any]:
    """One arm on one link: start the peers in their namespaces, wait for their measurements, clean up."""
    spec = ARMS[arm]
    rundir = workdir / f"{arm}@{link}"
    if rundir.exists():
        shutil.rmtree(rundir)
    rundir.mkdir(parents=True)
    snapdir = rundir / "snap"
    row: dict[str, Any] = {"arm": arm, "link": link, "budget_s": a.budget, "peers": a.peers, "config": spec,
                           "lr": LR, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "uptime_before": uptime(), "load_before": os.getloadavg()[0], "errors": []}
    names = [f"peer{r}" for r in range(a.peers)]
    with ShapedProcs(rundir) as sp:
        row["fabric"] = sp.fabric.suffix
        join = ""
        if spec["arm"] != "ddp":
            join = sp.coordinator().hostport
        hosts = [sp.net.add(name, parse_link(link)) for name in names]
        master = f"{hosts[0][0]}:{DDP_PORT}"
        for rank, (name, (ip, python)) in enumerate(zip(names, hosts)):
            sp.lp.python = python or sys.executable
            sp.lp.start(name, "examples.wallclock_worker",
                        worker_args(name, spec, rank, ip, a, warm, snapdir, join, master,
                                    sp.lp.security_args(name)))
        wait_all(sp, names, time.monotonic() + SETUP_S + a.budget + GRACE_S, row["errors"])
        lines = {name: sp.lp.procs[name].lines for name in names}
    row["uptime_after"], row["load_after"] = uptime(), os.getloadavg()[0]
    row["per_peer"] = [next((e for e in lines[n] if e.get("event") == "budget"), None) for n in names]
    got = [p for p in row["per_peer"] if p is not None]
    row["utilisation"] = round(sum(p["utilisation"] for p in got) / len(got), 4) if got else None
    row["snapdir"] = str(snapdir)
    row["curve"] = curve = a.evaluator.curve(snapdir, a.budget, points=1, targets=[])   # the final point
    inside = [r for r in curve if r["t"] <= a.budget]
    row["final_val"] = inside[-1]["val"] if inside else None
    row["final_t"] = inside[-1]["t"] if inside else None
    row["final_samples"] = inside[-1]["samples"] if inside else None
    return row


def wait_all(sp: ShapedProcs, names: list[str], deadline: float, errors: list[str]) -> None:
    """Read every peer's events until its 'done' line. A peer that dies before its measurement ends the
    arm at once (the others would wait for it); one that does not finish by ``deadline`` is killed."""
    pending = list(names)
    while pending:
        if time.monotonic() > deadline:
            errors.append(f"no 'done' line from {pending} by the deadline: killed")
            return
        for name in list(pending):
            try:
                sp.lp.wait_done(name, 0.5)
                pending.remove(name)
            except DeadlineExceeded:
                continue
            except subprocess.TimeoutExpired:
                pending.remove(name)     # its 'done' line came; it is still exiting (killed at close)
            except RuntimeError as exc:
                errors.append(f"{name}: {type(exc).__name__}: {str(exc)[-600:]}")
                pending.remove(name)
                if not any(e.get("event") == "budget" for e in sp.lp.procs[name].lines):
                    return


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fill_curves(rows: list[dict[str, Any]], budget: float, evaluator: Evaluator, points: int) -> None:
    """After all arms (so that evaluation never competes with an arm for the CPU): about ``points``
    snapshots per arm, refined where the claims' loss levels are crossed (the best data-parallel final loss
    at 20 Mbit/s; the higher of the fp32 and int8 H = 50 final losses)."""
    final = {(r["arm"], r["link"]): r["final_val"] for r in rows if r["budget_s"] == budget}
    dps = [v for k, v in final.items() if k in (("dp", SLOW), ("ddp", SLOW)) and v is not None]
    levels = [min(dps)] if dps else []
    pair = [final.get(("diloco-50", SLOW)), final.get(("diloco-50-int8", SLOW))]
    if all(v is not None for v in pair):
        levels.append(max(v for v in pair if v is not None))
    for r in rows:
        if r["budget_s"] == budget and r.get("snapdir") and Path(r["snapdir"]).exists():
            print(f"{time.strftime('%H:%M:%S')} evaluating {r['arm']} @ {r['link']}", flush=True)
            r["curve"] = evaluator.curve(Path(r["snapdir"]), budget, points, levels, known=r["curve"])


def fast_arms(rows: list[dict[str, Any]], budget: float, count: int = 2) -> list[str]:
    """The arms with the lowest final validation loss at 20 Mbit/s (pre-registered: 'the two best')."""
    slow = [r for r in rows if r["link"] == SLOW and r["budget_s"] == budget and r["final_val"] is not None]
    return [r["arm"] for r in sorted(slow, key=lambda r: r["final_val"])[:count]]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=240.0, help="wall-clock seconds per arm (default 240)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms at 20 Mbit/s (default: all)")
    ap.add_argument("--no-fast", action="store_true", help="skip the 100 Mbit/s runs of the two best arms")
    ap.add_argument("--peers", type=int, default=WORKERS)
    ap.add_argument("--snap-every", type=float, default=3.0, help="seconds between weight snapshots at least")
    ap.add_argument("--out", default="examples/results", help="where the JSONL, summary and PNG go")
    ap.add_argument("--workdir", default="", help="logs, snapshots, the warm start (default: a temp dir)")
    ap.add_argument("--points", type=int, default=16, help="snapshots evaluated per arm, besides refinement")
    ap.add_argument("--report-only", action="store_true", help="only rebuild table, summary and plot")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "diloco_wallclock_runs.jsonl"
    if a.report_only:
        report(load_rows(runs), a.budget, out)
        return 0
    for arm in a.arms.split(","):
        if arm not in ARMS:
            ap.error(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    workdir = Path(a.workdir) if a.workdir else Path(tempfile_dir())
    workdir.mkdir(parents=True, exist_ok=True)
    a.corpus = load_corpus()
    warm = workdir / "warm.npz"
    if not warm.exists():
        make_warm_start(warm, a.corpus)
    a.evaluator = Evaluator(a.corpus, warm)
    if not (workdir / "corpus.npz").exists():
        save_corpus(workdir / "corpus.npz", a.corpus)
    signal.signal(signal.SIGTERM, _terminate)   # so every namespace and process is cleaned up
    plan = [(arm, SLOW) for arm in a.arms.split(",")]
    done = {(r["arm"], r["link"], r["budget_s"], r.get("peers", WORKERS)) for r in load_rows(runs)}
    for phase in ("slow", "fast"):
        if phase == "fast":
            if a.no_fast:
                break
            plan = [(arm, FAST) for arm in fast_arms(load_rows(runs), a.budget)]
            print(f"two best arms at {SLOW}: {[p[0] for p in plan]}; now at {FAST}", flush=True)
        for arm, link in plan:
            if (arm, link, a.budget, a.peers) in done:
                print(f"{arm} @ {link}: already in {runs}, skipped", flush=True)
                continue
            print(f"{time.strftime('%H:%M:%S')} {arm} @ {link}: {a.budget:g} s ({uptime()})", flush=True)
            row = run_arm(arm, link, a, warm, workdir)
            with open(runs, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  final val {row['final_val']}, utilisation {row['utilisation']}, errors {row['errors']}",
                  flush=True)
    rows = load_rows(runs)
    fill_curves(rows, a.budget, a.evaluator, a.points)
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    report(rows, a.budget, out)
    return 0


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"signal {signum}")


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="swarmtrain-wallclock-")


if __name__ == "__main__":
    sys.exit(main())
