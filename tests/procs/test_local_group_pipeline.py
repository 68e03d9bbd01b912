"""Pipeline stages on peers that are whole machines: two "machines" of 2 local processes each (Gloo inside,
rank 0 the swarm member, ``examples/multi_gpu_peer.py --workload pipeline --model tiny``), one stage each,
every micro-batch split over the machine's two ranks (``peer.train.local_pipeline``).

- parity: after every committed step both local ranks of a machine hold the same stage weights bit for bit
  and return the same loss, and each rank ran half of every micro-batch's rows;
- the maths: the losses and the final weights equal the pipeline's exact maths in one process (all stages in
  order, each micro-batch's loss / M backpropagated, one SGD step per stage: the gradients' scale shows) up to float rounding (the
  split sums a weight gradient as two half-batch partial sums);
- a local rank's failure fails the whole peer: SIGKILL rank 1 of a machine; its rank 0 stops with an error
  (no hang) and the swarm sees one peer leave.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from collectives.errors import SwarmError
from examples.multi_gpu_pipeline import mse, stage_digest, tiny_pipeline_batch, tiny_stages
from peer import Swarm
from peer.train.pipeline import Pipeline
from peer.train.pipeline_plan import NotEnoughPeers
from tests.helpers import InProcess, form_swarm
from tests.inproc.test_pipeline import train_in_one_process
from tests.procs.test_local_group import kill_a_rank_after_a_sync, launch_machine, run_to_done

pytestmark = pytest.mark.timeout(240)

STEPS, M, ROWS, LR = 4, 2, 4, 0.1


def machine_args(inproc: InProcess, coord: Swarm, index: int, stage: int, extra: Sequence[str] = ()) -> list[str]:
    return ["--workload", "pipeline", "--model", "tiny", "--id", f"m-{index}", "--join",
            coord.addr.removeprefix("tcp://"), "--key", str(inproc.keydir / f"m-{index}.key"), "--local-timeouts",
            "--group-timeout", "40", "--stages", "2", "--stage", str(stage), "--micro-batches", str(M),
            "--batch", str(ROWS), "--lr", str(LR), "--steps", str(STEPS), "--op-timeout", "30", "--events",
            "--step-events", *extra]


def one_process(steps: int) -> tuple[list[torch.nn.Module], list[float]]:
    stages = tiny_stages(2, 0)
    return stages, train_in_one_process(stages, steps, tiny_pipeline_batch(ROWS),
                                        lambda ps: torch.optim.SGD(ps, lr=LR), M)


def test_two_machines_split_every_micro_batch_and_hold_the_same_stage_bits(
        inproc: InProcess, tmp_path: Path) -> None:
    coord = inproc.coordinator()
    machines, done = run_to_done(tmp_path, [machine_args(inproc, coord, i, i) for i in range(2)])
    for i, (m, ds) in enumerate(zip(machines, done)):
        assert [d["stage"] for d in ds] == [i, i] and all(d["committed"] == STEPS for d in ds)
        assert ds[0]["params"] == ds[1]["params"], f"machine {i}: local ranks hold different stage weights"
        assert ds[0]["losses"] == ds[1]["losses"]
        assert [d["rows"] for d in ds] == [STEPS * M * ROWS // 2] * 2   # each rank ran half of every micro-batch
        per_rank = [[e for e in m.lines[r] if e.get("event") == "rank_step"] for r in range(2)]
        assert [e["committed"] for e in per_rank[0]] == list(range(1, STEPS + 1))
        assert [e["params"] for e in per_rank[0]] == [e["params"] for e in per_rank[1]]   # after every step
    assert done[0][0]["losses"] == done[1][0]["losses"]    # the commit vote's mean loss, on every member

    ref_stages, ref_losses = one_process(STEPS)
    np.testing.assert_allclose(done[0][0]["losses"], ref_losses, rtol=1e-5, atol=1e-7)
    for i in range(2):
        assert done[i][0]["params"] != stage_digest(tiny_stages(2, 0)[i])   # trained
        for got, want in zip(done[i][0]["weights"], ref_stages[i].parameters()):
            np.testing.assert_allclose(got, want.detach().reshape(-1).numpy(), rtol=1e-5, atol=1e-6)


def test_a_local_rank_dying_fails_the_whole_pipeline_peer_and_the_swarm_sees_it_leave(
        inproc: InProcess, tmp_path: Path) -> None:
    """Machine m-1 (2 local ranks, stage 1) trains with an in-process peer (stage 0); SIGKILL its rank 1
    after a committed step."""
    coord, [alone] = form_swarm(inproc, 1)
    stop = threading.Event()

    def train_alone() -> None:
        pipe = Pipeline(alone, tiny_stages(2, 0), lambda ps: torch.optim.SGD(ps, lr=LR), micro_batches=M,
                        example=tiny_pipeline_batch(ROWS)(0, 0), loss_fn=mse, stage=0, op_timeout=20,
                        join_timeout=5)
        while not stop.is_set():
            try:
                pipe.step(tiny_pipeline_batch(ROWS))
            except NotEnoughPeers:
                pass   # alone (before the machine joins, after it left): wait again, until stop

    m = launch_machine(tmp_path, "m1", 2, machine_args(inproc, coord, 1, 1, ["--steps", "100000"]))
    kill_a_rank_after_a_sync(m, "m-1", "step", alone, train_alone, stop)


def test_a_machine_joins_as_a_replica_copies_the_stage_and_trains_in_step_with_it(
        inproc: InProcess, tmp_path: Path) -> None:
    """Two in-process peers (stages 0 and 1) train; machine m-2 (2 local ranks) joins asking for stage 1: its
    rank 0 copies the stage from the in-process replica at a step boundary (weights and SGD state), the SYNC
    gives it to rank 1, and from then on every committed step leaves the machine's two ranks and the other
    replica with the same stage weights bit for bit (their gradients are summed over the replicas)."""
    coord, peers = form_swarm(inproc, 2)
    stop = threading.Event()
    seen: dict[int, str] = {}          # committed steps -> the in-process stage-1 replica's weights digest

    def train(swarm: Swarm, stage: int) -> Pipeline:
        pipe = Pipeline(swarm, tiny_stages(2, 0), lambda ps: torch.optim.SGD(ps, lr=LR), micro_batches=M,
                        example=tiny_pipeline_batch(ROWS)(0, 0), loss_fn=mse, stage=stage, op_timeout=20)
        while not stop.is_set():
            pipe.step(tiny_pipeline_batch(ROWS))
            if stage == 1:
                seen[pipe.committed] = stage_digest(pipe.stages[1])
        return pipe

    results: list[object] = [None, None]

    def run(i: int) -> None:
        try:
            results[i] = train(peers[i], i)
        except SwarmError as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    m = launch_machine(tmp_path, "m2", 2, machine_args(inproc, coord, 2, 1, ["--steps", "1000000"]))
    try:
        per_rank: list[list[dict[str, object]]] = [[], []]
        while len(per_rank[1]) < 4:    # four committed steps of the machine
            for r in range(2):
                e = m.until(r, "rank_step", 120)
                per_rank[r].append(e)
    finally:
        m.close()
        stop.set()
        for t in threads:
            t.join(60)
    step_events = [e for e in m.lines[0] if e.get("event") == "step" and e["committed"]]
    assert any("replica copy" in how for e in step_events for how in e["recoveries"]), step_events[:2]
    assert [e["params"] for e in per_rank[0]] == [e["params"] for e in per_rank[1]]
    for e in per_rank[0]:
        assert e["stage"] == 1
        assert seen[int(str(e["committed"]))] == e["params"], f"step {e['committed']}: replicas differ"
    assert all(isinstance(r, Pipeline) for r in results), results


def test_the_split_refuses_rows_that_do_not_divide() -> None:
    """A micro-batch of 3 rows on 2 local ranks: a clear error at construction (every rank)."""
    from collectives.errors import LocalError
    from peer.train.local_group import LocalGroup
    from peer.train.local_pipeline import LocalPipeline
    group = LocalGroup(rank=1, size=2, backend="gloo", device=torch.device("cpu"))
    with pytest.raises(LocalError, match="does not split over 2 local ranks"):
        LocalPipeline(group, None, tiny_stages(2, 0), lambda ps: torch.optim.AdamW(ps), micro_batches=M,
                      example=tiny_pipeline_batch(3)(0, 0))
