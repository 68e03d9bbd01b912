"""The ``swarmtrain simulate`` results: the report object (``--json``) and the summary table.

Pure: it reads a run's config and recorded history; it neither runs nor imports the simulation.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Optional

from peer.sim.config import SimConfig


def build_report(cfg: SimConfig, history: list[dict[str, Any]], check: Optional[dict[str, Any]],
                 bench: list[dict[str, Any]], workdir: Path, hist_path: Path) -> dict[str, Any]:
    meta = next(h for h in history if h.get("type") == "meta")
    t0 = next((h["t"] for h in history if h.get("type") == "start"), meta["t"])  # times: from the window start
    attempts = [h for h in history if h.get("type") == "attempt"]
    done = Counter(r["peer"] for r in attempts if r.get("committed"))
    aborted = Counter(r["peer"] for r in attempts if r.get("committed") is False)
    per_peer: dict[str, dict[str, Any]] = {}
    for h in history:
        if h.get("type") == "peer":
            row = per_peer.setdefault(h["peer"], {"up_s": None, "down_s": None, "how": "", "link": ""})
            if h["state"] == "up":
                row.update(up_s=round(h["t"] - t0, 2), link=h.get("link", ""))
            elif h["state"] == "down":
                row.update(down_s=round(h["t"] - t0, 2), how=h.get("how", ""))
    for name, row in per_peer.items():
        row.update(committed=done[name], aborted=aborted[name])
    faults = [{"t": round(h["t"] - t0, 2), "kind": h["kind"], "who": h["who"], "detail": h.get("detail", "")}
              for h in history if h.get("type") == "fault"]
    rep: dict[str, Any] = {"network": meta["network"], "network_detail": meta["network_detail"],
                           "peers": cfg.peers, "duration_s": cfg.duration, "link": cfg.link.describe(),
                           "seed": cfg.seed, "proxy": cfg.proxy, "workload": cfg.workload, "elems": cfg.elems,
                           "faults": faults, "per_peer": per_peer, "workdir": str(workdir),
                           "history": str(hist_path)}
    if check is not None:
        rep.update({k: check[k] for k in ("ops_committed", "ops_aborted", "parity_violations", "partial_commits",
                                          "unrestored_buffers", "reference_checked", "reference_mismatches",
                                          "untyped_failures", "untyped", "split_brain_ops", "split_brain_s",
                                          "split_brain_windows", "max_stall_s", "max_stall_at", "bad_keys")})
        rep["ok"] = check["ok"]
    if bench:
        n = len(bench)
        sec = max(r["seconds_per_op"] for r in bench)
        nbytes = cfg.elems * 4
        busbw = 2 * (n - 1) / n * nbytes / sec
        ring = bench[0].get("ring") or [f"peer{i}" for i in range(n)]
        bottleneck = ring_bottleneck(cfg, ring)
        rep["bench"] = {"peers": n, "bytes": nbytes, "seconds_per_op": round(sec, 4),
                        "busbw_MBps": round(busbw / 1e6, 3), "busbw_mbit": round(busbw * 8 / 1e6, 2),
                        "ring": ring, "ring_order": cfg.ring_order,
                        "slowest_link_mbit": None if bottleneck is None else round(bottleneck / 1e6, 2),
                        "link_utilisation": None if bottleneck is None else round(busbw * 8 / bottleneck, 3),
                        "correct": all(r.get("correct") for r in bench),
                        "paths": {f"{a}-{b}": round(bps / 1e6, 2) for (a, b), bps in cfg.paths.items()}}
        rep["ok"] = rep["bench"]["correct"]
    return rep


def ring_bottleneck(cfg: SimConfig, ring: list[str]) -> Optional[float]:
    """The slowest hop of the ring, bits/s: sender's upload, receiver's download, the path between them."""
    hops = []
    for a, b in zip(ring, [*ring[1:], ring[0]]):
        la, lb = cfg.peer_links.get(a, cfg.link), cfg.peer_links.get(b, cfg.link)
        path = cfg.paths.get((a, b), cfg.paths.get((b, a)))
        rates = [r for r in (la.up_bps, lb.down_bps, path) if r is not None]
        if rates:
            hops.append(min(rates))
    return min(hops) if hops else None


def print_table(rep: dict[str, Any]) -> None:
    print(f"\nnetwork: {rep['network_detail']}; links: {rep['link']}; proxy: {'on' if rep['proxy'] else 'off'}")
    print(f"\n  {'peer':<10}{'link':<22}{'up at':>8}{'down at':>9}  {'how':<8}{'committed':>10}{'aborted':>9}")
    for name, row in rep["per_peer"].items():
        down = "" if row["down_s"] is None else f"{row['down_s']:.1f}s"
        print(f"  {name:<10}{row['link']:<22}{row['up_s']:>7.1f}s{down:>9}  {row['how']:<8}"
              f"{row['committed']:>10}{row['aborted']:>9}")
    if rep["faults"]:
        print("\n  faults")
        for f in rep["faults"]:
            print(f"  {f['t']:8.1f}s  {f['kind']:<17} {f['who']:<12} {f['detail']}")
    if "bench" in rep:
        b = rep["bench"]
        print(f"\n  all-reduce {b['bytes'] / (1 << 20):g} MiB among {b['peers']} peers "
              f"(ring {' > '.join(b['ring'] or [])}, order: {b['ring_order']}): "
              f"{b['seconds_per_op']:.2f} s/op, "
              f"bus bandwidth {b['busbw_mbit']:.1f} Mbit/s")
        if b["link_utilisation"] is not None:
            print(f"  link utilisation {b['link_utilisation']:.3f} of the ring's slowest hop "
                  f"({b['slowest_link_mbit']:g} Mbit/s)")
        print(f"  result correct on every peer: {b['correct']}")
    if "ops_committed" in rep:
        print(f"\n  ops committed {rep['ops_committed']}, aborted {rep['ops_aborted']}")
        print(f"  parity violations {rep['parity_violations']}, partial commits {rep['partial_commits']}, "
              f"unrestored buffers {rep['unrestored_buffers']}")
        print(f"  results off the numpy reference: {rep['reference_mismatches']} of {rep['reference_checked']} checked")
        print(f"  failures not surfaced as a typed error: {rep['untyped_failures']}")
        print(f"  split brain (disjoint groups committing at once): {rep['split_brain_ops']} ops, "
              f"{rep['split_brain_s']:.1f}s" + (f" from {rep['split_brain_windows'][0][0]:.1f}s"
                                                 if rep["split_brain_windows"] else ""))
        for u in rep["untyped"]:
            print(f"    {u}")
        print(f"  longest time without progress while >= 2 peers were live: {rep['max_stall_s']:.2f}s")
    print(f"\n  verdict: {'OK' if rep.get('ok') else 'VIOLATED'}")
    print(f"  history: {rep['history']}" + (f"\n  timeline: {rep['png']}" if rep.get("png") else ""))
