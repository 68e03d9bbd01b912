"""One training peer that is a whole machine: K local processes (GPUs, or CPU processes with Gloo), DDP
inside the machine, one swarm member (local rank 0) running DiLoCo's outer sync; snapshots and resume.

On each machine (same swarm secret everywhere; ``swarmtrain keygen --secret swarm.secret`` makes one)::

    torchrun --standalone --nproc-per-node 8 examples/multi_gpu_peer.py --bootstrap --port 7000 \\
        --secret swarm.secret --snapshot-dir snaps --snapshot-every 10          # the first machine
    torchrun --standalone --nproc-per-node 8 examples/multi_gpu_peer.py --join firsthost:7000 \\
        --secret swarm.secret                                                   # the others
    torchrun --standalone --nproc-per-node 8 examples/multi_gpu_peer.py --bootstrap --port 7000 \\
        --secret swarm.secret --resume snaps                                    # after losing every peer

``--model charlm`` (default) trains the byte-level LM of ``examples/charlm.py``; ``--model tiny`` is the
4-6-2 MLP on synthetic data the tests use. ``--workload experts`` trains the MoE LM of ``examples/moe_lm.py``
with sparse expert sync instead (``LocalExpertSync``, no DDP; ``--model tiny``: a tiny MoE on random bytes;
no snapshots); ``--workload pipeline`` serves one pipeline stage, each micro-batch split over the local ranks
(``LocalPipeline``; ``examples/multi_gpu_pipeline.py``)::

    torchrun --standalone --nproc-per-node 8 examples/multi_gpu_peer.py --workload experts --join firsthost:7000 \\
        --secret swarm.secret --inner-steps 50 --owners-per-expert 2

Each local rank draws its own data (seeded by machine id, local rank and step). Rank 0 prints one JSON line
per sync point (``--events``) and every rank prints a final ``done`` line with digests of its parameters and
outer state. docs/multi-gpu.md explains the design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import zlib
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from examples.moe_lm import MoEConfig, MoELM
from peer.config import PeerConfig, SecurityConfig, Timeouts
from peer.swarm import Swarm
from peer.train.diloco import DiLoCo, RoundRecord
from peer.train.experts import SyncRecord
from peer.train.local_experts import LocalExpertSync
from peer.train.local_fsdp import LocalFSDPDiLoCo
from peer.train.local_group import LocalDiLoCo, LocalGroup, close_on_error
from peer.train.outer import flatten_params, load_params, state_digest
from recovery.snapshot import open_snapshot
from recovery.snapshot_writer import Snapshotter, load_outer, outer_specs

log = logging.getLogger("multi_gpu_peer")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--join", action="append", default=[], help="HOST:PORT of the coordinator or any peer")
    ap.add_argument("--bootstrap", action="store_true", help="start a new swarm (rank 0 is the coordinator)")
    ap.add_argument("--id", default=None, help="this machine's peer id (default: random)")
    ap.add_argument("--host", default="127.0.0.1", help="address rank 0 binds (0.0.0.0 for other machines)")
    ap.add_argument("--port", type=int, default=0, help="port rank 0 binds (0: any free port)")
    ap.add_argument("--secret", default="", help="the swarm secret file (default $SWARMTRAIN_SECRET)")
    ap.add_argument("--key", default="", help="rank 0's key file (default $SWARMTRAIN_KEY)")
    ap.add_argument("--insecure", action="store_true", help="no encryption or authentication (trusted nets)")
    ap.add_argument("--local-timeouts", action="store_true", help="fast swarm timeouts (one machine, tests)")
    ap.add_argument("--group-timeout", type=float, default=1800.0,
                    help="seconds before a collective of the machine's process group fails (default 1800; "
                         "longer than the slowest outer sync)")
    ap.add_argument("--workload", choices=["diloco", "experts", "pipeline"], default="diloco",
                    help="diloco: DDP + DiLoCo; experts: an MoE LM with sparse expert sync; pipeline: one "
                         "pipeline stage, each micro-batch split over the local ranks (examples/multi_gpu_pipeline.py)")
    ap.add_argument("--stages", type=int, default=4, help="--workload pipeline: pipeline stages")
    ap.add_argument("--stage", type=int, default=-1, help="--workload pipeline: ask to serve this stage")
    ap.add_argument("--blocks-per-stage", type=int, default=2, help="--workload pipeline --model charlm")
    ap.add_argument("--micro-batches", type=int, default=8, help="--workload pipeline: per step")
    ap.add_argument("--steps", type=int, default=100, help="--workload pipeline: stop at this many committed steps")
    ap.add_argument("--model", choices=["charlm", "tiny"], default="charlm")
    ap.add_argument("--fsdp", action="store_true",
                    help="--workload diloco: shard the model with FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--owners-per-expert", type=int, default=2, help="--workload experts: owners of an expert")
    ap.add_argument("--seed", type=int, default=0, help="model init seed (the same on every machine)")
    ap.add_argument("--machine", type=int, default=-1,
                    help="this machine's data seed (default: derived from --id)")
    ap.add_argument("--batch", type=int, default=16, help="samples per local rank per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="inner AdamW learning rate")
    ap.add_argument("--inner-steps", type=int, default=50)
    ap.add_argument("--outer-steps", type=int, default=20, help="stop when the swarm's revision reaches this")
    ap.add_argument("--outer-lr", type=float, default=0.7)
    ap.add_argument("--outer-momentum", type=float, default=0.9)
    ap.add_argument("--op-timeout", type=float, default=600.0)
    ap.add_argument("--snapshot-dir", default="", help="rank 0 snapshots the outer state here")
    ap.add_argument("--snapshot-every", type=int, default=1, help="a snapshot every K revisions")
    ap.add_argument("--resume", default="", help="start from this snapshot (a snapshot dir or a root)")
    ap.add_argument("--events", action="store_true", help="JSON lines on stdout")
    ap.add_argument("--step-events", action="store_true",
                    help="--workload experts: every rank prints a digest of its parameters after every step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--log-level", default="warning")
    return ap


def tiny_model(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def tiny_batch(machine: int, rank: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_000 * machine + 1000 * rank + step)
    x = torch.randn(batch, 4, generator=g)
    return x, torch.sin(x[:, :2] * (1 + machine))


def tiny_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = ((model(x) - y) ** 2).mean()
    return out


def tiny_moe(seed: int) -> MoELM:
    """A tiny MoE LM (2 layers of 4 experts, top-2; ~15k parameters), the same on every machine for a seed."""
    torch.manual_seed(seed)
    return MoELM(MoEConfig(block=8, width=16, layers=2, heads=2, experts=4, top_k=2, expert_hidden=16))


def tiny_moe_batch(machine: int, rank: int, step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_000 * machine + 1000 * rank + step)
    seq = torch.randint(0, 256, (batch, 9), generator=g)                    # (B, T + 1) random bytes
    return seq[:, :-1], seq[:, 1:]


def params_digest(params: list[torch.nn.Parameter]) -> str:
    return hashlib.sha256(flatten_params(params).tobytes()).hexdigest()


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    torch.set_num_threads(a.threads)
    group = LocalGroup.from_env(timeout=a.group_timeout)
    pid = a.id or f"m-{zlib.crc32(str(a.port).encode() + str(a.join).encode()):08x}"
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s {pid}/{group.rank} %(levelname)s %(name)s: %(message)s")
    machine = a.machine if a.machine >= 0 else zlib.crc32(pid.encode()) % 1000

    def emit(obj: dict[str, Any]) -> None:
        if a.events:
            print(json.dumps(obj), flush=True)

    if a.workload == "experts":
        return train_experts(a, group, pid, machine, emit)
    if a.workload == "pipeline":
        if a.snapshot_dir or a.resume:
            raise SystemExit("--snapshot-dir and --resume: --workload diloco only in this example")
        from examples.multi_gpu_pipeline import train_pipeline
        swarm = leader_swarm(a, group, pid, emit)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        return train_pipeline(a, group, pid, swarm, emit)
    if a.model == "tiny":
        module = tiny_model(a.seed).to(group.device)
    else:
        from examples.charlm import CharLM, LMConfig, load_corpus
        corpus, lm = load_corpus(), LMConfig()
        torch.manual_seed(a.seed)
        module = CharLM(lm).to(group.device)
    if a.fsdp:   # FSDP2: each rank holds a shard of every parameter (per block for the LM, then the root)
        from torch.distributed.fsdp import fully_shard
        for block in getattr(module, "blocks", []):
            fully_shard(block)
        fully_shard(module)
        ddp: torch.nn.Module = module
    else:
        ddp = DDP(module, device_ids=[group.device.index] if group.device.type == "cuda" else None)
    inner = torch.optim.AdamW(module.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(1000 * machine + group.rank)
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for p in module.parameters()]
    # every rank checks the snapshot before joining: a corrupt one stops the whole peer here, naming the file
    resumed = resume_state(a.resume, names, shapes) if a.resume else None
    swarm = leader_swarm(a, group, pid, emit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # torchrun stops the others: leave cleanly
    with close_on_error(group, swarm):
        snaps = Snapshotter(a.snapshot_dir, every=a.snapshot_every) if a.snapshot_dir and swarm else None

        def on_round(rec: RoundRecord) -> None:
            emit({"event": "round", "id": pid, "revision": rec.revision, "committed": rec.committed,
                  "digest": rec.digest, "samples": rec.samples, "my_samples": rec.my_samples,
                  "members": rec.members, "adopted": rec.adopted, "kind": rec.kind, "reason": rec.reason})
            if snaps is not None and rec.committed and opt.opt is not None:
                snaps.capture(opt.opt.revision, outer_specs(names, shapes, opt.opt.theta, opt.opt.mom),
                              meta={"peer": pid})

        kw: dict[str, Any] = {}
        if swarm is not None:
            kw = dict(outer_lr=a.outer_lr, outer_momentum=a.outer_momentum, op_timeout=a.op_timeout,
                      on_round=on_round)
            if resumed is not None:
                state = resumed
                kw["diloco_factory"] = lambda *args, **dkw: ResumedDiLoCo(state, *args, **dkw)
        local_diloco = LocalFSDPDiLoCo if a.fsdp else LocalDiLoCo
        opt = local_diloco(module, inner, group, swarm, inner_steps=a.inner_steps, **kw)
        step = 0
        while opt.revision < a.outer_steps:
            if a.model == "tiny":
                x, y = tiny_batch(machine, group.rank, step, a.batch)
                loss = tiny_loss(ddp, x.to(group.device), y.to(group.device))
            else:
                x, y = corpus.batch("train", a.batch, lm.block, gen)
                logits = ddp(x.to(group.device))  # through the DDP wrapper: its hooks average the gradients
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                         y.to(group.device).reshape(-1))
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step(samples=a.batch)
            opt.zero_grad()
            step += 1
        opt.finish()
        if snaps is not None:
            snaps.close()
        print(json.dumps({"event": "done", "id": pid, "rank": group.rank, "revision": opt.revision,
                          "steps": step, "digest": opt.digest.hex(),
                          "params": params_digest(list(getattr(opt, "mirror", module).parameters())),
                          "local_numel": sum(int(getattr(p, "to_local", lambda: p)().numel())   # an FSDP shard
                                             for p in module.parameters()),
                          "machine_samples": opt.machine_samples}), flush=True)
    return 0


def leader_swarm(a: argparse.Namespace, group: LocalGroup, pid: str,
                 emit: Callable[[dict[str, Any]], None]) -> Optional[Swarm]:
    """Local rank 0 joins (or starts) the swarm; the other ranks get None."""
    if not group.is_leader:
        return None
    cfg = PeerConfig(peer_id=pid, host=a.host, port=a.port, join=tuple(a.join), coordinator=a.bootstrap,
                     timeouts=Timeouts.local() if a.local_timeouts else Timeouts(),
                     security=SecurityConfig(secret_file=a.secret, key_file=a.key, insecure=a.insecure))
    swarm = Swarm(cfg)
    emit({"event": "listening", "id": swarm.id, "addr": swarm.addr})
    return swarm


def train_experts(a: argparse.Namespace, group: LocalGroup, pid: str, machine: int,
                  emit: Callable[[dict[str, Any]], None]) -> int:
    """``--workload experts``: the MoE LM with sparse expert sync on every rank (``LocalExpertSync``)."""
    if a.snapshot_dir or a.resume:
        raise SystemExit("--snapshot-dir and --resume: --workload diloco only in this example")
    from examples.charlm import load_corpus
    if a.model == "tiny":
        model = tiny_moe(a.seed).to(group.device)
    else:
        corpus, cfg = load_corpus(), MoEConfig()
        torch.manual_seed(a.seed)
        model = MoELM(cfg).to(group.device)
    gen = torch.Generator().manual_seed(1000 * machine + group.rank)
    swarm = leader_swarm(a, group, pid, emit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with close_on_error(group, swarm):
        def on_sync(rec: SyncRecord) -> None:
            emit({"event": "sync", "id": pid, "revision": rec.revision, "committed": rec.committed,
                  "digest": rec.digest, "samples": rec.samples, "my_samples": rec.my_samples,
                  "members": rec.members, "owned": rec.owned, "kind": rec.kind, "reason": rec.reason})

        kw: dict[str, Any] = {}
        if swarm is not None:
            kw = dict(owners_per_expert=a.owners_per_expert, outer_lr=a.outer_lr, outer_momentum=a.outer_momentum,
                      op_timeout=a.op_timeout, on_sync=on_sync)
        opt = LocalExpertSync(model, lambda ps: torch.optim.AdamW(ps, lr=a.lr), group, swarm,
                              sync_steps=a.inner_steps, **kw)
        step = 0
        while opt.revision < a.outer_steps:
            if a.model == "tiny":
                x, y = tiny_moe_batch(machine, group.rank, step, a.batch)
            else:
                x, y = corpus.batch("train", a.batch, cfg.block, gen)
            model.loss(x.to(group.device), y.to(group.device)).backward()  # type: ignore[no-untyped-call]
            opt.step(samples=a.batch)
            opt.zero_grad()
            step += 1
            if a.step_events:
                print(json.dumps({"event": "step", "rank": group.rank, "step": step, "revision": opt.revision,
                                  "owned": sorted(opt.owned), "params": params_digest(opt.layout.order)}),
                      flush=True)
        opt.finish()
        print(json.dumps({"event": "done", "id": pid, "rank": group.rank, "revision": opt.revision,
                          "steps": step, "digest": opt.digest.hex(), "params": params_digest(opt.layout.order),
                          "owned": sorted(opt.owned), "machine_samples": opt.machine_samples}), flush=True)
    return 0


def resume_state(path: str, names: list[str], shapes: list[tuple[int, ...]]
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    snap = open_snapshot(path)
    snap.verify()  # a corrupt or truncated snapshot is refused here, naming the file
    log.warning("resuming from %s (revision %d)", snap.path, snap.revision)
    return load_outer(snap, names, shapes)


class ResumedDiLoCo(DiLoCo):
    """DiLoCo whose first state is a snapshot's: loaded before the entry sync, so the swarm's state sync
    (highest legal revision wins) makes it the swarm's state unless a live state is newer. The integration
    patch gives DiLoCo this as ``resume=``; until then, this subclass sets DiLoCo's public state."""

    def __init__(self, state: tuple[np.ndarray, np.ndarray, int], *args: Any, **kw: Any) -> None:
        self.resume_from = state
        super().__init__(*args, **kw)

    def _enter(self) -> None:
        theta, mom, revision = self.resume_from
        self.theta[...], self.mom[...] = theta, mom
        self.revision, self.has_state = revision, True
        self.digest = state_digest(self.theta, self.mom)
        load_params(self.params, self.theta)
        super()._enter()


if __name__ == "__main__":
    sys.exit(main())
