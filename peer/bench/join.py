"""``swarmtrain bench join``: how long a join takes with authentication and without, in the same run.

In one process over loopback: a standalone coordinator; then ``trials`` fresh peers join one after another,
each timed from ``Swarm(...)`` (sockets, key file created and loaded) until it is admitted, then it leaves.
Every joiner has a new key, so each secure join pays the whole first-contact path: CURVE handshakes both
ways, the ZAP decision, the ``Hello`` proof of the swarm secret, then Join -> Welcome -> EpochUpdate. The
coordinator admits at once while it has fewer than two members, so no topology vote is in the timing.

    swarmtrain bench join --trials 20 [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from collectives import keys
from peer.config import PeerConfig, SecurityConfig
from peer.swarm import Swarm


def time_joins(trials: int, secure: bool, workdir: Path) -> list[float]:
    """Seconds from start to admitted for ``trials`` successive first-time joiners."""
    secret = workdir / "swarm.secret"
    if secure and not secret.exists():
        keys.save_secret(secret, keys.new_secret())

    def security(name: str) -> SecurityConfig:
        if not secure:
            return SecurityConfig(insecure=True)
        return SecurityConfig(secret_file=str(secret), key_file=str(workdir / f"{name}.key"))

    tag = "s" if secure else "i"
    coord = Swarm(PeerConfig(peer_id=f"coord-{tag}", coordinator=True, member=False,
                             security=security(f"coord-{tag}")))
    seconds: list[float] = []
    try:
        entry = coord.addr.removeprefix("tcp://")
        for i in range(trials):
            name = f"join-{tag}{i}"
            t0 = time.perf_counter()
            peer = Swarm(PeerConfig(peer_id=name, join=(entry,), security=security(name)))
            try:
                peer.wait_admitted(timeout=30)
                seconds.append(time.perf_counter() - t0)
            finally:
                peer.close()
    finally:
        coord.node.close()
    return seconds


def _summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1e3, 2), "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1e3, 2),
            "min_ms": round(xs[0] * 1e3, 2), "max_ms": round(xs[-1] * 1e3, 2)}


def run_join_bench(a: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # joins and leaves would log a line each
    trials = max(1, min(int(a.trials), 50))  # beyond ~60 new keys a second the rate limit on new keys applies
    with tempfile.TemporaryDirectory(prefix="swarmtrain-joinbench-") as tmp:
        secure = _summary(time_joins(trials, True, Path(tmp)))
        insecure = _summary(time_joins(trials, False, Path(tmp)))
    out: dict[str, Any] = {"trials": trials, "secure": secure, "insecure": insecure,
                           "ratio_median": round(secure["median_ms"] / insecure["median_ms"], 3)}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"join time, start to admitted, {trials} first-time joiners each (loopback, one process)")
        for name, s in (("secure (CURVE+ZAP+Hello)", secure), ("insecure (plain TCP)", insecure)):
            print(f"  {name:<26} median {s['median_ms']:7.2f} ms   p90 {s['p90_ms']:7.2f} ms   "
                  f"min {s['min_ms']:7.2f} ms   max {s['max_ms']:7.2f} ms")
        print(f"  ratio secure/insecure (median) = {out['ratio_median']:.2f}")
    return 0
