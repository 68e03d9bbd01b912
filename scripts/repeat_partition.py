"""Repeat the scenario of ``tests/procs/test_chaos.py::test_partition_of_one_peer`` until peer0 fails to
rejoin, keeping each run's directory and INFO-level logs. Before 20ecfb9 peer0's first rejoin failed in
every run (answers to its old epoch's messages made it stale while joining) and it stayed out in 1 of 56;
since then, 0 of 30 runs had a failed rejoin (2026-12-03).

    sudo .venv/bin/python scripts/repeat_partition.py [RUNS] [--out /tmp/partition]

Needs what the test needs (network namespaces). Prints peer0's events per run; stops at the first run in
which peer0 commits nothing after the partition heals, and leaves that run's logs in ``--out``/runN/run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "procs")]

import test_chaos  # noqa: E402  (the test's own scenario and checks)

test_chaos.CHAOS_ARGS = (*test_chaos.CHAOS_ARGS, "--log-level", "INFO")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="?", type=int, default=20)
    p.add_argument("--out", default="/tmp/partition")
    a = p.parse_args()
    for i in range(a.runs):
        d = Path(a.out) / f"run{i}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        run = test_chaos.simulate(d, [test_chaos.Fault(4.0, "partition", "peer0", seconds=4.0)], duration=16.0,
                                  link="100mbit")
        cut = run.fault_time("partition")
        back = [o for o in run.ops("commit", after=cut + 4.0) if "peer0" in o["members"]]
        print(f"run {i}: {len(back)} commits with peer0 after the heal ({d})")
        for h in run.hist:
            if h.get("peer") == "peer0" and h["type"] == "event":
                print(f"    {h['t'] - run.t0:6.2f} s  {h['event']}  {h.get('error', '')} {h.get('reason', '')}")
        if not back:
            print(f"peer0 did not rejoin in run {i}: logs in {d / 'run'}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
