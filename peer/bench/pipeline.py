"""Pipeline benchmark: throughput of S stage peers (one process and one thread each, on loopback) against the
same model trained in one process using all the cores (and, measured too, one process with one thread: on a
shared, oversubscribed machine the extra intra-op threads can be far slower), same micro-batches; where a
pipeline peer's step time goes; and recovery times (SIGKILL of a replica -> next committed step; loss of a
stage's last replica while a joiner waits -> next committed step).

    python -m peer.bench.pipeline                      # S = 2 and 4, then the recovery runs
    python -m peer.bench.pipeline --stages 2 --no-recovery --json

Both sides run ``examples.pipeline_lm`` (``--single`` for the baseline) on its generated corpus, so they
compute the same model with the same micro-batches; the first ``--warmup`` steps are not timed.

Time split per pipeline peer and step: ``compute`` (its own forward and backward), ``wait`` (blocked in
point-to-point send/recv: the activation transfer plus the pipeline bubble; the two are not separated, since
a wait for bytes still on the wire looks the same as a wait for a neighbour still computing), ``sync``
(step boundary, gradient all-reduce, commit vote). GPipe's ideal bubble is (S-1)/(M+S-1) of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean, median
from typing import Any, Optional

from peer.sim.events import EventStream
from peer.sim.procs import LocalProcs, Proc

FAST = ["--heartbeat-interval", "0.1", "--heartbeat-timeout", "2.5", "--coordinator-timeout", "2.5",
        "--reform-window", "1.0", "--op-progress-timeout", "8"]
WORKER = "examples.pipeline_lm"


def model_args(a: argparse.Namespace, stages: int) -> list[str]:
    return ["--data", "synthetic", "--width", str(a.width), "--block", str(a.block), "--stages", str(stages),
            "--blocks-per-stage", str(a.blocks // stages), "--micro-batch", str(a.micro_batch),
            "--micro-batches", str(a.micro_batches), "--events", "--eval-every", "1000000",
            "--log-level", "warning"]


def start(lp: LocalProcs, name: str, args: list[str], hold: bool = False) -> Proc:
    return lp.start(name, WORKER, [*args, *(["--hold"] if hold else [])],
                    stdin=subprocess.PIPE if hold else subprocess.DEVNULL)


def release(lp: LocalProcs, name: str) -> None:
    stdin = lp.procs[name].popen.stdin
    assert stdin is not None
    stdin.write("go\n")
    stdin.flush()


def baseline(a: argparse.Namespace, stages: int, threads: int, workdir: Path) -> dict[str, Any]:
    with LocalProcs(workdir, insecure=True) as lp:
        w = EventStream()
        w.add(start(lp, "single", [*model_args(a, stages), "--single", "--threads", str(threads),
                                   "--steps", str(a.steps)]))
        w.until(lambda: bool(w.of("done")), a.timeout, "the baseline")
    times = [e["seconds"] for e in w.of("step")][a.warmup:]
    sps = a.micro_batches * a.micro_batch / median(times)
    return {"threads": threads, "samples_per_s": sps, "step_s": median(times)}


def pipeline(a: argparse.Namespace, stages: int, workdir: Path) -> dict[str, Any]:
    with LocalProcs(workdir, insecure=True) as lp:
        coord = lp.coordinator(extra=["--insecure", *FAST])
        w = EventStream()
        for s in range(stages):
            w.add(start(lp, f"s{s}", ["--id", f"s{s}", "--join", coord.hostport, "--insecure", *FAST,
                                      *model_args(a, stages), "--stage", str(s), "--wait-for", str(stages),
                                      "--steps", str(a.steps), "--threads", "1"]))
        w.until(lambda: len(w.of("done")) == stages, a.timeout, "the pipeline")
    steps = [e for e in w.of("step") if e["committed"] and e["step"] >= a.warmup]
    by_step: dict[int, list[float]] = {}
    for e in steps:
        by_step.setdefault(e["step"], []).append(e["t"])
    ends = sorted(max(v) for v in by_step.values())
    step_s = (ends[-1] - ends[0]) / max(1, len(ends) - 1)   # wall time between consecutive commits
    split = {k: mean(e[f"{k}_s"] for e in steps) for k in ("compute", "wait", "plan", "reduce", "vote")}
    split["sync"] = split.pop("plan") + split.pop("reduce") + split.pop("vote")
    per_stage = {s: mean(e["compute_s"] for e in steps if e["stage"] == s) for s in range(stages)}
    return {"samples_per_s": a.micro_batches * a.micro_batch / step_s, "step_s": step_s,
            "split_s": split, "compute_by_stage_s": per_stage,
            "ideal_bubble": (stages - 1) / (a.micro_batches + stages - 1)}


def recovery(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """3 stages: stage 0 x2, stages 1 and 2 x1, a joiner held back. Kill a stage-0 replica; later release
    the joiner and, once it waits for admission, kill stage 1's only replica (rebuilt by CheckFree)."""
    stages = 3
    common = [*model_args(a, stages), "--steps", str(a.recovery_steps), "--threads", "1", "--insecure", *FAST,
              "--rebuild", "checkfree", "--admit-every", "1000000"]
    with LocalProcs(workdir, insecure=True) as lp:
        coord = lp.coordinator(extra=["--insecure", *FAST])
        w = EventStream()
        layout = {"a0": 0, "a1": 0, "b": 1, "c": 2}
        for n, s in layout.items():
            w.add(start(lp, n, ["--id", n, "--join", coord.hostport, *common, "--stage", str(s),
                                "--wait-for", "4"]))
        w.add(start(lp, "j", ["--id", "j", "--join", coord.hostport, *common], hold=True))
        n1 = a.recovery_steps // 3
        w.until(lambda: w.committed() >= n1, a.timeout, f"step {n1}")
        lp.kill("a1")
        t1 = time.time()
        w.until(lambda: w.committed() >= 2 * n1 and bool(w.of("holding", "j")), a.timeout, f"step {2 * n1}")
        release(lp, "j")
        w.until(lambda: bool(w.of("pending", "j")), 60, "the joiner to wait")
        lp.kill("b")
        t2 = time.time()
        w.until(lambda: all(w.of("done", n) for n in ("a0", "c", "j")), a.timeout, "the recovery run")
    commits = sorted(e["t"] for e in w.of("step") if e["committed"])
    nxt = lambda t: min((c for c in commits if c > t), default=float("nan")) - t  # noqa: E731
    how = [r["how"] for r in w.of("done", "j")[0]["recoveries"] if r["stage"] == 1]
    return {"replica_kill_to_commit_s": nxt(t1), "stage_loss_to_commit_s": nxt(t2), "stage_loss_how": how}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--blocks", type=int, default=4, help="transformer blocks in the whole model")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--block", type=int, default=64, help="context length")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="threads of the all-cores baseline (a 1-thread baseline runs too)")
    ap.add_argument("--recovery-steps", type=int, default=45)
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    out: dict[str, Any] = {"config": vars(a), "runs": []}
    for S in a.stages:
        if a.blocks % S:
            ap.error(f"--blocks {a.blocks} must divide into {S} stages")
        bases = [baseline(a, S, t, root / f"base{S}-{t}") for t in sorted({1, a.cores})]
        pipe = pipeline(a, S, root / f"pipe{S}")
        best = max(bases, key=lambda b: b["samples_per_s"])
        ratio = pipe["samples_per_s"] / best["samples_per_s"]
        out["runs"].append({"stages": S, "baselines": bases, "pipeline": pipe, "ratio_vs_best": ratio,
                            "ratio_vs_all_cores": pipe["samples_per_s"] / bases[-1]["samples_per_s"]})
        sp = pipe["split_s"]
        base_txt = ", ".join(f"{b['threads']} thread(s) {b['samples_per_s']:.1f}" for b in bases)
        print(f"S={S}: pipeline {pipe['samples_per_s']:.1f} samples/s ({pipe['step_s'] * 1e3:.0f} ms/step); one "
              f"process: {base_txt} samples/s; ratio vs the faster one {ratio:.2f}; per peer and step: compute "
              f"{sp['compute'] * 1e3:.0f} ms, wait (transfer + bubble) {sp['wait'] * 1e3:.0f} ms, sync "
              f"{sp['sync'] * 1e3:.0f} ms; ideal GPipe bubble {pipe['ideal_bubble']:.0%}", flush=True)
    if not a.no_recovery:
        rec = recovery(a, root / "recovery")
        out["recovery"] = rec
        print(f"recovery: SIGKILL of a replica -> next committed step {rec['replica_kill_to_commit_s']:.2f} s; "
              f"last replica of stage 1 lost, joiner waiting -> next committed step "
              f"{rec['stage_loss_to_commit_s']:.2f} s ({', '.join(rec['stage_loss_how'])})", flush=True)
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
