"""``swarmtrain demo``: a coordinator and 4 local peer processes all-reduce while the swarm churns.

Schedule (fractions of --duration): kill a peer (SIGKILL) at 0.2, add a peer at 0.35, stall a peer
(SIGSTOP for 3 s) at 0.5, kill the coordinator at 0.65, add another peer at 0.75. Then it prints what
happened: ops committed and aborted, members over time, and the parity check over every committed op.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from peer.sim.config import SIM_ARGS
from peer.sim.history import check_records
from peer.sim.procs import LocalProcs

DEMO_ARGS = SIM_ARGS  # the simulator's timeouts


def _say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {text}", flush=True)


def run_demo(a: argparse.Namespace) -> int:
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="swarmtrain-demo-"))
    duration = float(a.duration)
    t0 = time.monotonic()
    faults: list[dict[str, Any]] = []
    with LocalProcs(workdir) as lp:
        coord = lp.coordinator(extra=DEMO_ARGS)
        _say(t0, f"coordinator listening on {coord.addr}")
        names = [f"peer{i}" for i in range(a.peers)]
        entry: list[str] = [coord.hostport]

        def start_peer(name: str, seconds: float) -> None:
            args = ["--elems", str(a.elems), "--duration", f"{max(1.0, seconds):.1f}", "--pause", "0.02",
                    *DEMO_ARGS]
            p = lp.peer(name, list(entry), args)
            if len(entry) < 4:
                entry.append(p.hostport)  # later joiners can enter through any of these
            _say(t0, f"{name} started on {p.addr}")

        for n in names:
            start_peer(n, duration)
        schedule = [(0.20, "kill", names[1]), (0.35, "join", f"peer{a.peers}"), (0.50, "stall", names[2]),
                    (0.65, "kill_coordinator", "coordinator"), (0.75, "join", f"peer{a.peers + 1}")]
        stalled: list[tuple[float, str]] = []
        for frac, kind, who in schedule:
            while time.monotonic() - t0 < frac * duration:
                time.sleep(0.05)
                for until, name in list(stalled):
                    if time.monotonic() >= until:
                        lp.signal(name, signal.SIGCONT)
                        _say(t0, f"{name} resumed (SIGCONT): it finds it was evicted and rejoins")
                        stalled.remove((until, name))
            now = time.time()
            if kind == "kill":
                lp.kill(who)
                _say(t0, f"killed {who} (SIGKILL)")
            elif kind == "join":
                start_peer(who, duration * (1 - frac) - 1)
            elif kind == "stall":
                lp.signal(who, signal.SIGSTOP)
                stalled.append((time.monotonic() + 3.0, who))
                _say(t0, f"stalled {who} (SIGSTOP for 3 s)")
            elif kind == "kill_coordinator":
                lp.kill(who)
                _say(t0, "killed the coordinator (SIGKILL): the peers re-form under a successor")
            faults.append({"t": now, "kind": kind, "who": who})
        for until, name in stalled:
            time.sleep(max(0.0, until - time.monotonic()))
            lp.signal(name, signal.SIGCONT)
            _say(t0, f"{name} resumed (SIGCONT)")
        results = {}
        for name, proc in lp.procs.items():
            if name != "coordinator" and proc.alive:
                results[name] = lp.wait_done(name, duration + 60)
        records = lp.records()
    summary = _summarize(records, results, faults, a.elems)
    summary["workdir"] = str(workdir)
    if a.json:
        print(json.dumps(summary))
    else:
        _print_summary(summary)
    ok = summary["check"]["parity_violations"] == 0 and summary["check"]["partial_commits"] == 0 \
        and summary["check"]["reference_mismatches"] == 0 and summary["check"]["unrestored_buffers"] == 0
    return 0 if ok else 1


def _summarize(records: list[dict[str, Any]], results: dict[str, Any], faults: list[dict[str, Any]],
               elems: int) -> dict[str, Any]:
    check = check_records(records, elems=elems)
    committed = sorted((r for r in records if r.get("committed")), key=lambda r: r["t"])
    start = min((r["t"] for r in records), default=0.0)
    timeline: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for r in committed:
        members = tuple(r["members"])
        if members not in seen or (timeline and tuple(timeline[-1]["members"]) != members):
            seen.add(members)
            timeline.append({"t": round(r["t"] - start, 2), "members": list(members)})
    times = [r["t"] for r in committed]
    gaps = [b - a for a, b in zip(times, times[1:])]
    per_peer = Counter(r["peer"] for r in committed)
    aborted = Counter(r["peer"] for r in records if r.get("committed") is False)
    peers = sorted(set(per_peer) | set(aborted))
    sent = {n: results.get(n, {}).get("bytes_sent") for n in peers}
    return {"check": check, "timeline": timeline, "max_gap_s": round(max(gaps, default=0.0), 3),
            "per_peer": {n: {"committed": per_peer[n], "aborted": aborted[n], "bytes_sent": sent[n]}
                         for n in peers},
            "faults": [{"t": round(f["t"] - start, 2), "kind": f["kind"], "who": f["who"]} for f in faults]}


def _print_summary(s: dict[str, Any]) -> None:
    c = s["check"]
    print("\nper peer                committed   aborted    bytes sent")
    for name, row in s["per_peer"].items():
        sent = "(killed)" if row["bytes_sent"] is None else f"{row['bytes_sent'] / 1e6:9.1f} MB"
        print(f"  {name:<20} {row['committed']:>9} {row['aborted']:>9}   {sent}")
    print("\nmembers over time")
    for step in s["timeline"]:
        print(f"  {step['t']:7.2f}s  {', '.join(step['members'])}")
    print("\nfaults")
    for f in s["faults"]:
        print(f"  {f['t']:7.2f}s  {f['kind']} {f['who']}")
    print(f"\nops committed (distinct):   {c['ops_committed']}")
    print(f"ops aborted (distinct):     {c['ops_aborted']}")
    print(f"longest gap between commits: {s['max_gap_s']:.2f}s")
    verdict = "OK" if c["parity_violations"] == 0 and c["partial_commits"] == 0 else "VIOLATED"
    print(f"parity check: {verdict} - {c['parity_violations']} digest mismatches, {c['partial_commits']} "
          f"partial commits, {c['unrestored_buffers']} unrestored buffers, {c['reference_mismatches']} of "
          f"{c['reference_checked']} sampled results off the numpy reference")
    print(f"records: {s['workdir']}")


if __name__ == "__main__":
    sys.exit(0)
