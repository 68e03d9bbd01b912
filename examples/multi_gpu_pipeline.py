"""``examples/multi_gpu_peer.py --workload pipeline``: a machine of K local processes serves one pipeline
stage as one swarm member (``peer.train.local_pipeline.LocalPipeline``); every micro-batch reaching the stage
is split across the local ranks::

    torchrun --standalone --nproc-per-node 8 examples/multi_gpu_peer.py --workload pipeline --bootstrap \\
        --port 7000 --secret swarm.secret --stages 4 --stage 0 --micro-batches 8 --batch 16 --steps 1000
    torchrun --standalone --nproc-per-node 8 examples/multi_gpu_peer.py --workload pipeline \\
        --join firsthost:7000 --secret swarm.secret --stages 4 --micro-batches 8 --batch 16 --steps 1000

``--model charlm``: the staged byte-level LM of ``examples.pipeline_lm`` (identity order: no CheckFree+
copies on a local group), AdamW; ``--model tiny``: the 2-layer MLP stages the tests use, plain SGD. ``--batch``: rows of one
micro-batch (a multiple of K). Rank 0 reads the data; ``--step-events`` prints every rank's stage digest
after each committed step (taken after the next SYNC, i.e. as every rank holds them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from typing import Any, Callable, Optional

import torch

from peer.swarm import Swarm
from peer.train.local_group import LocalGroup, close_on_error
from peer.train.local_pipeline import LocalPipeline
from peer.train.pipeline import StepRecord

D, H = 6, 10     # the tiny stages: Linear(D, H) + Tanh, ..., Linear(H, D)


def tiny_stages(n: int, seed: int = 0) -> list[torch.nn.Module]:
    g = torch.Generator().manual_seed(seed)
    dims = [D] + [H] * (n - 1) + [D]
    stages: list[torch.nn.Module] = []
    for i in range(n):
        lin = torch.nn.Linear(dims[i], dims[i + 1])
        with torch.no_grad():
            for p in lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        stages.append(torch.nn.Sequential(lin, torch.nn.Tanh()) if i < n - 1 else lin)
    return stages


def tiny_pipeline_batch(rows: int) -> Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]:
    def get_batch(step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 + 97 * step + m)
        x = torch.randn(rows, D, generator=g)
        return x, torch.sin(2 * x)
    return get_batch


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def make_optimizer(model: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW for the LM; plain SGD for the tiny stages (the tests: a gradient's scale shows in the weights,
    which Adam's per-parameter normalisation would hide)."""
    if model == "tiny":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def stage_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_pipeline(a: argparse.Namespace, group: LocalGroup, pid: str, swarm: Optional[Swarm],
                   emit: Callable[[dict[str, Any]], None]) -> int:
    kw: dict[str, Any] = {}
    if a.model == "tiny":
        stages = tiny_stages(a.stages, a.seed)
        get_batch = tiny_pipeline_batch(a.batch)
        kw["loss_fn"] = mse
    else:
        from examples.charlm import LMConfig, load_corpus
        from examples.pipeline_lm import batches, make_stages
        cfg = LMConfig()
        stages = make_stages(cfg, a.stages, a.blocks_per_stage, a.seed)
        get_batch = batches(load_corpus(), a.batch, cfg.block, a.seed)
        kw["copy_every"] = 0
    with close_on_error(group, swarm):
        def on_step(rec: StepRecord) -> None:
            emit({"event": "step", "id": pid, "step": rec.step, "committed": rec.committed, "loss": rec.loss,
                  "revision": rec.step + 1 if rec.committed else rec.step,
                  "stage": rec.stage, "members": rec.members, "reason": rec.reason[:200],
                  "recoveries": [r["how"] for r in rec.recoveries]})

        if swarm is not None:
            kw.update(stage=a.stage if a.stage >= 0 else None, op_timeout=a.op_timeout, on_step=on_step,
                      join_timeout=a.op_timeout)
        pipe = LocalPipeline(group, swarm, stages, lambda ps: make_optimizer(a.model, ps, a.lr),
                             micro_batches=a.micro_batches, example=get_batch(0, 0), **kw)
        losses: list[float] = []
        while pipe.committed < a.steps:
            losses.append(pipe.step(get_batch))
            if a.step_events:   # the digest of the weights used by the step just committed
                print(json.dumps({"event": "rank_step", "rank": group.rank, "committed": pipe.committed,
                                  "stage": pipe.stage, "syncs": pipe.syncs, "loss": losses[-1],
                                  "params": stage_digest(stages[pipe.stage])}), flush=True)
        pipe.finish()
        done: dict[str, Any] = {"event": "done", "id": pid, "rank": group.rank, "committed": pipe.committed,
                                "stage": pipe.stage, "losses": losses, "rows": pipe.rows, "syncs": pipe.syncs,
                                "params": stage_digest(stages[pipe.stage])}
        if a.model == "tiny":   # small enough to print: the tests compare them with one process's maths
            done["weights"] = [p.detach().reshape(-1).tolist() for p in stages[pipe.stage].parameters()]
        print(json.dumps(done), flush=True)
    return 0
