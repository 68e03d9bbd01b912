"""Two claims of the collective layer on emulated internet links (network namespaces, ``tc tbf`` shaping):

    python -m peer.bench.shaped int8       # int8 vs fp32 all-reduce: 4 peers, 20 Mbit/s links, 16 MiB
    python -m peer.bench.shaped catchup    # a joiner pulls 100 MiB from 3 sources vs 1, 20 Mbit/s uplinks
    python -m peer.bench.shaped int8 --json --mb 16 --link 20mbit --iters 3

Each run puts every peer process (and the coordinator) in its own namespace of one ``peer.sim.netns.Fabric``
and runs the peer CLI's workloads there (``--workload bench`` / ``catchup-source`` / ``catchup-joiner``);
the baseline (fp32, or one source) is measured in the same invocation, and the ratio is printed. The
coordinator's link is left unshaped: it carries membership and verdicts, no tensor data. Every namespace,
link and process is removed when a measurement ends (``LocalProcs.close``, then ``Fabric.close``).

On loopback these claims could not be shown because the CPU, not the link, was the limit; here each link is
a 20 Mbit/s bottleneck, so the link bytes decide.

Effective bus bandwidth = 2(N-1)/N x uncompressed bytes / seconds per op (slowest peer's mean), as in
``peer.bench.allreduce``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from peer.sim.net import NetnsNet
from peer.sim.netns import Fabric, LinkSpec, NetnsError, parse_link, probe
from peer.sim.procs import LocalProcs, Proc

log = logging.getLogger(__name__)

# the peers' membership timeouts: the CLI defaults (sized for the internet) are kept, only the progress
# deadline is raised, since a 16 MiB fp32 ring step on 20 Mbit/s takes seconds per chunk
PEER_ARGS = ["--op-progress-timeout", "60"]


class ShapedProcs:
    """Peer processes started by ``LocalProcs``, each inside its own namespace of one fabric."""

    def __init__(self, workdir: Path) -> None:
        self.fabric = Fabric.create()
        ok = False
        try:
            self.net = NetnsNet(self.fabric, workdir, sys.executable)
            self.lp = LocalProcs(workdir)
            ok = True
        finally:
            if not ok:  # any failure, KeyboardInterrupt included: remove the namespaces, then re-raise
                self.fabric.close()
        self.coord: Optional[Proc] = None

    def __enter__(self) -> "ShapedProcs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.lp.close()
        finally:
            self.net.close()

    def coordinator(self) -> Proc:
        ip, python = self.net.add("coord", LinkSpec())
        self.lp.python = python or sys.executable
        self.coord = self.lp.coordinator("coordinator", extra=["--host", ip])
        return self.coord

    def peer(self, name: str, link: LinkSpec, args: list[str]) -> Proc:
        assert self.coord is not None, "start the coordinator first"
        ip, python = self.net.add(name, link)
        self.lp.python = python or sys.executable
        return self.lp.peer(name, [self.coord.hostport], ["--host", ip, *PEER_ARGS, *args], record=False,
                            ready_timeout=60.0)


def shaped_allreduce(codec: str, peers: int, mb: float, link: LinkSpec, iters: int, warmup: int,
                     timeout: float = 900.0) -> dict[str, Any]:
    """Time ``iters`` all-reduces of ``mb`` MiB float32 among ``peers`` peers, each behind ``link``."""
    nbytes = int(mb * (1 << 20)) // 4 * 4
    with tempfile.TemporaryDirectory(prefix="swarmtrain-shaped-") as tmp, ShapedProcs(Path(tmp)) as sp:
        sp.coordinator()
        extra = ["--workload", "bench", "--elems", str(nbytes // 4), "--ops", str(iters), "--warmup",
                 str(warmup), "--expect", str(peers), "--codec", codec]
        names = [f"peer{i}" for i in range(peers)]
        for name in names:
            sp.peer(name, link, extra)
        results = [sp.lp.wait_done(name, timeout) for name in names]
    if codec == "none" and not all(r.get("correct") for r in results):
        raise RuntimeError(f"fp32 all-reduce gave a wrong result: {results}")
    sec = max(float(r["seconds_per_op"]) for r in results)
    return {"codec": codec, "peers": peers, "bytes": nbytes, "link": link.describe(),
            "seconds_per_op": round(sec, 4),
            "effective_busbw_mbit_s": round(2 * (peers - 1) / peers * nbytes * 8 / sec / 1e6, 2),
            "rel_error": max(float(r.get("rel_error", 0.0)) for r in results)}


def shaped_catchup(sources: int, mb: float, source_link: LinkSpec, timeout: float = 900.0) -> dict[str, Any]:
    """A joiner with an unshaped link pulls ``mb`` MiB of shared state from ``sources`` sources."""
    with tempfile.TemporaryDirectory(prefix="swarmtrain-shaped-") as tmp, ShapedProcs(Path(tmp)) as sp:
        sp.coordinator()
        common = ["--state-mb", str(mb), "--expect", str(sources + 1)]
        names = [f"src{i}" for i in range(sources)]
        for name in names:
            sp.peer(name, source_link, ["--workload", "catchup-source", *common])
        sp.peer("joiner", LinkSpec(), ["--workload", "catchup-joiner", *common])
        joiner = sp.lp.wait_done("joiner", timeout)
        for name in names:
            sp.lp.wait_done(name, timeout)
    return {"sources": sources, "mb": mb, "source_uplink": source_link.describe(),
            "seconds": round(float(joiner["seconds"]), 3), "bytes_received": int(joiner["bytes_received"]),
            "throughput_mbit_s": round(int(joiner["bytes_received"]) * 8 / float(joiner["seconds"]) / 1e6, 2)}


def run_int8(a: argparse.Namespace) -> dict[str, Any]:
    link = parse_link(a.link)
    fp32 = shaped_allreduce("none", a.peers, a.mb, link, a.iters, a.warmup)
    int8 = shaped_allreduce("int8", a.peers, a.mb, link, a.iters, a.warmup)
    ratio = fp32["seconds_per_op"] / int8["seconds_per_op"]
    return {"bench": "int8", "fp32": fp32, "int8": int8, "ratio": round(ratio, 3), "goal": 3.5,
            "met": ratio >= 3.5}


def run_catchup(a: argparse.Namespace) -> dict[str, Any]:
    link = LinkSpec(up_bps=parse_link(a.link).up_bps, down_bps=None)
    one = shaped_catchup(1, a.mb, link)
    many = shaped_catchup(a.sources, a.mb, link)
    ratio = one["seconds"] / many["seconds"]
    return {"bench": "catchup", "one": one, "many": many, "ratio": round(ratio, 3), "goal": 2.0,
            "met": ratio >= 2.0}


def _print(out: dict[str, Any]) -> None:
    if out["bench"] == "int8":
        for key in ("fp32", "int8"):
            r = out[key]
            print(f"  {key:5s} {r['peers']} peers, {r['bytes'] / (1 << 20):g} MiB, links {r['link']}: "
                  f"{r['seconds_per_op']:.2f} s/op, effective bus bandwidth {r['effective_busbw_mbit_s']:.1f} "
                  f"Mbit/s, relative error {r['rel_error']:.1e}")
        print(f"int8 / fp32 effective bandwidth = {out['ratio']:.2f}x (goal >= {out['goal']}x: "
              f"{'met' if out['met'] else 'NOT met'})")
    else:
        for key in ("one", "many"):
            r = out[key]
            print(f"  {r['sources']} source(s), uplinks {r['source_uplink']}: {r['mb']:g} MiB in "
                  f"{r['seconds']:.2f} s ({r['throughput_mbit_s']:.1f} Mbit/s, hashes verified)")
        print(f"catch-up speed-up with {out['many']['sources']} sources = {out['ratio']:.2f}x "
              f"(goal >= {out['goal']}x: {'met' if out['met'] else 'NOT met'})")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m peer.bench.shaped", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="bench", required=True)
    i = sub.add_parser("int8", help="int8 vs fp32 all-reduce effective bandwidth on shaped links")
    i.add_argument("--peers", type=int, default=4)
    i.add_argument("--mb", type=float, default=16, help="buffer in MiB of float32 (default 16)")
    i.add_argument("--link", default="20mbit", help="every peer's link, up/down (default 20mbit)")
    i.add_argument("--iters", type=int, default=3, help="timed all-reduces (default 3)")
    i.add_argument("--warmup", type=int, default=1, help="untimed all-reduces first (default 1)")
    c = sub.add_parser("catchup", help="a joiner's shared-state catch-up from N sources vs 1")
    c.add_argument("--mb", type=float, default=100, help="shared state in MiB (default 100)")
    c.add_argument("--sources", type=int, default=3, help="sources in the second run (default 3)")
    c.add_argument("--link", default="20mbit", help="each source's uplink (default 20mbit)")
    for p in (i, c):
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument("--log-level", default="WARNING")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s")
    ok, why = probe()
    if not ok:
        print(f"peer.bench.shaped: network namespaces unavailable: {why}", file=sys.stderr)
        return 2
    try:
        out = run_int8(a) if a.bench == "int8" else run_catchup(a)
    except NetnsError as exc:
        print(f"peer.bench.shaped: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(out))
    else:
        _print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
