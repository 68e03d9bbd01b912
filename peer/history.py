"""Offline checks of the invariants on recorded op histories (one JSON line per op attempt per peer).

- parity (I1): every committed op has one result digest across all members that recorded it;
- atomicity (I2): no op is committed on one member and aborted on another, and every aborted op left the
  caller's buffer exactly as it was;
- correctness: where every member recorded its input seed, the result matches the numpy reference.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import numpy as np

from peer.workload import input_for


def check_records(records: Iterable[dict[str, Any]], elems: int | None = None,
                  max_reference_checks: int = 50) -> dict[str, Any]:
    committed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    aborted: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if "committed" not in r:
            continue
        (committed if r["committed"] else aborted)[r.get("key", "")].append(r)
    parity = [k for k, rs in committed.items() if len({r["digest"] for r in rs}) > 1]
    partial = [k for k in committed if k in aborted]
    unrestored = [k for k, rs in aborted.items() if any(r.get("restored") is False for r in rs)]
    mismatches: list[str] = []
    checked = 0
    if elems is not None:
        for key, rs in committed.items():
            if checked >= max_reference_checks:
                break
            by_peer = {r["peer"]: r for r in rs}
            members = rs[0]["members"]
            if not all(m in by_peer for m in members):
                continue  # a member died before writing its record
            expected = sum(input_for(by_peer[m]["seed"], elems) for m in members)
            tol = 1e-4 * elems * len(members)
            if any(abs(r["result_sum"] - float(np.sum(expected, dtype=np.float64))) > tol for r in rs):
                mismatches.append(key)
            checked += 1
    return {"ops_committed": len(committed), "ops_aborted": len([k for k in aborted if k]),
            "parity_violations": len(parity), "partial_commits": len(partial),
            "unrestored_buffers": len(unrestored),
            "reference_checked": checked, "reference_mismatches": len(mismatches),
            "bad_keys": sorted(parity + partial + mismatches + unrestored)[:20]}
