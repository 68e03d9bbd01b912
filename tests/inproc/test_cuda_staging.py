"""Host staging of device tensors (``peer.staging``): buffers reused across ops (no allocation per op),
copy-out only on commit (an abort leaves the tensor untouched), a timed-out op's buffers never reused.

The pool logic runs everywhere: ``stage(..., always=True)`` stages CPU tensors through unpinned buffers,
over a real in-process swarm. The tests marked ``cuda`` need a CUDA device (pinned buffers, CUDA tensors,
DiLoCo with a model on the GPU) and are skipped without one."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from collectives.errors import DeadlineExceeded, LocalError, OpAborted
from peer.staging import StagedHandle, StagingPool, needs_staging, stage
from peer.train.diloco import DiLoCo
from peer.train.outer import state_digest
from tests.helpers import InProcess, form_swarm, run_all

pytestmark = pytest.mark.timeout(60)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


class FakeHandle:
    """A handle whose outcome the test decides (what the op engine would resolve)."""

    def __init__(self, outcome: str, host: list[torch.Tensor], result: float = 0.0) -> None:
        self.kind, self.outcome, self.host, self.result = "all_reduce", outcome, host, result
        self.metrics: dict[str, Any] = {}

    def done(self) -> bool:
        return True

    def wait(self, timeout: float) -> Any:
        if self.outcome == "abort":
            raise OpAborted("aborted by the test")
        if self.outcome == "timeout":
            raise DeadlineExceeded("timed out in the test")
        for h in self.host:  # a commit writes the result into the host buffer
            h.fill_(self.result)
        return None


def test_buffers_are_reused_across_ops_not_allocated_per_op() -> None:
    pool = StagingPool(pin=False)
    grads = [torch.randn(100), torch.randn(3, 7)]
    ptrs = set()
    for op in range(5):
        st = stage(pool, grads, always=True)
        assert [h.shape for h in st.host] == [g.shape for g in grads]
        assert all(torch.equal(h, g) for h, g in zip(st.host, grads))  # copied in
        ptrs.add(tuple(h.data_ptr() for h in st.host))
        StagedHandle(FakeHandle("commit", st.host, float(op)), st).wait(1)
        assert all(bool((g == op).all()) for g in grads)  # copied out at commit
    assert pool.stats == {"allocations": 2, "reuses": 8, "dropped": 0} and len(ptrs) == 1


def test_abort_leaves_the_tensor_untouched_and_frees_the_buffers() -> None:
    pool = StagingPool(pin=False)
    t = torch.arange(10, dtype=torch.float32)
    st = stage(pool, [t], always=True)
    st.host[0].fill_(-1)  # as if the op had scribbled on its scratch copy
    with pytest.raises(OpAborted):
        StagedHandle(FakeHandle("abort", st.host), st).wait(1)
    assert torch.equal(t, torch.arange(10, dtype=torch.float32))
    stage(pool, [t], always=True)
    assert pool.stats["reuses"] == 1


def test_a_timed_out_op_never_gets_its_buffers_reused() -> None:
    pool = StagingPool(pin=False)
    t = torch.zeros(4)
    st = stage(pool, [t], always=True)
    with pytest.raises(DeadlineExceeded):
        StagedHandle(FakeHandle("timeout", st.host), st).wait(1)
    stage(pool, [t], always=True)
    assert pool.stats == {"allocations": 2, "reuses": 0, "dropped": 1}


def test_idle_bytes_are_bounded() -> None:
    pool = StagingPool(pin=False, max_idle_bytes=100)
    bufs = [pool.acquire(20, torch.float32) for _ in range(3)]  # 80 bytes each
    for b in bufs:
        pool.release(b)
    assert pool.idle_bytes == 80


def test_only_device_tensors_need_staging() -> None:
    assert not needs_staging([torch.zeros(2), torch.zeros(2).numpy()])
    assert needs_staging([torch.zeros(2), torch.zeros(2, device="meta")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")
def test_a_pinned_pool_without_cuda_is_refused() -> None:
    with pytest.raises(LocalError, match="pinned host memory needs CUDA"):
        StagingPool(pin=True)


def test_staged_all_reduce_over_a_real_swarm_reuses_buffers(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 2)
    pools = [StagingPool(pin=False) for _ in peers]
    tensors = [[torch.full((1000,), float(i + 1)), torch.full((5,), 10.0 * (i + 1))] for i in range(2)]

    def op(i: int) -> None:
        st = stage(pools[i], tensors[i], always=True)
        StagedHandle(peers[i].comm.all_reduce_multiple_async(st.host, op="sum"), st).wait(30)

    for _ in range(3):
        for r in run_all([lambda i=i: op(i) for i in range(2)]):
            assert not isinstance(r, Exception), r
    assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in range(2))
    assert float(tensors[0][0][0]) == 3 * 2 ** 2 and float(tensors[0][1][0]) == 30 * 2 ** 2
    assert all(p.stats["allocations"] == 2 and p.stats["reuses"] == 4 for p in pools)


# ---------------------------------------------------------------- on a GPU

@cuda
def test_cuda_staging_is_pinned_and_round_trips() -> None:
    pool = StagingPool()
    t = torch.randn(1 << 16, device="cuda")
    ref = t.clone()
    st = stage(pool, [t])
    assert st.host[0].is_pinned() and st.host[0].device.type == "cpu"
    assert torch.equal(st.host[0], ref.cpu())
    StagedHandle(FakeHandle("commit", st.host, 2.0), st).wait(1)
    assert bool((t == 2.0).all()) and t.device.type == "cuda"
    stage(pool, [t])
    assert pool.stats["allocations"] == 1 and pool.stats["reuses"] == 1


@cuda
def test_cuda_all_reduce_through_staging_is_bit_identical(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 2)
    pools = [StagingPool() for _ in peers]
    g = torch.Generator().manual_seed(0)
    host_inputs = [torch.randn(4097, generator=g) for _ in peers]
    dev = [h.cuda() for h in host_inputs]

    def op(i: int) -> None:
        st = stage(pools[i], [dev[i]])
        StagedHandle(peers[i].comm.all_reduce_async(st.host[0], op="sum"), st).wait(30)

    for r in run_all([lambda i=i: op(i) for i in range(2)]):
        assert not isinstance(r, Exception), r
    assert torch.equal(dev[0].cpu(), dev[1].cpu())
    assert torch.equal(dev[0].cpu(), host_inputs[0] + host_inputs[1])


def train_on_the_gpu(model: torch.nn.Module, opt: Any, batch: Any, revisions: int = 3) -> Any:
    """An ordinary loop on a CUDA model (host batches moved to the GPU) until the swarm's revision."""
    step = 0
    while opt.revision < revisions:
        x, y = batch(step)
        ((model(x.cuda()) - y.cuda()) ** 2).mean().backward()
        opt.step(samples=len(x))
        opt.zero_grad()
        step += 1
    opt.finish()
    return opt


@cuda
def test_cuda_diloco_with_models_on_the_gpu_keeps_parity(inproc: InProcess) -> None:
    from tests.inproc.test_diloco import batch, make_model

    _, peers = form_swarm(inproc, 2)

    def train(i: int) -> DiLoCo:
        model = make_model(i).cuda()
        opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=0.05), peers[i], inner_steps=3,
                     op_timeout=30, alone_wait=2)
        return train_on_the_gpu(model, opt, lambda step: batch(i, step))

    opts = run_all([lambda i=i: train(i) for i in range(2)])
    for o in opts:
        assert not isinstance(o, Exception), o
    assert state_digest(opts[0].theta, opts[0].mom) == state_digest(opts[1].theta, opts[1].mom)
    for o in opts:
        assert all(p.device.type == "cuda" for p in o.params)


@cuda
def test_cuda_expert_sync_with_models_on_the_gpu_keeps_parity(inproc: InProcess) -> None:
    from peer.train.experts import ExpertSync, expert_map
    from tests.inproc.test_experts import H, batch, make_model, make_opt

    _, peers = form_swarm(inproc, 2)

    def train(i: int) -> ExpertSync:
        model = make_model(i).cuda()
        opt = ExpertSync(model, make_opt, peers[i], experts=expert_map(model), sync_steps=H, owners_per_expert=1,
                         op_timeout=30, alone_wait=2)
        return train_on_the_gpu(model, opt, lambda step: batch(i, step))

    opts = run_all([lambda i=i: train(i) for i in range(2)])
    for o in opts:
        assert not isinstance(o, Exception), o
    assert opts[0].theta.tobytes() == opts[1].theta.tobytes()
    assert opts[0].owned and opts[1].owned and not set(opts[0].owned) & set(opts[1].owned)
    for o in opts:
        assert all(p.device.type == "cuda" for p in o.layout.order)
