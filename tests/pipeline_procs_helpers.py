"""Pipeline peers as real processes (``examples.pipeline_lm`` on its small generated corpus): start them, read
their JSON events as they come, and the set-up the CheckFree live tests share (a stage's only replica
SIGKILLed while a loaded joiner waits for admission)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Callable

from peer.bench.pipeline import Watch as _EventWatch
from peer.sim.procs import LocalProcs, Proc
from tests.helpers import FAST_ARGS

SMALL = ["--data", "synthetic", "--width", "32", "--block", "32", "--micro-batch", "2", "--micro-batches", "4",
         "--events", "--eval-every", "1000", "--op-timeout", "15", "--log-level", "warning"]


def start(lp: LocalProcs, name: str, join: list[str], extra: list[str], hold: bool = False) -> Proc:
    """A pipeline peer: fast timeouts, the small model, then ``extra``; ``hold`` waits for ``release``."""
    args = ["--id", name, "--join", ",".join(join), *lp.security_args(name), *FAST_ARGS, *SMALL, *extra]
    if hold:
        args.append("--hold")
    return lp.start(name, "examples.pipeline_lm", args, stdin=subprocess.PIPE if hold else subprocess.DEVNULL)


def release(lp: LocalProcs, name: str) -> None:
    """Let a peer started with ``hold=True`` go on (it has loaded and reported ``holding``)."""
    stdin = lp.procs[name].popen.stdin
    assert stdin is not None
    stdin.write("go\n")
    stdin.flush()


class Watch(_EventWatch):
    """Every peer's JSON events, read as they come (the benchmark's raw non-blocking reads, bounded waits);
    a wait that runs out fails the test with every process's log tail."""

    def __init__(self, procs: list[Proc]) -> None:
        super().__init__()
        for p in procs:
            self.add(p)

    def until(self, cond: Callable[[], bool], timeout: float, what: str,  # type: ignore[override]
              lp: LocalProcs) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}; " + \
                " | ".join(f"{n}: {lp.log_tail(n, 600)}" for n in lp.procs)
            self.poll(0.1)


def kill_stage_while_joiner_waits(procs: LocalProcs, stages: int, common: list[str], after_steps: int,
                                  victim: str) -> tuple[Watch, Path, float]:
    """A coordinator, one peer ``s<i>`` per stage and a joiner ``j`` (held once loaded, dumping its
    rebuilds to the returned path), all with ``common``. Once ``after_steps`` steps committed and j is
    loaded, j is released; once it waits for admission, ``victim`` is SIGKILLed. Returns the watch, the
    dump path and the time of the kill."""
    coord = procs.coordinator(extra=["--heartbeat-interval", "0.1"])
    join = [coord.hostport]
    dump = procs.workdir / "j-rebuilds.json"
    ps = [start(procs, f"s{i}", join, [*common, "--stage", str(i), "--wait-for", str(stages)])
          for i in range(stages)]
    j = start(procs, "j", join, [*common, "--dump-rebuild", str(dump)], hold=True)
    w = Watch([*ps, j])
    w.until(lambda: w.committed() >= after_steps and bool(w.of("holding", "j")), 100,
            f"step {after_steps} and a loaded joiner", procs)
    release(procs, "j")
    w.until(lambda: bool(w.of("pending", "j")), 30, "the joiner to wait for admission", procs)
    procs.kill(victim)
    return w, dump, time.time()
