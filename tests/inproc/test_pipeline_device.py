"""Pipeline stages whose tensors live on a device: the shared-state syncs of the pipeline (replica copy,
neighbour fetch for a rebuild, edge-layer copy refresh) go through host copies of device tensors and write the
fetched ones back only when the sync succeeded (``recovery.shared_state.SharedState``).

Without a GPU the device path runs on CPU with ``MIRROR_CPU`` (CPU tensors mirrored as device tensors are):
the pipeline's recovery scenarios must still hold exactly (removing the write-back makes them fail). With a
GPU, two peers train stages on ``cuda`` against the one-process reference."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from peer.train.pipeline import Pipeline
from recovery import shared_state
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc import test_pipeline_copies as copies
from tests.inproc import test_pipeline_faults as faults
from tests.inproc.test_pipeline import M, get_batch, make_opt, make_stages, mse, reference, weights

pytestmark = pytest.mark.timeout(120)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


@pytest.fixture
def mirrored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_state, "MIRROR_CPU", True)


def test_mirror_writes_back_only_what_a_sync_fetched() -> None:
    dev = torch.arange(4, dtype=torch.float32)
    other = torch.ones(2)
    shared_state.MIRROR_CPU, saved = True, shared_state.MIRROR_CPU
    try:
        st = shared_state.SharedState({"a": dev, "b": other})
    finally:
        shared_state.MIRROR_CPU = saved
    assert st.tensors["a"] is not dev and set(st.device) == {"a", "b"}
    st.view("a")[:] = 7.0
    st.view("b")[:] = 9.0
    assert torch.equal(dev, torch.arange(4, dtype=torch.float32))   # nothing reaches the device before
    st.write_back(["a"])
    assert torch.equal(dev, torch.full((4,), 7.0)) and torch.equal(other, torch.ones(2))


def test_joiner_copy_through_host_mirrors(inproc: InProcess, mirrored: None) -> None:
    faults.test_joiner_copies_surviving_replica_exactly(inproc)


def test_rebuild_from_neighbours_through_host_mirrors(inproc: InProcess, mirrored: None) -> None:
    faults.test_last_replica_lost_joiner_gets_rebuild(inproc)


def test_swap_copy_rebuild_through_host_mirrors(inproc: InProcess, mirrored: None) -> None:
    copies.test_first_stage_lost_rebuilt_by_swap_copy(inproc)


@cuda
def test_two_stages_on_the_gpu_match_the_one_process_reference(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 2)
    steps = 4

    def train(swarm: object, stage: int) -> Pipeline:
        pipe = Pipeline(swarm, [s.cuda() for s in make_stages(2)], make_opt, micro_batches=M,  # type: ignore[arg-type]
                        example=get_batch(0, 0), loss_fn=mse, stage=stage, op_timeout=20.0)
        while pipe.committed < steps:
            pipe.step(get_batch)
        return pipe

    pipes = run_all([partial(train, p, i) for i, p in enumerate(peers)], timeout=100)
    assert all(isinstance(p, Pipeline) for p in pipes), pipes
    ref, ref_losses = reference(steps)
    for p in pipes:
        assert all(w.device.type == "cuda" for w in p.stages[p.stage].parameters())
        for a, b in zip(weights(p.stages[p.stage]), weights(ref[p.stage])):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
        assert [r.loss for r in p.history if r.committed] == pytest.approx(ref_losses, rel=1e-4)
