"""The ``swarmtrain simulate`` command line: its flags, the summary table and the ``--json`` object."""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from collectives.errors import LocalError
from peer.sim import faults as F
from peer.sim.netns import LinkSpec, NetnsError, parse_link, parse_rate

if TYPE_CHECKING:  # imported lazily: every `python -m peer` builds this parser
    from peer.sim.simulate import SimConfig


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 90, 90s, 30m, 1h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2) or "s"]


def parse_ms(text: str) -> float:
    """'40ms', '0.04s', '40' (ms) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad time {text!r}: use e.g. 40ms")
    return float(m.group(1)) / (1 if m.group(2) == "s" else 1000)


def add_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--peers", type=int, default=4, help="peer processes at the start (default 4)")
    s.add_argument("--duration", type=parse_duration, default=60.0,
                   help="length of the fault window: 90, 90s, 30m, 1h (default 60 s)")
    s.add_argument("--network", choices=["auto", "netns", "loopback"], default="auto",
                   help="netns: each peer in its own network namespace (needs root); loopback: all on "
                        "127.0.0.1; auto (default): namespaces when they can be created, else loopback")
    s.add_argument("--link", default="none",
                   help="every peer's access link, tbf-shaped: RATE or UP/DOWN, e.g. 100mbit or "
                        "20mbit/100mbit (default: unlimited). On loopback only the download is limited, "
                        "by the proxy")
    s.add_argument("--peer-link", action="append", default=[], metavar="PEER=RATE[/DOWN]",
                   help="one peer's link, for uneven links: peer3=20mbit or 3=20mbit (repeatable)")
    s.add_argument("--proxy", action="store_true",
                   help="put every peer behind the delaying TCP proxy (needed for --delay and the reset, "
                        "truncate, corrupt and delay faults)")
    s.add_argument("--delay", type=parse_ms, default=0.0, help="proxy: one-way latency, e.g. 40ms")
    s.add_argument("--jitter", type=parse_ms, default=0.0, help="proxy: plus up to this much, e.g. 10ms")
    s.add_argument("--workload", choices=["allreduce", "bench"], default="allreduce",
                   help="allreduce (default): repeated all-reduces that survive the faults; bench: time "
                        "--ops all-reduces among exactly --peers peers and report the link utilisation")
    s.add_argument("--mb", type=float, default=None, help="all-reduce buffer in MiB (float32)")
    s.add_argument("--elems", type=int, default=1 << 20, help="float32 elements per all-reduce (default 1Mi)")
    s.add_argument("--pause", type=float, default=0.0, help="allreduce: seconds between ops")
    s.add_argument("--ops", type=int, default=3, help="bench: timed all-reduces (default 3)")
    s.add_argument("--warmup", type=int, default=1, help="bench: untimed all-reduces first (default 1)")
    s.add_argument("--path", action="append", default=[], metavar="A-B=RATE",
                   help="limit the path between two peers (both directions) below their links, e.g. a bad "
                        "route: peer0-peer2=20mbit or 0-2=20mbit (repeatable; namespaces only)")
    s.add_argument("--ring-order", choices=["measured", "shuffled", "start"], default="measured",
                   help="bench: peers join in a seeded random order and the coordinator reorders the ring "
                        "from the bandwidth probes (measured, default), or the ring keeps that random "
                        "order (shuffled: probes off), or the start order peer0, peer1, ... (start)")
    s.add_argument("--churn", action="store_true", help="random faults from --seed, one at a time")
    s.add_argument("--faults", default="", help=f"churn: comma-separated kinds (default: all the network "
                                                f"supports); known: {','.join(F.KINDS)}")
    s.add_argument("--gap", default="3,8", help="churn: seconds between faults, MIN,MAX (default 3,8)")
    s.add_argument("--schedule", default=None, help="JSON fault schedule (see peer/faults.py)")
    s.add_argument("--seed", type=int, default=None, help="seed for the churn plan and targets (default: random)")
    s.add_argument("--max-peers", type=int, default=0, help="churn: joins stop at this many (default peers+2)")
    s.add_argument("--op-timeout", type=float, default=60.0, help="deadline of one op (default 60 s)")
    s.add_argument("--workdir", default=None, help="keep records and history here (default: a temp dir)")
    s.add_argument("--png", default=None, help="write a timeline PNG (members, ops, faults) here")
    s.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def config_from_args(a: argparse.Namespace) -> "SimConfig":
    from peer.sim.simulate import SimConfig

    peer_links: dict[str, LinkSpec] = {}
    for item in a.peer_link:
        name, sep, spec = item.partition("=")
        if not sep:
            raise LocalError(f"--peer-link {item!r}: expected PEER=RATE")
        peer_links[f"peer{name}" if name.isdigit() else name] = parse_link(spec)
    paths: dict[tuple[str, str], float] = {}
    for item in a.path:
        pair, sep, rate = item.partition("=")
        x, dash, y = pair.partition("-")
        if not sep or not dash:
            raise LocalError(f"--path {item!r}: expected A-B=RATE")
        ends = tuple(f"peer{n}" if n.isdigit() else n for n in (x, y))
        paths[(ends[0], ends[1])] = parse_rate(rate)
    lo, _, hi = a.gap.partition(",")
    try:
        gap = (float(lo), float(hi or lo))
    except ValueError:
        raise LocalError(f"--gap {a.gap!r}: expected MIN,MAX seconds") from None
    kinds = tuple(k for k in a.faults.split(",") if k)
    for k in kinds:
        if k not in F.KINDS:
            raise LocalError(f"--faults: unknown kind {k!r}")
    elems = int(a.mb * (1 << 20)) // 4 if a.mb is not None else a.elems
    return SimConfig(peers=a.peers, duration=a.duration, network=a.network, link=parse_link(a.link),
                     peer_links=peer_links, proxy=a.proxy or a.delay > 0 or a.jitter > 0, delay_s=a.delay,
                     jitter_s=a.jitter, workload=a.workload, elems=elems, pause=a.pause, bench_ops=a.ops,
                     bench_warmup=a.warmup, ring_order=a.ring_order, paths=paths, churn=a.churn, kinds=kinds,
                     gap=gap,
                     schedule=F.load_schedule(a.schedule) if a.schedule else [],
                     seed=a.seed if a.seed is not None else random.randrange(1 << 31),
                     max_peers=a.max_peers, op_timeout=a.op_timeout,
                     workdir=Path(a.workdir) if a.workdir else None, png=Path(a.png) if a.png else None)


def run_cli(a: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(a)
    except (LocalError, OSError) as exc:
        print(f"swarmtrain simulate: {exc}", file=sys.stderr)
        return 2
    from peer.sim.simulate import Simulation

    say = (lambda text: None) if a.json else (lambda text: print(f"  {text}", flush=True))
    if not a.json:
        print(f"swarmtrain simulate: {cfg.peers} peers, {cfg.duration:g}s, seed {cfg.seed}", flush=True)
    try:
        rep = Simulation(cfg, say).run()
    except (LocalError, NetnsError) as exc:  # a plan this network cannot carry out; everything was cleaned up
        print(f"swarmtrain simulate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("swarmtrain simulate: interrupted; every process, namespace and link it made is gone",
              file=sys.stderr)
        return 130
    if a.json:
        print(json.dumps(rep))
    else:
        print_table(rep)
    return 0 if rep.get("ok", True) else 1


def build_report(cfg: "SimConfig", history: list[dict[str, Any]], check: Optional[dict[str, Any]],
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


def ring_bottleneck(cfg: "SimConfig", ring: list[str]) -> Optional[float]:
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
