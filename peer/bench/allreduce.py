"""``swarmtrain bench allreduce``: our ring all-reduce vs torch.distributed Gloo, same N, same size, same run.

Bus bandwidth = 2(N-1)/N x bytes / seconds per op (the bytes each peer must move in a ring), in GB/s
(1e9 bytes/s). The time per op is the slowest peer's mean over the timed iterations, and includes
swarmtrain's commit round trip to the coordinator and (unless --no-digest) the BLAKE2b parity digest.
swarmtrain runs secure (CURVE-encrypted, authenticated links) unless ``--insecure``; run both to see what
security costs on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from peer.bench.gloo import run_gloo_allreduce
from peer.sim.procs import LocalProcs


def swarmtrain_allreduce(n: int, nbytes: int, iters: int, warmup: int, slice_bytes: int,
                         digest: bool, timeout: float = 600.0, codec: str = "none", streams: int = 1,
                         insecure: bool = False, retain_freed_mb: float = 256) -> dict[str, Any]:
    elems = nbytes // 4
    with tempfile.TemporaryDirectory(prefix="swarmtrain-bench-") as tmp, \
            LocalProcs(Path(tmp), insecure=insecure) as lp:
        coord = lp.coordinator()
        extra = ["--workload", "bench", "--elems", str(elems), "--ops", str(iters), "--warmup", str(warmup),
                 "--expect", str(n), "--slice-bytes", str(slice_bytes), "--streams", str(streams),
                 "--retain-freed-mb", str(retain_freed_mb)]
        if not digest:
            extra.append("--no-digest")
        if codec != "none":
            extra += ["--codec", codec]
        names = [f"bench{i}" for i in range(n)]
        for name in names:
            lp.peer(name, [coord.hostport], extra, record=False)
        results = [lp.wait_done(name, timeout) for name in names]
    if not all(r.get("correct") for r in results):
        raise RuntimeError(f"swarmtrain all-reduce gave a wrong result: {results}")
    sec = max(r["seconds_per_op"] for r in results)
    phases = op_phases([r.get("timeline", []) for r in results])
    return {"backend": "swarmtrain", "peers": n, "bytes": nbytes, "seconds_per_op": sec,
            "busbw_gbps": 2 * (n - 1) / n * nbytes / sec / 1e9,
            "rel_error": max(r.get("rel_error", 0.0) for r in results),
            "peak_mem_over_buffer": max(r.get("peak_mem_over_buffer", 0.0) for r in results),
            "peak_mem_since_start": any(r.get("peak_mem_since_start", True) for r in results),
            "page_faults_per_op": max(r.get("page_faults_per_op", 0.0) for r in results),
            "commit_wait_s": max(r.get("commit_wait_s", 0.0) for r in results),
            "commit_copy_s": max(r.get("commit_copy_s", 0.0) for r in results), **phases}


def op_phases(timelines: list[list[Any]]) -> dict[str, float]:
    """Where an op's time goes across members, from each peer's (started, done, verdict, finished) per timed
    op on the driver's monotonic clock (one host: every process reads the same clock). Medians over ops, in
    seconds: ``ring_s`` a member's own ring part (started -> done), ``start_skew_s`` and ``done_skew_s``
    the spread between members, ``verdict_rtt_s`` the last member done -> the first verdict in (the
    coordinator's turn), ``verdict_skew_s`` the spread of the verdict's arrival."""
    ops = min((len(t) for t in timelines), default=0)
    if not timelines or not ops:
        return {}
    rows = [[t[k] for t in timelines] for k in range(ops)]

    def spread(i: int) -> float:  # median over ops of how far apart the members' i-th instants were
        return statistics.median(max(r[i] for r in row) - min(r[i] for r in row) for row in rows)

    return {"ring_s": statistics.median(d - s for row in rows for s, d, _, _ in row),
            "start_skew_s": spread(0), "done_skew_s": spread(1), "verdict_skew_s": spread(2),
            "verdict_rtt_s": statistics.median(min(r[2] for r in row) - max(r[1] for r in row) for row in rows)}


def catchup(sources: int, mb: float, timeout: float = 600.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="swarmtrain-catchup-") as tmp, LocalProcs(Path(tmp)) as lp:
        coord = lp.coordinator()
        common = ["--state-mb", str(mb), "--expect", str(sources + 1)]
        names = [f"src{i}" for i in range(sources)]
        for name in names:
            lp.peer(name, [coord.hostport], ["--workload", "catchup-source", *common], record=False)
        lp.peer("joiner", [coord.hostport], ["--workload", "catchup-joiner", *common], record=False)
        joiner = lp.wait_done("joiner", timeout)
        for name in names:
            lp.wait_done(name, timeout)
    return {"sources": sources, "mb": mb, "seconds": round(joiner["seconds"], 3),
            "bytes_received": joiner["bytes_received"],
            "throughput_mb_s": round(joiner["bytes_received"] / (1 << 20) / joiner["seconds"], 1)}


def run_bench(a: argparse.Namespace) -> int:
    if a.bench == "catchup":
        rows = [catchup(int(s), a.mb) for s in a.sources.split(",")]
        if a.json:
            print(json.dumps({"catchup": rows}))
        else:
            for r in rows:
                print(f"catch-up of {r['mb']:g} MiB from {r['sources']} source(s): {r['seconds']:.2f} s "
                      f"({r['throughput_mb_s']:.0f} MiB/s, hashes verified)")
        return 0
    nbytes = int(a.mb * (1 << 20)) // 4 * 4
    ours = swarmtrain_allreduce(a.peers, nbytes, a.iters, a.warmup, int(a.slice_mb * (1 << 20)),
                                not a.no_digest, codec=a.codec, insecure=getattr(a, "insecure", False),
                                streams=a.streams, retain_freed_mb=a.retain_freed_mb)
    # with a codec, bus bandwidth counts uncompressed bytes reduced per second (effective bandwidth)
    out: dict[str, Any] = {"peers": a.peers, "mb": a.mb, "iters": a.iters, "codec": a.codec,
                           "swarmtrain_busbw_gbps": round(ours["busbw_gbps"], 4),
                           "swarmtrain_seconds_per_op": round(ours["seconds_per_op"], 5),
                           "rel_error_vs_exact": ours["rel_error"],
                           "peak_mem_over_buffer": round(ours["peak_mem_over_buffer"], 2),
                           # True where the OS cannot reset the peak: then it may predate the buffer
                           "peak_mem_since_start": ours["peak_mem_since_start"],
                           "page_faults_per_op": round(ours["page_faults_per_op"]),
                           "retain_freed_mb": a.retain_freed_mb,
                           "commit_wait_ms": round(ours["commit_wait_s"] * 1e3, 1),
                           "commit_copy_ms": round(ours["commit_copy_s"] * 1e3, 1),
                           **{k[:-2] + "_ms": round(ours[k] * 1e3, 2) for k in
                              ("ring_s", "start_skew_s", "done_skew_s", "verdict_rtt_s", "verdict_skew_s")
                              if k in ours},
                           "parity_digest": not a.no_digest, "secure": not getattr(a, "insecure", False)}
    if not a.skip_gloo:
        gloo = run_gloo_allreduce(a.peers, nbytes, iters=a.iters, warmup=a.warmup)
        out["gloo_busbw_gbps"] = round(gloo["busbw_gbps"], 4)
        out["gloo_seconds_per_op"] = round(gloo["seconds_per_op"], 5)
        out["ratio"] = round(ours["busbw_gbps"] / gloo["busbw_gbps"], 3)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"all-reduce {a.mb:g} MiB float32, {a.peers} peers, {a.iters} iterations, "
              f"{'secure (CURVE)' if out['secure'] else 'INSECURE (plain TCP)'}")
        label = "effective bus bandwidth" if a.codec != "none" else "bus bandwidth"
        print(f"  swarmtrain  {label} {out['swarmtrain_busbw_gbps']:.3f} GB/s "
              f"({out['swarmtrain_seconds_per_op'] * 1e3:.1f} ms/op, codec {a.codec}, "
              f"relative error vs exact {out['rel_error_vs_exact']:.2e})")
        if "ratio" in out:
            print(f"  gloo        bus bandwidth {out['gloo_busbw_gbps']:.3f} GB/s "
                  f"({out['gloo_seconds_per_op'] * 1e3:.1f} ms/op)")
            print(f"  ratio swarmtrain/gloo = {out['ratio']:.2f}")
    return 0
