"""The ``swarmtrain simulate`` flags (``add_args``) and the ``SimConfig`` they describe (``config_from_args``).

Cheap to import: every ``python -m peer`` builds this parser; the simulation itself is not imported here.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from collectives.errors import LocalError
from peer.sim import faults as F
from peer.sim.config import SimConfig
from peer.sim.netns import LinkSpec, parse_link, parse_rate


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


def config_from_args(a: argparse.Namespace) -> SimConfig:
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
