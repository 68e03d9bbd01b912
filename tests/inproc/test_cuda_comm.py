"""``swarm.comm`` with CUDA tensors (staged through reused pinned host buffers, ``peer.staging``). The
CUDA tests are skipped without a GPU; the host-only check runs everywhere."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import InProcess, form_swarm, run_all

pytestmark = pytest.mark.timeout(60)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def test_host_tensors_are_not_staged(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 2)
    bufs = [torch.ones(10) * (i + 1) for i in range(2)]
    run_all([lambda i=i: peers[i].comm.all_reduce(bufs[i], timeout=30) for i in range(2)])
    assert float(bufs[0][0]) == 3.0 and all(p.comm._staging == {} for p in peers)


@cuda
def test_cuda_all_reduce_broadcast_gather_and_p2p(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 2)
    g = torch.Generator().manual_seed(0)
    host = [torch.randn(3001, generator=g) for _ in peers]
    dev = [h.cuda() for h in host]
    for _ in range(3):  # the same shapes every op: one pinned allocation, then reuses
        run_all([lambda i=i: peers[i].comm.all_reduce(dev[i], timeout=30) for i in range(2)])
    assert torch.equal(dev[0].cpu(), dev[1].cpu()) and dev[0].device.type == "cuda"
    pool = peers[0].comm._staging["pool"]
    assert pool.stats["allocations"] == 1 and pool.stats["reuses"] == 2
    b = [torch.full((7,), float(i), device="cuda") for i in range(2)]
    run_all([lambda i=i: peers[i].comm.broadcast(b[i], root=peers[0].id, timeout=30) for i in range(2)])
    assert float(b[1][0].cpu()) == 0.0
    out = run_all([lambda i=i: peers[i].comm.all_gather(b[i], timeout=30) for i in range(2)])
    assert all(blk.device.type == "cuda" for blk in out[0])
    x, y = torch.arange(5.0, device="cuda"), torch.zeros(5, device="cuda")
    run_all([lambda: peers[0].comm.send(x, to=peers[1].id, timeout=30),
             lambda: peers[1].comm.recv(y, src=peers[0].id, timeout=30)])
    assert torch.equal(x, y)
