"""One peer of the wall-clock experiment (started by ``examples/diloco_wallclock.py`` inside a network
namespace; not meant to be run by hand).

Arms (``--arm``):
- ``dp``: data parallel through swarmtrain, the README's loop: every step the flattened gradients are
  averaged with ``swarm.comm.all_reduce(op="avg")`` (``with_retry``), then AdamW steps;
- ``ddp``: ``torch.distributed`` DistributedDataParallel over Gloo on the same links (rendezvous on peer 0);
- ``diloco``: ``peer.train.diloco.DiLoCo`` with ``--H``, ``--mode`` (sync / eager) and ``--codec``.

Every arm starts from the same warm start (weights and AdamW state), runs at a constant inner LR, and stops
after ``--budget`` seconds from a start time all peers share (peer 0's clock, all-reduced). Data parallel
arms carry a stop flag in their step's all-reduce, so every peer stops after the same step; DiLoCo arms stop
at the first sync boundary past the budget. Peer 0 writes weight snapshots (``Snapshots``), evaluated by the
runner afterwards so evaluation costs no training time.

Compute time = batch sampling + forward + backward + the inner optimizer's step (timed with optimizer step
hooks; for DDP the backward is counted until DDP's communication hook fires, i.e. until the gradients are
ready). Compute utilisation = compute time / wall-clock between the start and the stop. Lines on stdout are
JSON events: ``ready``, ``budget`` (the measurements), ``done``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from examples.charlm import load_corpus
from examples.wallclock_state import (BATCH, DATA_SEED, LR, MODEL, Snapshots, load_cached_corpus, load_state,
                                      new_model_and_optimizer)
from peer.config import PeerConfig, SecurityConfig
from peer.swarm import Swarm, with_retry
from peer.train.diloco import DiLoCo, RoundRecord
from peer.train.outer import flatten_params

log = logging.getLogger("wallclock_worker")
DDP_PORT = 29511          # the TCPStore of the DDP arm, on peer 0's own namespace address
SETUP_TIMEOUT = 300.0


def emit(event: str, **kw: Any) -> None:
    print(json.dumps({"event": event, **kw}), flush=True)


def link_bytes(dev: str = "eth0") -> tuple[int, int]:
    """(received, sent) bytes of this namespace's interface, from /proc/net/dev (0, 0 if absent)."""
    for line in Path("/proc/net/dev").read_text(encoding="utf-8").splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == dev:
            f = rest.split()
            return int(f[0]), int(f[8])
    return 0, 0


class Clock:
    """Compute time of inner steps: forward/backward measured by the loop, the optimizer step by hooks."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.compute = 0.0
        self._t = 0.0
        inner.register_step_pre_hook(self._pre)
        inner.register_step_post_hook(self._post)

    def _pre(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.compute += time.perf_counter() - self._t


class Run:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.corpus = load_cached_corpus(Path(a.corpus)) if a.corpus else load_corpus()
        self.model, self.inner = new_model_and_optimizer(a.lr)
        load_state(Path(a.warm), self.model, self.inner)
        for g in self.inner.param_groups:
            g["lr"] = a.lr
        self.params = list(self.model.parameters())
        self.gen = torch.Generator().manual_seed(DATA_SEED + a.rank)
        self.clock = Clock(self.inner)
        self.steps = 0
        self.samples = 0.0          # samples (all peers) that went into the delivered weights
        self.syncs = 0
        self.t0 = 0.0
        self.snaps: Optional[Snapshots] = None
        self.net0 = (0, 0)

    def batch_loss(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x, y = self.corpus.batch("train", BATCH, MODEL.block, self.gen)          # (B, T), (B, T)
        logits = forward(x)                                                       # (B, T, V)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def start(self, t0: float) -> None:
        self.t0 = t0
        self.net0 = link_bytes()
        if self.a.rank == 0:
            self.snaps = Snapshots(Path(self.a.snapdir), t0, self.a.snap_every)

    def snapshot(self, flat: np.ndarray, force: bool = False) -> None:
        if self.snaps is not None:
            self.snaps.maybe(flat, self.samples, self.steps, self.syncs, force=force)

    def report(self, extra: dict[str, Any]) -> None:
        wall = time.time() - self.t0
        rx, tx = link_bytes()
        emit("budget", rank=self.a.rank, wall_s=round(wall, 3), compute_s=round(self.clock.compute, 3),
             utilisation=round(self.clock.compute / wall, 4), steps=self.steps, syncs=self.syncs,
             samples=self.samples, link_rx=rx - self.net0[0], link_tx=tx - self.net0[1], **extra)
        if self.snaps is not None:
            self.snaps.close()

    # ------------------------------------------------------------------ swarmtrain arms
    def swarm(self) -> Swarm:
        a = self.a
        swarm = Swarm(PeerConfig(peer_id=a.name, host=a.host, join=(a.join,),
                                 security=SecurityConfig(secret_file=a.secret, key_file=a.key)))
        swarm.wait_admitted(SETUP_TIMEOUT)
        swarm.wait_for_members(a.world, SETUP_TIMEOUT)
        return swarm

    def common_t0(self, reduce: Callable[[np.ndarray], Any]) -> float:
        t = np.array([time.time() if self.a.rank == 0 else 0.0], np.float64)
        reduce(t)
        return float(t[0])

    def run_dp(self) -> None:
        swarm = self.swarm()
        try:
            if swarm.peers_pending:
                swarm.update_topology(SETUP_TIMEOUT)
            emit("ready", rank=self.a.rank, members=swarm.members)
            self.start(self.common_t0(lambda t: swarm.comm.all_reduce(t, op="sum", timeout=SETUP_TIMEOUT)))
            t_end = self.t0 + self.a.budget
            n = sum(p.numel() for p in self.params)
            buf = np.zeros(n + 1, np.float32)                  # (n + 1,) gradients, then the stop flag
            while True:
                tc = time.perf_counter()
                loss = self.batch_loss(self.model)
                torch.autograd.backward(loss)
                self.clock.compute += time.perf_counter() - tc
                off = 0
                for p in self.params:
                    assert p.grad is not None
                    k = p.numel()
                    buf[off:off + k] = p.grad.detach().numpy().reshape(-1)
                    off += k
                buf[n] = 1.0 if time.time() >= t_end else 0.0
                if swarm.peers_pending:
                    swarm.update_topology(SETUP_TIMEOUT)
                metrics = with_retry(swarm, lambda: swarm.comm.all_reduce(buf, op="avg", timeout=120.0))
                off = 0
                for p in self.params:
                    k = p.numel()
                    assert p.grad is not None
                    p.grad.copy_(torch.from_numpy(buf[off:off + k]).reshape(p.shape))
                    off += k
                self.inner.step()
                self.inner.zero_grad()
                self.steps += 1
                self.syncs += 1
                self.samples += BATCH * len(metrics.get("members", [])) or BATCH * self.a.world
                stop = bool(buf[n] > 0)
                self.snapshot(flatten_params(self.params), force=stop)
                if stop:
                    break
            self.report({"bytes_sent": swarm.stats["bytes_sent"], "members": swarm.members})
        finally:
            swarm.close()

    def run_diloco(self) -> None:
        a = self.a
        swarm = self.swarm()
        holder: list[DiLoCo] = []

        def on_round(rec: RoundRecord) -> None:
            if not rec.committed or not holder:
                return
            self.syncs += 1
            self.samples += rec.samples
            self.snapshot(holder[0].theta)

        try:
            opt = DiLoCo(self.model, self.inner, swarm, inner_steps=a.H, outer_lr=a.outer_lr,
                         outer_momentum=a.outer_momentum, codec=a.codec, mode=a.mode, on_round=on_round)
            holder.append(opt)
            emit("ready", rank=a.rank, members=swarm.members)
            self.start(self.common_t0(lambda t: swarm.comm.all_reduce(t, op="sum", timeout=SETUP_TIMEOUT)))
            t_end = self.t0 + a.budget
            while True:
                tc = time.perf_counter()
                loss = self.batch_loss(self.model)
                torch.autograd.backward(loss)
                self.clock.compute += time.perf_counter() - tc
                opt.step(samples=BATCH)
                opt.zero_grad()
                self.steps += 1
                if opt.steps_since == 0 and time.time() >= t_end:
                    break
            self.snapshot(opt.theta, force=True)
            self.report({"bytes_sent": swarm.stats["bytes_sent"], "faults": opt.faults,
                         "revision": opt.revision, "members": swarm.members})
        finally:
            swarm.close()

    # ------------------------------------------------------------------ torch.distributed DDP
    def run_ddp(self) -> None:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from torch.nn.parallel import DistributedDataParallel as DDP

        a = self.a
        os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
        timeout = timedelta(seconds=SETUP_TIMEOUT)
        host, _, port = a.ddp_master.rpartition(":")
        from torch._C._distributed_c10d import TCPStore

        store = TCPStore(host, int(port), a.world, is_master=a.rank == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=a.rank, world_size=a.world, timeout=timeout)
        try:
            ddp = DDP(self.model)
            hooks: list[float] = []

            world = dist.group.WORLD
            assert world is not None

            def timed(bucket: Any) -> Any:
                hooks.append(time.perf_counter())
                return default_hooks.allreduce_hook(world, bucket)

            # a lambda: DDP refuses a hook whose annotations are not (literally) GradBucket -> Future
            ddp.register_comm_hook(None, lambda state, bucket: timed(bucket))
            emit("ready", rank=a.rank)

            def reduce(t: np.ndarray) -> None:
                tt = torch.from_numpy(t)
                dist.all_reduce(tt)

            self.start(self.common_t0(reduce))
            t_end = self.t0 + a.budget
            buckets = 0
            while True:
                flag = torch.tensor([1.0 if time.time() >= t_end else 0.0])
                fut = dist.all_reduce(flag, async_op=True)
                hooks.clear()
                tc = time.perf_counter()
                loss = self.batch_loss(ddp)
                torch.autograd.backward(loss)
                self.clock.compute += (hooks[0] if hooks else time.perf_counter()) - tc
                buckets = max(buckets, len(hooks))
                assert fut is not None
                fut.wait()
                self.inner.step()
                self.inner.zero_grad()
                self.steps += 1
                self.syncs += 1
                self.samples += BATCH * a.world
                stop = bool(flag[0] > 0)
                self.snapshot(flatten_params(self.params), force=stop)
                if stop:
                    break
            self.report({"ddp_buckets": buckets})
        finally:
            dist.destroy_process_group()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=["dp", "ddp", "diloco"], required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--host", required=True, help="this peer's address (its namespace's eth0)")
    ap.add_argument("--join", default="", help="swarmtrain arms: the coordinator's HOST:PORT")
    ap.add_argument("--ddp-master", default="", help="ddp arm: peer 0's HOST:PORT for the TCPStore")
    ap.add_argument("--secret", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--corpus", default="", help="the corpus saved by wallclock_state.save_corpus (faster)")
    ap.add_argument("--warm", required=True, help="the warm-start file (wallclock_state.save_state)")
    ap.add_argument("--budget", type=float, required=True, help="seconds of training after the common start")
    ap.add_argument("--snapdir", default="", help="peer 0: where to write weight snapshots")
    ap.add_argument("--snap-every", type=float, default=3.0, help="seconds between snapshots at least")
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--H", type=int, default=50)
    ap.add_argument("--mode", choices=["sync", "eager"], default="sync")
    ap.add_argument("--codec", default="none", choices=["none", "fp16", "bf16", "int8"])
    ap.add_argument("--outer-lr", type=float, default=1.0)
    ap.add_argument("--outer-momentum", type=float, default=0.5)
    ap.add_argument("--log-level", default="WARNING")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, a.log_level.upper(), logging.WARNING), stream=sys.stderr,
                        format=f"%(asctime)s {a.name} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    run = Run(a)
    if a.arm == "dp":
        run.run_dp()
    elif a.arm == "ddp":
        run.run_ddp()
    else:
        run.run_diloco()
    emit("done", rank=a.rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
