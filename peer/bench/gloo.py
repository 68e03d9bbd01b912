"""torch.distributed Gloo all-reduce baseline (loopback only).

Starts ``n_peers`` separate worker processes on this machine, each joining a
Gloo process group over 127.0.0.1, and times an all-reduce (SUM) of a float32
CPU tensor. The result is the number our own all-reduce is compared against.

Run from the repository root::

    python -m peer.bench.gloo --peers 2 --mb 64
    python -m peer.bench.gloo --help

or from Python::

    from peer.bench.gloo import run_gloo_allreduce
    run_gloo_allreduce(n_peers=4, nbytes=64 << 20)

Rendezvous goes through a ``TCPStore`` the parent serves on an ephemeral port
of 127.0.0.1; workers use ``GLOO_SOCKET_IFNAME=lo``. Nothing listens on any
other address. (``TCPStore("127.0.0.1", 0, is_master=True)`` alone would bind
the wildcard address ``*``, whatever host it is given, so the parent binds the
listening socket itself and hands it over with ``master_listen_fd``.)
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_REPO_ROOT = Path(__file__).resolve().parents[2]
_POLL_S = 0.05


def _worker(rank: int, world: int, port: int, nbytes: int, iters: int, warmup: int,
            timeout_s: float) -> dict[str, Any]:
    """Body of one worker process: join the group, time all-reduce, verify."""
    torch.set_num_threads(1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        t = torch.ones(nbytes // 4, dtype=torch.float32)
        for _ in range(warmup):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        elapsed = time.perf_counter() - start
        # Repeated in-place sums grow the values; check correctness on a fresh tensor.
        t.fill_(1.0)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return {"rank": rank, "seconds_per_op": elapsed / iters,
                "check": float(t[0]), "check_last": float(t[-1])}
    finally:
        dist.destroy_process_group()


def _loopback_store(timeout_s: float) -> dist.TCPStore:
    """Master TCPStore listening on 127.0.0.1 only, on a kernel-chosen port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((HOST, 0))
        sock.listen()
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    fd = sock.detach()  # the store owns the fd from here and closes it when destroyed
    try:
        store = dist.TCPStore(HOST, port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout_s), master_listen_fd=fd)
    except RuntimeError:
        os.close(fd)
        raise
    if store.port != port:
        raise RuntimeError(f"TCPStore reports port {store.port}, socket is on {port}")
    return store


def _tail(f: IO[bytes], limit: int = 2000) -> str:
    f.seek(0)
    return f.read().decode(errors="replace")[-limit:]


def run_gloo_allreduce(n_peers: int, nbytes: int, iters: int = 5, warmup: int = 2,
                       timeout_s: float = 120.0) -> dict[str, Any]:
    """Time a Gloo all-reduce of ``nbytes`` (float32) across ``n_peers`` local processes.

    Returns ``{"backend", "peers", "bytes", "seconds_per_op", "busbw_gbps"}`` where
    ``seconds_per_op`` is the slowest rank's mean over ``iters`` timed ops and
    ``busbw_gbps = 2*(n-1)/n * nbytes / seconds / 1e9``. Raises RuntimeError if a
    worker fails, returns a wrong sum, or the whole run exceeds ``timeout_s``;
    every child is killed and reaped before this returns or raises.
    """
    if n_peers < 1:
        raise ValueError(f"n_peers must be >= 1, got {n_peers}")
    if nbytes < 4 or nbytes % 4:
        raise ValueError(f"nbytes must be a positive multiple of 4, got {nbytes}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {iters}, {warmup}")
    deadline = time.monotonic() + timeout_s
    store = _loopback_store(timeout_s)
    port = store.port
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    logger.info("gloo bench: %d peers, %d bytes, store on %s:%d", n_peers, nbytes, HOST, port)
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[IO[bytes]] = []
    try:
        for rank in range(n_peers):
            err: IO[bytes] = tempfile.TemporaryFile()  # a file, not a pipe: a chatty rank cannot block
            errs.append(err)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "peer.bench.gloo", "--worker", "--rank", str(rank),
                 "--peers", str(n_peers), "--port", str(port), "--bytes", str(nbytes),
                 "--iters", str(iters), "--warmup", str(warmup), "--timeout", str(timeout_s)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env))
        # Poll so one rank crashing fails fast instead of leaving the rest hung in a collective.
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.returncode not in (None, 0):
                    raise RuntimeError(f"gloo worker {rank} exited {p.returncode}:\n{_tail(errs[rank])}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"gloo bench timed out after {timeout_s}s")
            time.sleep(_POLL_S)
        results: list[dict[str, Any]] = []
        for rank, p in enumerate(procs):
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            lines = out.decode(errors="replace").strip().splitlines()
            if p.returncode != 0 or not lines:
                raise RuntimeError(f"gloo worker {rank} exited {p.returncode} with no result:\n"
                                   f"{_tail(errs[rank])}")
            try:
                res = json.loads(lines[-1])
            except json.JSONDecodeError as e:
                raise RuntimeError(f"gloo worker {rank} printed {lines[-1]!r}") from e
            if res["check"] != float(n_peers) or res["check_last"] != float(n_peers):
                raise RuntimeError(f"gloo worker {rank} wrong sum {res}, expected {n_peers}:\n"
                                   f"{_tail(errs[rank])}")
            results.append(res)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for err in errs:
            err.close()
        del store
    seconds = max(r["seconds_per_op"] for r in results)
    busbw = 2 * (n_peers - 1) / n_peers * nbytes / seconds / 1e9
    return {"backend": "gloo", "peers": n_peers, "bytes": nbytes,
            "seconds_per_op": seconds, "busbw_gbps": busbw}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m peer.bench.gloo",
                                 description="Gloo all-reduce baseline over 127.0.0.1.")
    ap.add_argument("--peers", type=int, default=2, help="number of worker processes (default 2)")
    ap.add_argument("--mb", type=float, default=64.0,
                    help="tensor size in MiB (float32, 2**20 bytes each; default 64)")
    ap.add_argument("--iters", type=int, default=5, help="timed all-reduces (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed all-reduces first (default 2)")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds before the whole run is killed (default 120)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        res = _worker(args.rank, args.peers, args.port, args.bytes, args.iters, args.warmup,
                      args.timeout)
        print(json.dumps(res), flush=True)
        return
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    nbytes = int(args.mb * (1 << 20)) // 4 * 4
    print(json.dumps(run_gloo_allreduce(args.peers, nbytes, args.iters, args.warmup, args.timeout)))


if __name__ == "__main__":
    main()
