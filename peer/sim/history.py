"""Offline checks of the invariants on recorded op histories (one JSON line per op attempt per peer).

- parity (I1): every committed op has one result digest across all members that recorded it;
- atomicity (I2): no op is committed on one member and aborted on another, and every aborted op left the
  caller's buffer exactly as it was;
- correctness: where every member recorded its input seed, the result matches the numpy reference.

``check_history`` adds, for the histories ``swarmtrain simulate`` records (format below): the longest time
without progress while at least two peers were live (I3, ``max_stall_s``) and failures that did not surface
as a typed error (I5). Re-check a recorded run offline: ``python -m peer.sim.history RUN/history.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from collectives import errors
from peer.sim.inputs import input_for


def _op_id(r: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """A committed op is its key *and* its member list: a swarm that split in two (see ``split_brain``) may
    number ops alike on both sides, and those are different ops."""
    return r.get("key", ""), tuple(r.get("members") or ())


def _same_op(abort: dict[str, Any], members: tuple[str, ...]) -> bool:
    """Is this aborted attempt the committed op with these members? (Its own member list, when recorded, is
    the epoch it started in: a key reused by another incarnation of the swarm has other members.)"""
    if abort["peer"] not in members:
        return False
    return not abort.get("members") or set(abort["members"]) == set(members)


def check_records(records: Iterable[dict[str, Any]], elems: int | None = None,
                  max_reference_checks: int = 50) -> dict[str, Any]:
    committed: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = defaultdict(list)
    aborted: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if "committed" not in r:
            continue
        if r["committed"]:
            committed[_op_id(r)].append(r)
        else:
            aborted[r.get("key", "")].append(r)
    parity = [k for (k, _), rs in committed.items() if len({r["digest"] for r in rs}) > 1]
    # Partial: a member of a committed op aborted that same op (same key, same members).
    partial = sorted({k for (k, members) in committed for r in aborted.get(k, []) if _same_op(r, members)})
    unrestored = [k for k, rs in aborted.items() if any(r.get("restored") is False for r in rs)]
    mismatches: list[str] = []
    checked = 0
    if elems is not None:
        ids = list(committed)
        stride = max(1, -(-len(ids) // max(1, max_reference_checks)))  # spread the sample over the run
        for op in ids[::stride]:
            rs = committed[op]
            by_peer = {r["peer"]: r for r in rs}
            members = op[1]
            if not all(m in by_peer for m in members):
                continue  # a member died before writing its record
            expected = sum(input_for(by_peer[m]["seed"], elems) for m in members)
            tol = 1e-4 * elems * len(members)
            if any(abs(r["result_sum"] - float(np.sum(expected, dtype=np.float64))) > tol for r in rs):
                mismatches.append(op[0])
            checked += 1
    return {"ops_committed": len(committed), "ops_aborted": len([k for k in aborted if k]),
            "parity_violations": len(parity), "partial_commits": len(partial),
            "unrestored_buffers": len(unrestored),
            "reference_checked": checked, "reference_mismatches": len(mismatches),
            "bad_keys": sorted(parity + partial + mismatches + unrestored)[:20]}


# ---------------------------------------------------------------------------------------------------------
# Simulator histories (``swarmtrain simulate``): one JSON object per line, each with a "type":
#   meta     {"elems", "network", ...}                   the run's settings
#   attempt  a peer's record of one op attempt           (the lines ``peer.sim.workload`` writes, as above)
#   event    a peer's other records                      {"event": "stale" | "rejoin_failed", ...}
#   op       one row per op, merged from the attempts    (epoch, members, verdict, duration, hashes)
#   fault    {"t", "kind", "who", ...}                   what the simulator did, and when
#   peer     {"t", "peer", "state"}                      up | down | stopped | resumed | cut | healed
#            ("down" has "how": killed | left | exited | crashed | hung)
#   untyped  {"t", "peer", "detail"}                     a failure that did not surface as a typed error
#
# Besides I1/I2/I5, the checker flags a split brain: committed ops of disjoint member sets that overlap in
# time, i.e. the swarm went on as two independent groups (the membership model forbids it).
#   start    {"t"}                                       the initial peers are up: the fault window opens
#   end      {"t"}                                       the end of the fault window
# ---------------------------------------------------------------------------------------------------------

def _typed_error_names() -> set[str]:
    return {n for n, o in vars(errors).items() if isinstance(o, type) and issubclass(o, errors.SwarmError)}


def merge_ops(attempts: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per op (key epoch:group:seq, and its members when committed): members, verdict (commit |
    abort | partial), start and end times, duration, each member's result hash and each member's error."""
    groups: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = defaultdict(list)
    aborts: list[dict[str, Any]] = []
    for r in attempts:
        if "committed" in r and r.get("key"):
            (groups[_op_id(r)].append(r) if r["committed"] else aborts.append(r))
    for r in aborts:  # with the committed op it belongs to, else with the other aborts of its key
        home = next((g for g in groups if g[0] == r["key"] and _same_op(r, g[1])), (r["key"], ()))
        groups[home].append(r)
    rows = []
    for (key, members), rs in groups.items():
        verdicts = {bool(r["committed"]) for r in rs}
        verdict = "partial" if len(verdicts) > 1 else ("commit" if True in verdicts else "abort")
        starts = [r["t"] - float(r.get("duration_s") or 0.0) for r in rs]
        if not members:
            members = tuple(sorted({m for r in rs for m in r.get("members") or []} | {r["peer"] for r in rs}))
        rows.append({"key": key, "epoch": int(key.split(":")[0]) if key.split(":")[0].isdigit() else -1,
                     "members": list(members), "verdict": verdict, "t_start": min(starts),
                     "t_end": max(r["t"] for r in rs), "duration_s": round(max(r["t"] for r in rs) - min(starts), 4),
                     "hashes": {r["peer"]: r["digest"] for r in rs if r.get("committed")},
                     "errors": {r["peer"]: r.get("error", "") for r in rs if not r.get("committed")}})
    rows.sort(key=lambda o: o["t_end"])
    return rows


def split_brain(ops: list[dict[str, Any]]) -> tuple[int, list[tuple[float, float]]]:
    """Committed world ops that overlapped in time with a committed op of a disjoint member set: the swarm
    had split into independent groups (membership model: a cut-off minority must not go on alone).
    Returns (how many ops, the merged time windows)."""
    world = sorted((o for o in ops if o["verdict"] != "abort" and o["key"].split(":")[1:2] == ["w"]),
                   key=lambda o: o["t_start"])
    involved: set[int] = set()
    windows: list[tuple[float, float]] = []
    for i, a in enumerate(world):
        for j in range(i + 1, len(world)):
            b = world[j]
            if b["t_start"] >= a["t_end"]:
                break
            if not set(a["members"]) & set(b["members"]):
                involved.update((i, j))
                windows.append((b["t_start"], min(a["t_end"], b["t_end"])))
    merged: list[tuple[float, float]] = []
    for lo, hi in sorted(windows):
        if merged and lo <= merged[-1][1] + 2.0:  # one episode, seen between the ops
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return len(involved), merged


def live_intervals(events: Iterable[dict[str, Any]]) -> list[tuple[float, int]]:
    """Step function of the number of live peers (running, not stopped, not cut off): [(t, count), ...]."""
    alive: set[str] = set()
    frozen: set[str] = set()
    cut: set[str] = set()
    steps: list[tuple[float, int]] = []
    for e in sorted((e for e in events if e.get("type") == "peer"), key=lambda e: e["t"]):
        p, state = e["peer"], e["state"]
        if state == "up":
            alive.add(p)
        elif state == "down":
            alive.discard(p)
            frozen.discard(p)
            cut.discard(p)
        elif state == "stopped":
            frozen.add(p)
        elif state == "resumed":
            frozen.discard(p)
        elif state == "cut":
            cut.add(p)
        elif state == "healed":
            cut.discard(p)
        steps.append((e["t"], len(alive - frozen - cut)))
    return steps


def max_stall(progress: list[float], steps: list[tuple[float, int]], t_begin: float,
              t_end: float) -> tuple[float, float]:
    """The longest time within [t_begin, t_end] without progress while >= 2 peers were live (I3).
    Returns (seconds, when it started)."""
    progress = sorted(p for p in progress if t_begin <= p <= t_end)
    # Windows with >= 2 live peers.
    windows: list[list[float]] = []
    count = 0
    for t, c in steps:
        t = min(max(t, t_begin), t_end)
        if c >= 2 and count < 2:
            windows.append([t, t_end])
        elif c < 2 <= count and windows:
            windows[-1][1] = t
        count = c
    best, at = 0.0, t_begin
    for a, b in windows:
        marks = [a] + [p for p in progress if a < p < b] + [b]
        for x, y in zip(marks, marks[1:]):
            if y - x > best:
                best, at = y - x, x
    return best, at


def check_history(history: list[dict[str, Any]], elems: int | None = None,
                  max_reference_checks: int = 300) -> dict[str, Any]:
    """Every invariant the simulator asserts, from a recorded history alone."""
    attempts = [h for h in history if h.get("type") == "attempt"]
    base = check_records(attempts, elems=elems, max_reference_checks=max_reference_checks)
    typed = _typed_error_names()
    untyped = [f"{r['peer']}: {r.get('error')} ({r.get('reason', '')})"[:200] for r in attempts
               if r.get("committed") is False and r.get("error") not in typed]
    untyped += [f"{h['peer']}: {h.get('detail', '')}"[:200] for h in history if h.get("type") == "untyped"]
    untyped += [f"{h['peer']}: {h['how']}" for h in history
                if h.get("type") == "peer" and h.get("state") == "down" and h.get("how") in ("crashed", "hung")]
    progress = [r["t"] for r in attempts if r.get("committed")]
    ends = [h["t"] for h in history if h.get("type") == "end"]
    t_end = ends[0] if ends else max(progress, default=0.0)
    starts = [h["t"] for h in history if h.get("type") == "start"]
    t_begin = starts[0] if starts else min(progress, default=t_end)
    stall, stall_at = max_stall(progress, live_intervals(history), t_begin, t_end)
    faults = [h for h in history if h.get("type") == "fault"]
    split_ops, split_windows = split_brain(merge_ops(attempts))
    ok = (base["parity_violations"] == 0 and base["partial_commits"] == 0 and base["unrestored_buffers"] == 0
          and base["reference_mismatches"] == 0 and not untyped and split_ops == 0)
    return {**base, "untyped_failures": len(untyped), "untyped": untyped[:20],
            "split_brain_ops": split_ops, "split_brain_s": round(sum(b - a for a, b in split_windows), 3),
            "split_brain_windows": [(round(a - t_begin, 2), round(b - t_begin, 2)) for a, b in split_windows[:10]],
            "max_stall_s": round(stall, 3), "max_stall_at": round(stall_at - t_begin, 3),
            "faults": len(faults), "ok": ok}


def load_history(path: str) -> list[dict[str, Any]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m peer.sim.history RUN/history.jsonl``: re-check a recorded simulation offline."""
    ap = argparse.ArgumentParser(prog="python -m peer.sim.history", description=main.__doc__)
    ap.add_argument("history", help="history.jsonl written by swarmtrain simulate")
    a = ap.parse_args(argv)
    hist = load_history(a.history)
    meta = next((h for h in hist if h.get("type") == "meta"), {})
    result = check_history(hist, elems=meta.get("elems"))
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
