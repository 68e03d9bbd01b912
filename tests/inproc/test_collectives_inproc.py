"""Tier 2: several peers in one process over real loopback sockets."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from collectives import ring, tensors, wire
from collectives.errors import LocalError, OpAborted, OpTimeout, StaleError, TooFewPeers
from peer import Swarm, Timeouts, with_retry
from peer.config import SecurityConfig
from tests.helpers import FAST, InProcess, form_swarm, run_all

pytestmark = pytest.mark.timeout(90)


def form(inproc: InProcess, n: int, **kw: object) -> list[Swarm]:
    """A standalone coordinator and ``n`` peers, all admitted."""
    return form_swarm(inproc, n, **kw)[1]


def _as_numpy(t: object) -> np.ndarray:
    view, _ = tensors.flat_view(t)
    return view.copy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                   torch.int32, torch.int64])
def test_all_reduce_every_dtype_and_op_is_bit_identical(inproc: InProcess, dtype: torch.dtype) -> None:
    peers = form(inproc, 3)
    gen = torch.Generator().manual_seed(1)
    for op in ("sum", "avg", "min", "max"):
        if dtype.is_floating_point:
            inputs = [torch.randn(5001, generator=gen).to(dtype) for _ in peers]
        else:
            inputs = [torch.randint(-1000, 1000, (5001,), generator=gen, dtype=dtype) for _ in peers]
        bufs = [t.clone() for t in inputs]
        run_all([lambda p=p, b=b: p.comm.all_reduce(b, op=op, timeout=30) for p, b in zip(peers, bufs)])
        digests = {ring.digest(_as_numpy(b)) for b in bufs}
        assert len(digests) == 1, f"{op}: results differ between peers"
        name = tensors.flat_view(inputs[0])[1]
        ref = tensors.reference_reduce([_as_numpy(t) for t in inputs], op, name)
        got = _as_numpy(bufs[0])
        if name == "bfloat16":
            ref, got = tensors.bf16_to_f32(ref), tensors.bf16_to_f32(got)
        tol = {"float16": 2e-2, "bfloat16": 6e-2}.get(name, 1e-5)
        np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=tol, atol=tol)


def test_numpy_arrays_and_large_multi_slice_buffers(inproc: InProcess) -> None:
    peers = form(inproc, 4, slice_bytes=64 * 1024)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(300_001).astype(np.float32) for _ in peers]
    bufs = [x.copy() for x in inputs]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=30) for p, b in zip(peers, bufs)])
    assert len({ring.digest(b) for b in bufs}) == 1
    np.testing.assert_allclose(bufs[0], np.sum(inputs, axis=0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [2, 4])
def test_in_the_clear_chunks_are_summed_in_their_frames_and_every_result_is_exact(inproc: InProcess,
                                                                                   n: int) -> None:
    """In the clear the ring sums each reduce-scatter slice into the zmq frame it arrived in and holds the
    frames to the commit (``Transport.private_payloads``): no scratch is ever taken from the pool, the
    caller's buffer changes only at the commit, and the results are bit-identical and exact over several
    ops, for every reduce op."""
    peers = form(inproc, n, slice_bytes=16 * 1024, security=SecurityConfig(insecure=True))
    assert all(p.node.transport.sealed is None and p.node.engine.owns_payloads for p in peers)
    rng = np.random.default_rng(5)
    for op in ("sum", "avg", "min", "max"):
        for dtype in (np.float32, np.int64):
            inputs = [(rng.standard_normal(100_003) * 100).astype(dtype) for _ in peers]
            bufs = [x.copy() for x in inputs]
            run_all([lambda p=p, b=b: p.comm.all_reduce(b, op=op, timeout=30) for p, b in zip(peers, bufs)])
            assert len({ring.digest(b) for b in bufs}) == 1, f"{op}: results differ between peers"
            ref = tensors.reference_reduce(inputs, op, np.dtype(dtype).name)
            if dtype == np.int64 or op in ("min", "max"):
                np.testing.assert_array_equal(bufs[0], ref)
            else:
                np.testing.assert_allclose(bufs[0], ref, rtol=1e-5, atol=1e-3)
    assert all(not p.node.engine.pool.free and p.node.engine.pool.bytes == 0 for p in peers)


def test_broadcast_all_gather_barrier_send_recv_and_subgroup(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    ids = [p.id for p in peers]
    for root in ids:
        bufs = [torch.full((1000,), float(i)) for i in range(3)]
        run_all([lambda p=p, b=b: p.comm.broadcast(b, root=root, timeout=30) for p, b in zip(peers, bufs)])
        expect = float(ids.index(root))
        assert all(bool((b == expect).all()) for b in bufs)
    outs = run_all([lambda p=p, i=i: p.comm.all_gather(torch.full((2, 3), float(i)), timeout=30)
                    for i, p in enumerate(peers)])
    ring_order = [float(ids.index(m)) for m in peers[0].members]  # blocks come in ring (epoch) order
    for out in outs:
        assert [float(t[0, 0]) for t in out] == ring_order and out[0].shape == (2, 3)
    run_all([lambda p=p: p.comm.barrier(timeout=30) for p in peers])
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(10)
    run_all([lambda: peers[0].comm.send(src, to=ids[2], timeout=30),
             lambda: peers[2].comm.recv(dst, src=ids[0], timeout=30)])
    assert torch.equal(src, dst)
    sub_ids = [ids[0], ids[2]]
    a, b = torch.ones(100), torch.full((100,), 2.0)
    run_all([lambda: peers[0].comm.group(sub_ids).all_reduce(a, timeout=30),
             lambda: peers[2].comm.group(sub_ids).all_reduce(b, timeout=30)])
    assert bool((a == 3).all()) and bool((b == 3).all())


def test_async_ops_in_flight_and_bucketed_multi_tensor(inproc: InProcess) -> None:
    peers = form(inproc, 2)
    xs = [[torch.full((100,), 1.0), torch.full((7,), 2.0)] for _ in peers]
    ys = [torch.full((50,), 3.0) for _ in peers]

    def work(p: Swarm, x: list[torch.Tensor], y: torch.Tensor) -> None:
        h1 = p.comm.all_reduce_multiple_async(x)
        h2 = p.comm.all_reduce_async(y, op="max")
        h1.wait(30)
        h2.wait(30)

    run_all([lambda p=p, x=x, y=y: work(p, x, y) for p, x, y in zip(peers, xs, ys)])
    for x, y in zip(xs, ys):
        assert bool((x[0] == 2).all()) and bool((x[1] == 4).all()) and bool((y == 3).all())


def test_dead_member_aborts_op_restores_buffers_and_retry_succeeds(inproc: InProcess) -> None:
    peers = form(inproc, 4, slice_bytes=64 * 1024)
    survivors, victim = peers[:3], peers[3]
    rng = np.random.default_rng(1)
    originals = [rng.standard_normal(200_000).astype(np.float32) for _ in survivors]
    bufs = [x.copy() for x in originals]
    handles = [p.comm.all_reduce_async(b) for p, b in zip(survivors, bufs)]
    time.sleep(0.2)  # the survivors' slices are on the wire; the victim never joins the op
    inproc.crash(victim)
    for h in handles:
        with pytest.raises(OpAborted):
            h.wait(20)
    for b, x in zip(bufs, originals):
        assert b.tobytes() == x.tobytes(), "an aborted op must leave the buffer exactly as it was"
    # The dropped connections can abort the op before the eviction's epoch arrives: wait for it (bounded).
    deadline = time.monotonic() + 10
    while any(victim.id in p.members for p in survivors):
        assert time.monotonic() < deadline, "the dead member was never evicted"
        time.sleep(0.05)
    run_all([lambda p=p, b=b: with_retry(p, lambda: p.comm.all_reduce(b, timeout=30)) for p, b in
             zip(survivors, bufs)])
    assert len({ring.digest(b) for b in bufs}) == 1
    np.testing.assert_allclose(bufs[0], np.sum(originals, axis=0), rtol=1e-5, atol=1e-4)
    assert all(len(p.members) == 3 for p in survivors)


def test_after_the_io_thread_crashes_every_call_fails_at_once(inproc: InProcess) -> None:
    """A crashed I/O thread runs no more commands: an op queued before the crash and one submitted after it
    both fail with the crash (LocalError) at once, not at their 60 s deadlines."""
    a, _ = form(inproc, 2)

    def crash_soon() -> None:
        time.sleep(0.3)  # the op below is queued behind this command
        raise RuntimeError("injected I/O thread fault")

    a.node.call(crash_soon)
    t0 = time.monotonic()
    queued = a.comm.all_reduce_async(np.ones(1000, np.float32))
    with pytest.raises(LocalError, match="crashed"):
        queued.wait(60)
    with pytest.raises(LocalError, match="crashed"):
        a.comm.all_reduce(np.ones(1000, np.float32), timeout=60)
    assert time.monotonic() - t0 < 30, "the calls waited for their deadlines"
    assert isinstance(a.node.error, RuntimeError) and not a.node._thread.is_alive()


def test_too_few_peers(inproc: InProcess) -> None:
    [p] = form(inproc, 1)
    with pytest.raises(TooFewPeers):
        p.comm.all_reduce(torch.ones(3), timeout=10)


def test_a_partner_admitted_between_the_failure_and_the_wait_is_not_missed(inproc: InProcess) -> None:
    """The lone first member's op fails with ``TooFewPeers``; a partner is admitted before it starts
    waiting. Waiting from the epoch the failure carries returns at once; waiting from the epoch read after
    the change would sleep to the deadline (the lost wake-up that hung ``wait_for_members`` in CI)."""
    [p] = form(inproc, 1)
    with pytest.raises(TooFewPeers) as failed:
        p.comm.barrier(timeout=10)
    assert failed.value.epoch == p.epoch
    partner = inproc.peer("partner", [inproc.swarms[0].addr.removeprefix("tcp://")])
    partner.wait_admitted(10)           # admitted at once: a swarm of one runs no collective
    deadline = time.monotonic() + 10
    while p.epoch == failed.value.epoch:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    assert p.wait_for_partner(t0 + 5, since=failed.value.epoch)
    assert time.monotonic() - t0 < 1.0
    assert not p.wait_for_partner(time.monotonic() + 0.3)    # from the epoch read now: nothing changes
    run_all([lambda s=s: s.comm.barrier(timeout=10) for s in (p, partner)])


def test_joiner_waits_pending_until_topology_update(inproc: InProcess) -> None:
    peers = form(inproc, 2)
    coord = inproc.swarms[0]
    late = inproc.peer("late", [coord.addr.removeprefix("tcp://")])
    deadline = time.monotonic() + 10
    while late.state != "pending":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run_all([lambda p=p: p.comm.barrier(timeout=10) for p in peers])
    assert [p.peers_pending for p in peers] == [1, 1]
    epoch = peers[0].epoch
    run_all([p.update_topology for p in peers])
    late.wait_admitted(10)
    assert peers[0].epoch == epoch + 1 and late.members == peers[0].members
    assert sorted(late.members[:2]) == ["p0", "p1"] and late.members[2] == "late"  # joiners enter last
    bufs = [torch.ones(10) for _ in range(3)]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=10) for p, b in zip([*peers, late], bufs)])
    assert all(bool((b == 3).all()) for b in bufs)


def test_embedded_coordinator_dies_and_survivors_reform(inproc: InProcess) -> None:
    boot = Swarm.bootstrap(peer_id="boot", timeouts=FAST)
    inproc.swarms.append(boot)
    b = inproc.peer("b", [boot.addr.removeprefix("tcp://")])
    b.wait_admitted(10)  # before c starts: a c that joined first would be the one admitted at once
    c = inproc.peer("c", [boot.addr.removeprefix("tcp://")])
    deadline = time.monotonic() + 10
    while c.state != "pending":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run_all([boot.update_topology, b.update_topology])
    c.wait_admitted(10)
    survivors = [m for m in b.members if m != "boot"]  # the first survivor in ring order takes over
    t0 = time.monotonic()
    inproc.crash(boot)
    for p in (b, c):
        p.wait_epoch_change(p.epoch, 10) if "boot" in p.members else None
    deadline = time.monotonic() + 10
    while not (b.members == c.members == survivors):
        assert time.monotonic() < deadline, (b.members, c.members)
        time.sleep(0.02)
    reform_s = time.monotonic() - t0
    successor = b if survivors[0] == "b" else c
    assert successor.is_coordinator and sum(p.is_coordinator for p in (b, c)) == 1
    bufs = [torch.ones(10), torch.ones(10)]
    run_all([lambda p=p, x=x: with_retry(p, lambda: p.comm.all_reduce(x, timeout=10)) for p, x in
             zip((b, c), bufs)])
    assert all(bool((x == 2).all()) for x in bufs)
    assert reform_s < FAST.reform_window + FAST.coordinator_timeout + 1


def test_wrong_swarm_is_refused(inproc: InProcess) -> None:
    coord = inproc.coordinator(swarm="alpha")
    stranger = inproc.peer("stranger", [coord.addr.removeprefix("tcp://")], swarm="beta")
    with pytest.raises(StaleError):
        stranger.wait_admitted(10)


def test_member_that_never_calls_the_op_times_it_out(inproc: InProcess) -> None:
    quick = Timeouts.local(op_progress_timeout=3.0)
    peers = form(inproc, 3, timeouts=quick)
    bufs = [torch.ones(10) for _ in peers[:2]]
    t0 = time.monotonic()
    results = run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=30) for p, b in zip(peers[:2], bufs)])
    assert all(isinstance(r, OpAborted) for r in results), results
    assert time.monotonic() - t0 < 10
    assert all(bool((b == 1).all()) for b in bufs)
    assert peers[2].state == "member"  # alive and heartbeating: not evicted, only the op failed


def test_misuse_raises_local_errors(inproc: InProcess) -> None:
    peers = form(inproc, 2)
    with pytest.raises(LocalError):
        peers[0].comm.all_reduce(torch.ones(4, 4).t(), timeout=5)  # not contiguous
    with pytest.raises(LocalError):
        peers[0].comm.all_reduce(torch.ones(3, dtype=torch.complex64), timeout=5)
    with pytest.raises(LocalError):
        peers[0].comm.send(torch.ones(3), to="nobody", timeout=5)
    assert OpTimeout.__mro__[1] is OpAborted


def test_several_tcp_streams_per_neighbour(inproc: InProcess) -> None:
    from collectives.transport import Limits

    peers = form(inproc, 3, slice_bytes=16 * 1024, limits=Limits(streams=3))
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal(100_000).astype(np.float32) for _ in peers]
    bufs = [x.copy() for x in inputs]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=30) for p, b in zip(peers, bufs)])
    # three sealed data streams to each neighbour we sent data to (secure mode: on the data socket, beside
    # the CURVE control connection), and every frame went through them
    for i, p in enumerate(peers):
        sealed = p.node.transport.sealed
        assert sealed is not None
        right = p.node.members[(p.node.members.index(p.id) + 1) % 3]
        assert len(sealed.socks[right]) == 3 and not sealed.queued.get(right)
        assert sealed.stats["opened"] > 0 and sealed.stats["refused"] == 0
    assert len({ring.digest(b) for b in bufs}) == 1
    np.testing.assert_allclose(bufs[0], np.sum(inputs, axis=0), rtol=1e-5, atol=1e-4)


def test_a_lost_op_done_is_sent_again_and_the_op_commits(inproc: InProcess) -> None:
    """zmq loses what was queued on a connection that drops; the member repeats its OpDone until a verdict."""
    peers = form(inproc, 3)
    engine = peers[1].node.engine
    real, dropped = engine._to_coord, []

    def lossy(msg: wire.Message) -> None:
        if isinstance(msg, wire.OpDone) and not dropped:
            dropped.append(msg)  # as if the connection to the coordinator dropped with it queued
            return
        real(msg)

    engine._to_coord = lossy
    bufs = [np.full(1000, i + 1, np.float32) for i in range(3)]
    t0 = time.monotonic()
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=20) for p, b in zip(peers, bufs)])
    assert dropped and all(np.all(b == 6) for b in bufs)
    assert time.monotonic() - t0 < 10  # the repeat, not an op deadline, finished it
