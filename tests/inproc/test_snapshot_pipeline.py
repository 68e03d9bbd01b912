"""Pipeline snapshots and a resume with another stage count, live (in-process peers over loopback):

- a 2-stage pipeline trains with a snapshot of every committed step (each peer its own directory, its
  stage under global parameter names); then every peer is lost;
- the union of one directory only (a stage's snapshots missing) is refused, naming the missing parameters;
- 3 new peers resume it as a 3-stage pipeline: the weights they load equal the snapshotted ones bit for
  bit, the first step is the snapshot's step, and training goes on exactly as if nothing had happened (equal,
  bit for bit, to one process training the whole model: 1 replica per stage, optimizer state restored);
- the 3-stage snapshots resume as 2 stages again; a corrupted tensor is refused on every member (nothing is
  taken), and once repaired the same members resume and train on."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

from peer import Swarm
from peer.train.pipeline import Pipeline
from peer.train.pipeline_snapshots import StageLayout, open_union, resume_and_snapshot, resume_pipeline
from recovery.snapshot import SnapshotCorrupt, SnapshotError, SnapshotNotFound, open_snapshot
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_pipeline import train_in_one_process

pytestmark = pytest.mark.timeout(150)

D, BLOCKS, M, LR, K, N = 8, 6, 2, 0.01, 3, 2


class Stage(torch.nn.Module):
    """``inp`` on the first stage, ``blocks`` (Linear + tanh), ``out`` on the last."""

    def __init__(self, blocks: int, first: bool, last: bool) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, D) if first else None
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(blocks))
        self.out = torch.nn.Linear(D, 3) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inp is not None:
            x = self.inp(x)                       # (B, 4) -> (B, D)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.out(x) if self.out is not None else x   # (B, 3) on the last stage


def make_stages(num: int, seed: int = 0) -> list[torch.nn.Module]:
    """Weights from a generator of ``seed`` (not torch's global one: peers build theirs in threads)."""
    g = torch.Generator().manual_seed(seed)
    stages: list[torch.nn.Module] = [Stage(BLOCKS // num, i == 0, i == num - 1) for i in range(num)]
    with torch.no_grad():
        for st in stages:
            for p in st.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return stages


def get_batch(step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7919 * step + m)
    x = torch.randn(3, 4, generator=g)
    return x, torch.sin(x[:, :3])


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def make_opt(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(ps, lr=LR)


def peer(swarm: Swarm, num: int, stage: int, until: int, snap_dir: Path, resume: Optional[list[Path]] = None
         ) -> tuple[Pipeline, dict[str, bytes]]:
    """One peer: build a ``num``-stage pipeline, resume from the union of ``resume`` if given, snapshot every
    committed step into ``snap_dir``, train until ``until`` committed steps. Returns the pipeline and the
    weights it held before its first step (global name -> bytes)."""
    stages = make_stages(num, seed=stage + 100 * num)   # resumed weights must not depend on these
    layout = StageLayout.numbered(stages)
    union = open_union(resume, layout) if resume else None
    pipe = Pipeline(swarm, stages, make_opt, micro_batches=M, example=get_batch(0, 0), loss_fn=mse, stage=stage,
                    op_timeout=20.0)
    snaps = resume_and_snapshot(pipe, layout, union, snap_dir, every=1)
    assert snaps is not None
    loaded = global_weights(pipe.stages, layout, [pipe.stage]) if union is not None else {}
    try:
        while pipe.committed < until:
            pipe.step(get_batch)
    finally:
        snaps.close()
    return pipe, loaded


def global_weights(stages: list[torch.nn.Module], layout: StageLayout, which: list[int]) -> dict[str, bytes]:
    return {layout.names[s][n]: p.detach().numpy().tobytes() for s in which for n, p in stages[s].named_parameters()}


def union_weights(paths: list[Path], layout: StageLayout) -> dict[str, bytes]:
    union = open_union(paths, layout)
    out = {}
    for s in range(layout.num_stages):
        out.update({g: a.tobytes() for g, a in union.stage_arrays(layout, s)[0].items()})
    return out


def reference(steps: int) -> tuple[dict[str, bytes], list[float]]:
    """One process training the whole model (the 2-stage modules, initial weights as the swarm's)."""
    stages = [make_stages(2, seed=200)[0], make_stages(2, seed=201)[1]]   # what peers 0 and 1 built
    losses = train_in_one_process(stages, steps, get_batch, make_opt, M)
    return global_weights(stages, StageLayout.numbered(stages), [0, 1]), losses


def lose_everyone(inproc: InProcess) -> None:
    for s in inproc.swarms:
        if s.node._thread.is_alive():
            inproc.crash(s)


def committed(pipe: Pipeline) -> list[tuple[int, Optional[float]]]:
    return [(r.step, r.loss) for r in pipe.history if r.committed]


def test_two_stages_resume_as_three_and_back_as_two(inproc: InProcess, tmp_path: Path) -> None:
    ref, ref_losses = reference(K + N)

    # 2 stages, a snapshot of every committed step; then every peer is lost
    _, peers = form_swarm(inproc, 2)
    two = [tmp_path / f"two-{i}" for i in range(2)]
    first = run_all([partial(peer, p, 2, i, K, two[i]) for i, p in enumerate(peers)], timeout=100)
    assert all(isinstance(r, tuple) for r in first), first
    held: dict[str, bytes] = {}
    for p, _ in first:
        held.update(global_weights(p.stages, StageLayout.numbered(p.stages), [p.stage]))
    assert held == reference(K)[0]                              # (1 replica per stage: one process's bits)
    lose_everyone(inproc)

    # the union of the survivors' directories: complete only with both stages' snapshots
    three = StageLayout.numbered(make_stages(3))
    assert union_weights(two, three) == held                   # every stage, bit for bit, under global names
    with pytest.raises(SnapshotNotFound) as exc:
        open_union(two[:1], three)
    assert "blocks.3.weight" in str(exc.value) and "out.weight" in str(exc.value)

    # resume as 3 stages: loaded bytes = snapshot bytes, the step counter continues, training goes on
    _, peers = form_swarm(inproc, 3)
    dirs3 = [tmp_path / f"three-{i}" for i in range(3)]
    second = run_all([partial(peer, p, 3, i, K + N, dirs3[i], two) for i, p in enumerate(peers)], timeout=100)
    assert all(isinstance(r, tuple) for r in second), second
    for p, loaded in second:
        assert loaded and loaded.items() <= held.items()        # the loaded bytes are the snapshot's
        assert [s for s, _ in committed(p)] == list(range(K, K + N))
        assert [loss for _, loss in committed(p)] == ref_losses[K:]
    resumed: dict[str, bytes] = {}
    for p, _ in second:
        resumed.update(global_weights(p.stages, three, [p.stage]))
    assert resumed == ref                                       # as if the swarm had never gone down
    lose_everyone(inproc)

    # and back as 2 stages; a corrupted tensor is refused by every member, nothing is taken
    victim = next(d for d in (tmp_path / "three-2").iterdir() if d.name.endswith(f"{K + N:012d}"))
    entry = next(e for e in open_snapshot(victim).entries.values() if e.param == "out.weight")
    bad = victim / entry.file
    raw = bytearray(bad.read_bytes())
    raw[0] ^= 0xFF
    bad.write_bytes(bytes(raw))
    _, peers = form_swarm(inproc, 2)
    layout2 = StageLayout.numbered(make_stages(2))
    union2 = open_union(dirs3, layout2)                         # the manifests are fine: found at read time
    pipes = [Pipeline(p, make_stages(2), make_opt, micro_batches=M, example=get_batch(0, 0), loss_fn=mse,
                      stage=i, op_timeout=20.0) for i, p in enumerate(peers)]
    errors = run_all([partial(resume_pipeline, p, union2, layout2) for p in pipes], timeout=60)
    assert isinstance(errors[1], SnapshotCorrupt) and errors[1].path == bad      # stage 1 reads out.weight
    assert isinstance(errors[0], SnapshotError) and "nothing resumed" in str(errors[0])
    assert all(p.committed == -1 for p in pipes)
    raw[0] ^= 0xFF
    bad.write_bytes(bytes(raw))
    reports = run_all([partial(resume_pipeline, p, open_union(dirs3, layout2), layout2) for p in pipes], timeout=60)
    assert [r.stage for r in reports] == [0, 1] and all(r.optimizer == "restored" for r in reports), reports
    back: dict[str, bytes] = {}
    for p in pipes:
        back.update(global_weights(p.stages, layout2, [p.stage]))
    assert back == resumed
    run_all([partial(p.step, get_batch) for p in pipes], timeout=60)
    assert all(committed(p)[0][0] == K + N and p.committed == K + N + 1 for p in pipes)


def test_the_example_stages_have_stage_count_independent_names() -> None:
    """examples/pipeline_lm.py's stages: 2 x 2 blocks and 4 x 1 block hold the same global parameters."""
    from examples.charlm import LMConfig
    from examples.pipeline_lm import make_stages as lm_stages

    c = LMConfig(block=8, width=8)
    a, b = StageLayout.numbered(lm_stages(c, 2, 2)), StageLayout.numbered(lm_stages(c, 4, 1))
    assert a.shapes == b.shapes and sorted(a.all_names()) == sorted(b.all_names())
    assert {g for g in b.names[3].values()} >= {"blocks.3.qkv.weight"}
    assert np.unique([a.stage_of[g] for g in b.names[3].values()]).tolist() == [1]


def test_checkfree_plus_copies_are_refreshed_from_the_resumed_owners(inproc: InProcess, tmp_path: Path) -> None:
    """CheckFree+ (swapped order, edge copies refreshed every 2 steps): the copies are not in snapshots, so a
    resumed holder refreshes its copy at the first step although step 3 is no refresh step: its copy is then
    exactly the owner's snapshotted edge layer."""
    from tests.inproc.test_pipeline_copies import edge_stages, plus_order, tokens
    from tests.inproc.test_pipeline_copies import make_opt as edge_opt

    def run(swarm: Swarm, stage: int, until: int, snap_dir: Path, resume: Optional[list[Path]] = None) -> Pipeline:
        stages = edge_stages(2, seed=10 + stage)
        layout = StageLayout.per_stage(stages)            # both stages have a "lin"
        pipe = Pipeline(swarm, stages, edge_opt, micro_batches=M, example=tokens(0, 0), order=plus_order(2),
                        stage=stage, copy_every=2, op_timeout=20.0)
        snaps = resume_and_snapshot(pipe, layout, open_union(resume, layout) if resume else None, snap_dir)
        assert snaps is not None
        try:
            while pipe.committed < until:
                pipe.step(tokens)
        finally:
            snaps.close()
        return pipe

    _, peers = form_swarm(inproc, 2)
    dirs = [tmp_path / f"plus-{i}" for i in range(2)]
    first = run_all([partial(run, p, i, K, dirs[i]) for i, p in enumerate(peers)], timeout=80)
    assert all(isinstance(p, Pipeline) for p in first), first
    lose_everyone(inproc)
    _, peers = form_swarm(inproc, 2)
    again = run_all([partial(run, p, i, K + 1, tmp_path / f"again-{i}", dirs) for i, p in enumerate(peers)],
                    timeout=80)
    assert all(isinstance(p, Pipeline) for p in again), again
    held = open_snapshot(dirs[0])
    assert held.revision == K
    holder = next(p for p in again if p.stage == 1)
    emb = next(e for e in holder.edges.edges if e.holder == 1)
    assert emb.rev == K                                   # refreshed at the first step after the resume
    for n, c in emb.copy.named_parameters():
        assert c.detach().numpy().tobytes() == held.load(f"stage/0.edge_in.{n}").tobytes(), n
