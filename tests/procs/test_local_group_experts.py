"""Sparse expert sync on peers that are whole machines: two "machines" of 2 local processes each (Gloo inside,
rank 0 the swarm member, ``examples/multi_gpu_peer.py --workload experts --model tiny``: a tiny MoE LM,
one owner per expert), a few syncs.

- parity: after every step both local ranks of a machine hold the same parameters bit for bit (the same
  averaged gradients, the same ownership, the same rebuilt inner optimizer); after every sync all 4
  processes do, and they end with the same outer state and ownership;
- equality with a 2-peer run of the same data: two in-process ExpertSync peers with the machines' ids (so the
  same ownership), each computing the gradients of its machine's two shards and taking their mean as the
  machine's all-reduce does ((g0 + g1) / 2: a sum of two floats is the same in either order), with one
  intra-op thread like the ranks (kernels split their float sums by thread count), hold the same parameters
  after every step and commit the same digests;
- a local rank's failure fails the whole peer: SIGKILL rank 1 of a machine; its rank 0 stops with an error
  (no hang) and the swarm sees one peer leave.

The launcher is ``tests/procs/test_local_group.py``'s: the test hosts each machine's TCPStore on port 0 and
starts the ranks with torchrun's environment.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import pytest
import torch

from examples.moe_lm import MoELM
from examples.multi_gpu_peer import params_digest, tiny_moe, tiny_moe_batch
from peer import Swarm
from peer.train.experts import ExpertSync
from tests.helpers import InProcess, form_swarm, run_all
from tests.procs.test_local_group import Machine, kill_a_rank_after_a_sync, launch_machine, run_to_done

pytestmark = pytest.mark.timeout(240)  # 4 processes importing torch on a loaded 2-core box

H, BATCH, SYNCS, LR, OUTER_LR, MU = 3, 4, 3, 3e-3, 0.7, 0.9


def machine_args(inproc: InProcess, coord: Swarm, index: int, extra: Sequence[str] = ()) -> list[str]:
    return ["--workload", "experts", "--model", "tiny", "--id", f"p{index}", "--machine", str(index),
            "--join", coord.addr.removeprefix("tcp://"), "--key", str(inproc.keydir / f"p{index}.key"),
            "--local-timeouts", "--group-timeout", "40", "--batch", str(BATCH), "--lr", str(LR),
            "--inner-steps", str(H), "--outer-steps", str(SYNCS), "--outer-lr", str(OUTER_LR),
            "--outer-momentum", str(MU), "--owners-per-expert", "1", "--op-timeout", "30", "--events",
            "--step-events", *extra]


def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR)   # the example's inner optimizer


# ---------------------------------------------------------------- the 2-peer reference of the same data

def reference_peer(swarm: Swarm, machine: int, model: MoELM) -> tuple[ExpertSync, list[str]]:
    """One machine's data on one process: per step the mean of its 2 shards' gradients, computed as the
    machine's all-reduce does (a shard without a gradient for a parameter counts zeros; none on both: none).
    Returns the optimizer and the parameters' digest after every step. ``model``: ``tiny_moe(0)``, built
    before the threads start (its init draws from torch's global generator)."""
    opt = ExpertSync(model, make_opt, swarm, sync_steps=H, owners_per_expert=1, outer_lr=OUTER_LR,
                     outer_momentum=MU, op_timeout=30, alone_wait=2)
    after: list[str] = []
    step = 0
    while opt.revision < SYNCS:
        params = opt.trainable()
        shards: list[list[Optional[torch.Tensor]]] = []
        for rank in range(2):
            x, y = tiny_moe_batch(machine, rank, step, BATCH)
            opt.zero_grad()
            model.loss(x, y).backward()
            shards.append([None if p.grad is None else p.grad.clone() for p in params])
        for p, g0, g1 in zip(params, *shards):
            if g0 is None and g1 is None:
                p.grad = None
            else:
                p.grad = ((torch.zeros_like(p) if g0 is None else g0) + (torch.zeros_like(p) if g1 is None else g1)) / 2
        opt.step(samples=2 * BATCH)
        opt.zero_grad()
        step += 1
        after.append(params_digest(opt.layout.order))
    opt.finish()
    return opt, after


def events(m: Machine, rank: int, kind: str) -> list[dict[str, Any]]:
    return [e for e in m.lines[rank] if e.get("event") == kind]


def test_two_machines_of_two_processes_hold_the_same_bits_and_match_a_two_peer_run(
        inproc: InProcess, tmp_path: Path) -> None:
    coord = inproc.coordinator()
    machines, done = run_to_done(tmp_path, [machine_args(inproc, coord, i) for i in range(2)])
    flat = [d for ds in done for d in ds]
    assert all(d["revision"] == SYNCS and d["steps"] == H * SYNCS for d in flat)
    assert len({d["digest"] for d in flat}) == 1, "outer state differs between local ranks or machines"
    assert len({d["params"] for d in flat}) == 1
    assert all(s == 2 * BATCH * H for d in flat for s in d["machine_samples"])   # the machine's samples
    for ds in done:   # one owner per expert: the local ranks own the same experts, the machines split them
        assert ds[0]["owned"] == ds[1]["owned"]
    owned = [{tuple(x) for x in ds[0]["owned"]} for ds in done]
    assert owned[0] and owned[1] and not owned[0] & owned[1] and len(owned[0] | owned[1]) == 2 * 4

    steps = [[events(m, r, "step") for r in range(2)] for m in machines]
    for per_rank in steps:   # after every step, both local ranks of a machine hold the same bits
        assert [e["params"] for e in per_rank[0]] == [e["params"] for e in per_rank[1]]
        assert [e["owned"] for e in per_rank[0]] == [e["owned"] for e in per_rank[1]]
    for k in range(H - 1, H * SYNCS, H):   # after every sync, all 4 processes do
        assert steps[0][0][k]["params"] == steps[1][0][k]["params"], f"step {k + 1}"
        assert steps[0][0][k]["revision"] == (k + 1) // H

    syncs = [{e["revision"]: e for e in events(m, 0, "sync") if e["committed"]} for m in machines]
    assert sorted(syncs[0]) == list(range(1, SYNCS + 1))
    for rev in range(1, SYNCS + 1):
        assert syncs[0][rev]["digest"] == syncs[1][rev]["digest"]
        assert syncs[0][rev]["samples"] == 2 * 2 * BATCH * H   # W: both machines' samples
        assert sorted(syncs[0][rev]["members"]) == sorted(syncs[1][rev]["members"]) == ["p0", "p1"]

    # the same data on a 2-peer swarm, one process per machine, with the machines' ids
    _, peers = form_swarm(inproc, 2)
    models = [tiny_moe(0) for _ in peers]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (--threads 1): a kernel's float sums split by thread count
    try:
        ref = run_all([functools.partial(reference_peer, s, i, models[i]) for i, s in enumerate(peers)],
                      timeout=90)
    finally:
        torch.set_num_threads(threads)
    for r in ref:
        if isinstance(r, Exception):
            raise r
    for i, (opt, after) in enumerate(ref):
        assert after == [e["params"] for e in steps[i][0]], f"machine {i} differs from its 2-peer reference"
        assert {h.revision: h.digest for h in opt.history if h.committed and h.kind == "sync"} == \
            {rev: syncs[i][rev]["digest"] for rev in range(1, SYNCS + 1)}
        assert sorted(opt.owned) == sorted(owned[i])
    assert ref[0][0].digest.hex() == flat[0]["digest"]


def test_a_local_rank_dying_fails_the_whole_peer_and_the_swarm_sees_it_leave(
        inproc: InProcess, tmp_path: Path) -> None:
    """Machine p1 (2 local ranks) trains with an in-process peer; SIGKILL its rank 1 after a committed sync."""
    coord, [alone] = form_swarm(inproc, 1)
    stop = threading.Event()

    model = tiny_moe(0)

    def train_alone() -> None:
        opt = ExpertSync(model, make_opt, alone, sync_steps=H, owners_per_expert=1, op_timeout=30, alone_wait=1)
        step = 0
        while not stop.is_set():
            x, y = tiny_moe_batch(0, 0, step, BATCH)
            model.loss(x, y).backward()  # type: ignore[no-untyped-call]
            opt.step(samples=BATCH)
            opt.zero_grad()
            step += 1

    m = launch_machine(tmp_path, "m1", 2, machine_args(inproc, coord, 1, ["--outer-steps", "1000"]))
    kill_a_rank_after_a_sync(m, "p1", "sync", alone, train_alone, stop)
