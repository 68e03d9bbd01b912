"""The byte-level LM of ``examples/charlm.py`` as a task for ``swarmtrain peer --workload train``.

Run from the repository root (the task module is imported from the current directory)::

    swarmtrain keygen --secret swarm.secret
    swarmtrain peer --bootstrap --port 7000 --secret swarm.secret --workload train \\
        --task examples.charlm_task:task --outer-steps 100 --inner-steps 25 --snapshot-dir snaps
    swarmtrain peer --join 127.0.0.1:7000 --secret swarm.secret --workload train \\
        --task examples.charlm_task:task --outer-steps 100 --inner-steps 25
    # after every peer was lost: the first peer restarts the swarm from its snapshots
    swarmtrain peer --bootstrap --port 7000 --secret swarm.secret --workload train \\
        --task examples.charlm_task:task --outer-steps 100 --inner-steps 25 --resume snaps

Options (``--task-arg KEY=VALUE``): ``width`` (64), ``layers`` (2), ``block`` (context bytes, 64), ``batch``
(16), ``lr`` (inner AdamW, 4e-3), ``data`` (``stdlib``: the Python standard library's sources; ``synthetic``:
a small generated corpus, for tests). Every peer starts from the same weights (``--seed``) and draws its
own batches (seeded by its peer id and its local step). ``examples/train_swarm.py`` is the same model with
a learning-rate schedule and readable output.
"""

from __future__ import annotations

import zlib

import torch

from collectives.errors import LocalError
from examples.charlm import CharLM, LMConfig, evaluate, load_corpus
from examples.pipeline_lm import synthetic_corpus
from peer.train.task import Batch, Task, TaskContext


def task(ctx: TaskContext) -> Task:
    cfg = LMConfig(block=ctx.option("block", 64), width=ctx.option("width", 64), layers=ctx.option("layers", 2))
    batch, lr, data = ctx.option("batch", 16), ctx.option("lr", 4e-3), ctx.option("data", "stdlib")
    if data not in ("stdlib", "synthetic"):
        raise LocalError(f"--task-arg data must be stdlib or synthetic, not {data!r}")
    corpus = load_corpus() if data == "stdlib" else synthetic_corpus(seed=ctx.seed)
    torch.manual_seed(ctx.seed)
    model = CharLM(cfg)
    inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    mine = zlib.crc32(ctx.peer_id.encode())
    val = corpus.val_windows(cfg.block, 64)

    def batches(step: int) -> Batch:
        gen = torch.Generator().manual_seed(mine * 1_000_003 + step)   # this peer's data, a function of step
        return corpus.batch("train", batch, cfg.block, gen)

    return Task(model, inner, batches, loss=lambda _m, b: model.loss(b[0], b[1]),
                evaluate=lambda _m: evaluate(model, val))
