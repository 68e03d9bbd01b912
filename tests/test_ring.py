"""collectives.ring: the pure ring schedules, run in-process with a simulated FIFO-per-link network."""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Optional

import numpy as np
import pytest

from collectives import ring, tensors, wire
from collectives.errors import ProtocolError, WireError
from collectives.ring import AllGather, AllReduce, Broadcast, OpId, PointToPoint, Send

pytestmark = pytest.mark.timeout(60)

OP = OpId(3, "w", 5)
DTYPES = ["float32", "float64", "int64", "bfloat16"]
NS = [1, 2, 3, 4, 5]


def members(n: int) -> list[str]:
    return [f"peer-{i}" for i in range(n)]


def sizes_for(n: int) -> list[int]:
    return sorted({0, 1, n - 1, 1000, 12345})


def to_bytes(payload: Any) -> bytes:
    if isinstance(payload, np.ndarray):
        return bytes(memoryview(np.ascontiguousarray(payload)).cast("B"))
    return bytes(payload)


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.itemsize > 1 else a


def slice_bytes_for(size: int, n: int, itemsize: int) -> int:
    """Small enough that a chunk of ``size / n`` elements is cut into about three slices."""
    return max(itemsize, (size // (3 * n)) * itemsize)


class Net:
    """Routes ``Send`` actions between op objects: FIFO per (sender, receiver) link, links interleaved at random.

    ``lazy``: keep the payload object as handed out (zero-copy, as zmq does) and only turn it into bytes at
    delivery, so a buffer the op writes again before delivery would be caught. Every header goes through
    ``wire.encode``/``wire.decode`` on the way.
    """

    def __init__(self, ops: dict[str, Any], seed: Optional[int] = 0, lazy: bool = False) -> None:
        self.ops = ops
        self.rng = random.Random(seed) if seed is not None else None
        self.lazy = lazy
        self.links: dict[tuple[str, str], deque] = {}
        self.delivered = 0
        self.acks: list[tuple[str, str]] = []

    def post(self, sender: str, sends: list[Send]) -> None:
        for s in sends:
            assert isinstance(s, Send)
            assert isinstance(s.msg, wire.Chunk)
            assert s.to in self.ops and s.to != sender
            assert s.msg.epoch == OP.epoch and s.msg.group == OP.group and s.msg.seq == OP.seq
            payload = s.payload if self.lazy else to_bytes(s.payload)
            self.links.setdefault((sender, s.to), deque()).append((wire.encode(s.msg), payload))

    def run(self, max_messages: int = 10**6) -> None:
        for name, op in self.ops.items():
            self.post(name, op.start())
            op.flush()
        while True:
            ready = [k for k, q in self.links.items() if q]
            if not ready:
                break
            key = self.rng.choice(ready) if self.rng is not None else ready[0]
            sender, receiver = key
            raw, payload = self.links[key].popleft()
            msg = wire.decode(raw)
            assert isinstance(msg, wire.Chunk)
            data = to_bytes(payload)
            assert len(data) == msg.count * tensors.DTYPES[msg.dtype].itemsize
            op = self.ops[receiver]
            out = op.on_chunk(sender, msg, data)
            op.flush()  # the driver writes finished slices after sending (ring.RingOp.flush)
            self.delivered += 1
            assert self.delivered <= max_messages
            self.post(receiver, out)
        for name, op in self.ops.items():
            if isinstance(op, PointToPoint) and not op.sending:
                assert op.done
                self.acks.append((name, op.peer))
        for receiver, sender in self.acks:
            self.ops[sender].on_ack(receiver)
        for name, op in self.ops.items():
            assert op.done, f"{name} not done: {op.remaining} remaining"


def make_inputs(rng: np.random.Generator, dtype: str, n: int, size: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        if dtype == "bfloat16":
            out.append(tensors.f32_to_bf16(rng.standard_normal(size).astype(np.float32) * 4))
        elif dtype == "int64":
            out.append(rng.integers(-10**6, 10**6, size, dtype=np.int64))
        elif dtype == "uint8":
            out.append(rng.integers(0, 256, size, dtype=np.uint8))
        elif dtype == "int32":
            out.append(rng.integers(-1000, 1000, size, dtype=np.int32))
        else:
            out.append((rng.standard_normal(size) * 10).astype(dtype))
    return out


def as_float(a: np.ndarray, dtype: str) -> np.ndarray:
    return tensors.bf16_to_f32(a).astype(np.float64) if dtype == "bfloat16" else a.astype(np.float64)


def assert_matches_reference(got: np.ndarray, inputs: list[np.ndarray], op: str, dtype: str) -> None:
    ref = tensors.reference_reduce(inputs, op, dtype)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if op in ("min", "max") or dtype in ("int64", "int32", "uint8"):
        assert np.array_equal(as_float(got, dtype), as_float(ref, dtype))
        return
    # floats: both the ring and the left-to-right reference are within n roundings of the exact value
    eps = {"float32": 2.0**-24, "float64": 2.0**-53, "float16": 2.0**-11, "bfloat16": 2.0**-8}[dtype]
    mag = np.sum([np.abs(as_float(x, dtype)) for x in inputs], axis=0) if inputs[0].size else 0.0
    if op == "avg":
        mag = mag / len(inputs)
    tol = 4 * (len(inputs) + 1) * eps * mag + 1e-300
    assert np.all(np.abs(as_float(got, dtype) - as_float(ref, dtype)) <= tol)


def run_allreduce(inputs: list[np.ndarray], dtype: str, op: str, slice_bytes: int, *, seed: Optional[int] = 0,
                  inplace: bool = False, lazy: bool = False, out: bool = False) -> dict[str, AllReduce]:
    names = members(len(inputs))
    srcs = [x.copy() for x in inputs]
    ops: dict[str, AllReduce] = {}
    for name, src in zip(names, srcs):
        if inplace:
            ops[name] = AllReduce(OP, names, name, src, dtype, op, slice_bytes, out=src)
        elif out:
            ops[name] = AllReduce(OP, names, name, src, dtype, op, slice_bytes, out=np.full_like(src, 77))
        else:
            ops[name] = AllReduce(OP, names, name, src, dtype, op, slice_bytes)
    Net(ops, seed=seed, lazy=lazy).run()
    for name, src, orig in zip(names, srcs, inputs):
        if inplace:
            assert ops[name].result is src
        else:
            assert ring.digest(src) == ring.digest(orig), "the input must only be read"
    return ops


def digests(ops: dict[str, Any]) -> set[bytes]:
    return {op.digest() for op in ops.values()}


# ---------------------------------------------------------------- all-reduce

AR_CASES = [(n, size, dtype) for n in NS for size in sizes_for(n) for dtype in DTYPES]


@pytest.mark.parametrize("n,size,dtype", AR_CASES, ids=[f"n{n}-s{s}-{d}" for n, s, d in AR_CASES])
def test_allreduce_matches_reference(n: int, size: int, dtype: str) -> None:
    rng = np.random.default_rng(n * 100_003 + size)
    inputs = make_inputs(rng, dtype, n, size)
    itemsize = tensors.DTYPES[dtype].itemsize
    sb = slice_bytes_for(size, n, itemsize)
    for op in tensors.REDUCE_OPS:
        ops = run_allreduce(inputs, dtype, op, sb, seed=size + n)
        results = [o.result for o in ops.values()]
        assert len(digests(ops)) == 1, "all members must end bit-identical"
        assert all(r.shape == (size,) and r.dtype == inputs[0].dtype for r in results)
        assert len({ring.digest(r) for r in results}) == 1, "the bytes themselves agree (BLAKE2b)"
        if size:  # the op's cheap parity digest is a function of the result bytes
            o = next(iter(ops.values()))
            before = o.digest()
            o.result.view(np.uint8)[0] ^= 1
            o._crcs.clear()
            assert o.digest() != before
            o.result.view(np.uint8)[0] ^= 1
        assert_matches_reference(results[0], inputs, op, dtype)
        if size >= 1000 and n > 1:
            parts = ops[members(n)[0]].parts
            assert max(len(p) for p in parts) >= 3, "slices must be small enough to pipeline"
        # in place (out=src) gives exactly the same bits
        inplace = run_allreduce(inputs, dtype, op, sb, seed=size + n + 1, inplace=True)
        assert digests(inplace) == digests(ops)
        # a separate out buffer too
        outb = run_allreduce(inputs, dtype, op, sb, seed=None, out=True)
        assert digests(outb) == digests(ops)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_delivery_order_does_not_change_bits(n: int, dtype: str) -> None:
    rng = np.random.default_rng(n)
    inputs = make_inputs(rng, dtype, n, 1003)
    itemsize = tensors.DTYPES[dtype].itemsize
    for op in ("sum", "avg"):
        ref = digests(run_allreduce(inputs, dtype, op, 13 * itemsize, seed=None))
        assert len(ref) == 1
        for seed in range(4):
            assert digests(run_allreduce(inputs, dtype, op, 13 * itemsize, seed=seed)) == ref
            assert digests(run_allreduce(inputs, dtype, op, 13 * itemsize, seed=seed, inplace=True)) == ref


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_allreduce_in_place_with_zero_copy_sends(n: int, dtype: str) -> None:
    """Sends keep referencing the op's buffers until delivery (zmq zero-copy): in place must still be exact."""
    rng = np.random.default_rng(10 + n)
    inputs = make_inputs(rng, dtype, n, 777)
    sb = 11 * tensors.DTYPES[dtype].itemsize
    for op in tensors.REDUCE_OPS:
        ref = digests(run_allreduce(inputs, dtype, op, sb, seed=None))
        for seed in range(3):
            assert digests(run_allreduce(inputs, dtype, op, sb, seed=seed, inplace=True, lazy=True)) == ref
            assert digests(run_allreduce(inputs, dtype, op, sb, seed=seed, lazy=True)) == ref


@pytest.mark.parametrize("dtype", ["float16", "int32", "uint8"])
def test_allreduce_other_dtypes(dtype: str) -> None:
    rng = np.random.default_rng(5)
    inputs = make_inputs(rng, dtype, 4, 999)
    if dtype == "float16":
        inputs = [x / 10 for x in inputs]
    for op in tensors.REDUCE_OPS:
        ops = run_allreduce(inputs, dtype, op, 50)
        assert len(digests(ops)) == 1
        assert_matches_reference(next(iter(ops.values())).result, inputs, op, dtype)


def test_allreduce_odd_slice_size_and_tiny_slices() -> None:
    rng = np.random.default_rng(6)
    inputs = make_inputs(rng, "float32", 3, 101)
    for sb in (1, 3, 4, 5, 13, 10**9):  # below the item size, not a multiple of it, huge
        ops = run_allreduce(inputs, "float32", "sum", sb, seed=sb)
        assert len(digests(ops)) == 1
        assert_matches_reference(ops["peer-0"].result, inputs, "sum", "float32")


def test_allreduce_single_member_is_identity() -> None:
    x = np.arange(10, dtype=np.float32)
    for op in tensors.REDUCE_OPS:
        ar = AllReduce(OP, ["solo"], "solo", x, "float32", op, 16)
        assert ar.done and ar.start() == [] and np.array_equal(ar.result, x) and ar.result is not x
        ar2 = AllReduce(OP, ["solo"], "solo", x, "float32", op, 16, out=x)
        assert ar2.start() == [] and ar2.result is x


def test_allreduce_accounting_and_write_into() -> None:
    n, size = 4, 1000
    inputs = make_inputs(np.random.default_rng(1), "float64", n, size)
    ops = run_allreduce(inputs, "float64", "sum", 256)
    for o in ops.values():
        # each member sends and receives 2 (n-1) / n of the data
        assert o.bytes_sent == o.bytes_received
        assert abs(o.bytes_sent - 2 * (n - 1) * size * 8 / n) <= 2 * (n - 1) * 8
        dest = np.zeros(size)
        o.write_into(dest)
        assert np.array_equal(dest, o.result)


def test_allreduce_rejects_bad_arguments() -> None:
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError):
        AllReduce(OP, ["a", "b"], "a", x, "float32", "prod", 16)
    with pytest.raises(ProtocolError):
        AllReduce(OP, ["a", "b"], "c", x, "float32", "sum", 16)


# ---------------------------------------------------------------- all-gather, broadcast, point-to-point

AG_CASES = [(n, size, dtype) for n in NS for size in sizes_for(n) for dtype in DTYPES]


@pytest.mark.parametrize("n,size,dtype", AG_CASES, ids=[f"n{n}-s{s}-{d}" for n, s, d in AG_CASES])
def test_allgather_exact(n: int, size: int, dtype: str) -> None:
    rng = np.random.default_rng(size * 7 + n)
    inputs = make_inputs(rng, dtype, n, size)
    names = members(n)
    sb = slice_bytes_for(size * n, n, tensors.DTYPES[dtype].itemsize)
    want = np.concatenate(inputs) if size else np.empty(0, inputs[0].dtype)
    for seed in (None, 1):
        srcs = [x.copy() for x in inputs]
        ops = {m: AllGather(OP, names, m, s, dtype, sb) for m, s in zip(names, srcs)}
        Net(ops, seed=seed, lazy=seed == 1).run()
        for m, o in ops.items():
            assert o.result.dtype == inputs[0].dtype
            assert np.array_equal(bits(o.result), bits(want)), m
        assert len(digests(ops)) == 1
        for s, x in zip(srcs, inputs):
            assert np.array_equal(s, x)


BC_CASES = [(n, size, dtype) for n in NS for size in sizes_for(n) for dtype in DTYPES]


@pytest.mark.parametrize("n,size,dtype", BC_CASES, ids=[f"n{n}-s{s}-{d}" for n, s, d in BC_CASES])
def test_broadcast_every_root_exact(n: int, size: int, dtype: str) -> None:
    rng = np.random.default_rng(size * 11 + n)
    names = members(n)
    sb = slice_bytes_for(size, 1, tensors.DTYPES[dtype].itemsize)
    for root in names:
        data = make_inputs(rng, dtype, 1, size)[0]
        bufs = {m: (data.copy() if m == root else np.zeros_like(data)) for m in names}
        ops = {m: Broadcast(OP, names, m, root, bufs[m], dtype, sb) for m in names}
        assert ops[root].done
        Net(ops, seed=size + n, lazy=True).run()
        for m, o in ops.items():
            assert np.array_equal(bits(o.result), bits(data)), (root, m)
            dest = np.zeros_like(data)
            o.write_into(dest)
            assert np.array_equal(bits(dest), bits(data))
        assert ops[root].result is bufs[root]
        assert np.array_equal(bufs[root], data)


@pytest.mark.parametrize("size", [0, 1, 4, 1000, 12345])
@pytest.mark.parametrize("dtype", DTYPES)
def test_point_to_point_delivers_and_ack_completes_sender(size: int, dtype: str) -> None:
    rng = np.random.default_rng(size)
    data = make_inputs(rng, dtype, 1, size)[0]
    sb = slice_bytes_for(size, 1, tensors.DTYPES[dtype].itemsize)
    snd = PointToPoint(OP, "alice", "alice", "bob", data.copy(), dtype, sb)
    rcv = PointToPoint(OP, "bob", "alice", "bob", np.zeros_like(data), dtype, sb)
    assert not snd.done and not rcv.done
    assert rcv.start() == []
    sends = snd.start()
    assert len(sends) == len(snd.parts) and all(s.to == "bob" for s in sends)
    if size >= 1000:
        assert len(sends) >= 3
    random.Random(size).shuffle(sends)  # one link is FIFO, but slices are independent: order must not matter
    for s in sends:
        assert rcv.on_chunk("alice", wire.decode(wire.encode(s.msg)), to_bytes(s.payload)) == []
        rcv.flush()
    assert rcv.done and not snd.done
    assert np.array_equal(bits(rcv.result), bits(data))
    snd.on_ack("bob")
    assert snd.done
    assert snd.bytes_sent == rcv.bytes_received == data.nbytes
    # a second ack, an ack from someone else, an ack to the receiver: all refused
    with pytest.raises(ProtocolError):
        snd.on_ack("bob")
    snd2 = PointToPoint(OP, "alice", "alice", "bob", data.copy(), dtype, sb)
    with pytest.raises(ProtocolError):
        snd2.on_ack("mallory")
    with pytest.raises(ProtocolError):
        snd2.on_ack("alice")
    with pytest.raises(ProtocolError):
        rcv.on_ack("alice")


def test_point_to_point_via_net() -> None:
    data = np.arange(5000, dtype=np.float64)
    ops = {"a": PointToPoint(OP, "a", "a", "b", data, "float64", 1000),
           "b": PointToPoint(OP, "b", "a", "b", np.zeros_like(data), "float64", 1000)}
    Net(ops, seed=3, lazy=True).run()
    assert np.array_equal(ops["b"].result, data)


def test_point_to_point_outsider_is_refused() -> None:
    with pytest.raises(ProtocolError):
        PointToPoint(OP, "carol", "alice", "bob", np.zeros(3, np.float32), "float32", 64)


def test_broadcast_root_must_be_member() -> None:
    with pytest.raises(ValueError):
        Broadcast(OP, ["a", "b"], "a", "z", np.zeros(3, np.float32), "float32", 64)


def test_group_id_is_stable_and_valid() -> None:
    g = ring.group_id(["a", "b", "c"])
    assert g == ring.group_id(("a", "b", "c"))
    assert g != ring.group_id(["b", "a", "c"])
    assert wire.check_group(g) == g
    assert wire.check_group(ring.group_id(["x"], kind="p")).startswith("p")


# ---------------------------------------------------------------- refusing bad input


def _chunk(phase: int, step: int, part: int, dtype: str, count: int, op: OpId = OP) -> wire.Chunk:
    return wire.Chunk(op.epoch, op.group, op.seq, phase, step, part, dtype, count)


class Recorder:
    """Builds a fresh set of ops for a collective and records the first valid chunk each member receives."""

    def __init__(self, kind: str, n: int, dtype: str = "float32", size: int = 100, sb: int = 40) -> None:
        self.kind, self.n, self.dtype, self.size, self.sb = kind, n, dtype, size, sb
        self.names = members(n)

    def build(self) -> dict[str, Any]:
        npdt = tensors.DTYPES[self.dtype]
        names = self.names
        if self.kind == "allreduce":
            return {m: AllReduce(OP, names, m, np.ones(self.size, npdt), self.dtype, "sum", self.sb) for m in names}
        if self.kind == "allgather":
            return {m: AllGather(OP, names, m, np.ones(self.size, npdt), self.dtype, self.sb) for m in names}
        if self.kind == "broadcast":
            return {m: Broadcast(OP, names, m, names[0], np.ones(self.size, npdt), self.dtype, self.sb)
                    for m in names}
        assert self.n == 2
        return {m: PointToPoint(OP, m, names[0], names[1], np.ones(self.size, npdt), self.dtype, self.sb)
                for m in names}

    def first_sends(self) -> tuple[dict[str, Any], list[tuple[str, Send]]]:
        ops = self.build()
        sends = [(m, s) for m, o in ops.items() for s in o.start()]
        return ops, sends


def expect_refusal(fn: Callable[[], Any]) -> None:
    """Must raise ProtocolError or WireError; anything else (IndexError, KeyError, ...) propagates and fails."""
    with pytest.raises((ProtocolError, WireError)):
        fn()


KINDS = [("allreduce", 2), ("allreduce", 3), ("allreduce", 5), ("allgather", 2), ("allgather", 4),
         ("broadcast", 2), ("broadcast", 4), ("p2p", 2)]


@pytest.mark.parametrize("kind,n", KINDS, ids=[f"{k}-{n}" for k, n in KINDS])
def test_refuses_wrong_sender(kind: str, n: int) -> None:
    rec = Recorder(kind, n)
    ops, sends = rec.first_sends()
    sender, s = sends[0]
    receiver = ops[s.to]
    for impostor in [m for m in rec.names if m != sender] + ["mallory", ""]:
        expect_refusal(lambda: receiver.on_chunk(impostor, s.msg, to_bytes(s.payload)))
    # the genuine one is still accepted afterwards: refusals do not consume the slot
    receiver.on_chunk(sender, s.msg, to_bytes(s.payload))


@pytest.mark.parametrize("kind,n", KINDS, ids=[f"{k}-{n}" for k, n in KINDS])
def test_refuses_duplicate_chunk(kind: str, n: int) -> None:
    rec = Recorder(kind, n)
    ops, sends = rec.first_sends()
    sender, s = sends[0]
    receiver = ops[s.to]
    before = receiver.remaining
    receiver.on_chunk(sender, s.msg, to_bytes(s.payload))
    assert receiver.remaining == before - 1
    expect_refusal(lambda: receiver.on_chunk(sender, s.msg, to_bytes(s.payload)))
    assert receiver.remaining == before - 1


def test_refuses_duplicate_after_completion() -> None:
    rec = Recorder("allreduce", 3)
    ops = rec.build()
    log: list[tuple[str, str, wire.Chunk, bytes]] = []
    net = Net(ops, seed=1)
    orig_post = net.post

    def post(sender: str, sends: list[Send]) -> None:
        log.extend((sender, s.to, s.msg, to_bytes(s.payload)) for s in sends)
        orig_post(sender, sends)

    net.post = post  # type: ignore[method-assign]
    net.run()
    for sender, to, msg, payload in log:
        expect_refusal(lambda: ops[to].on_chunk(sender, msg, payload))


@pytest.mark.parametrize("kind,n", KINDS, ids=[f"{k}-{n}" for k, n in KINDS])
def test_refuses_wrong_count_and_payload_size(kind: str, n: int) -> None:
    rec = Recorder(kind, n)
    ops, sends = rec.first_sends()
    sender, s = sends[0]
    receiver = ops[s.to]
    m = s.msg
    good = to_bytes(s.payload)
    itemsize = tensors.DTYPES[m.dtype].itemsize
    for count in (m.count + 1, max(0, m.count - 1), 0, 10**9, wire.MAX_INT):
        if count == m.count:
            continue
        bad = _chunk(m.phase, m.step, m.part, m.dtype, count)
        expect_refusal(lambda: receiver.on_chunk(sender, bad, good))
        expect_refusal(lambda: receiver.on_chunk(sender, bad, b"\x00" * min(count, 10**5) * itemsize))
    # right count, wrong number of bytes
    for payload in (good[:-1], good + b"\x00", b"", good + good):
        if len(payload) != len(good):
            expect_refusal(lambda: receiver.on_chunk(sender, m, payload))
    receiver.on_chunk(sender, m, good)  # still accepted


@pytest.mark.parametrize("kind,n", KINDS, ids=[f"{k}-{n}" for k, n in KINDS])
def test_refuses_wrong_dtype(kind: str, n: int) -> None:
    rec = Recorder(kind, n)
    ops, sends = rec.first_sends()
    sender, s = sends[0]
    receiver = ops[s.to]
    m = s.msg
    for dtype in ("float64", "int32", "bfloat16", "float16", "uint8", "complex64", "", "FLOAT32"):
        size = tensors.DTYPES[dtype].itemsize if dtype in tensors.DTYPES else 4
        bad = _chunk(m.phase, m.step, m.part, dtype, m.count)
        expect_refusal(lambda: receiver.on_chunk(sender, bad, b"\x00" * (m.count * size)))
        expect_refusal(lambda: receiver.on_chunk(sender, bad, to_bytes(s.payload)))
    receiver.on_chunk(sender, m, to_bytes(s.payload))


@pytest.mark.parametrize("kind,n", KINDS, ids=[f"{k}-{n}" for k, n in KINDS])
def test_refuses_out_of_range_step_part_and_wrong_phase(kind: str, n: int) -> None:
    rec = Recorder(kind, n)
    ops, sends = rec.first_sends()
    sender, s = sends[0]
    receiver = ops[s.to]
    m = s.msg
    payload = to_bytes(s.payload)
    parts = receiver.parts
    max_parts = max(len(p) for p in parts) if isinstance(parts[0], list) else len(parts)
    for step in (n - 1, n, n + 1, 2 * n, 1000, wire.MAX_INT):
        bad = _chunk(m.phase, step, m.part, m.dtype, m.count)
        expect_refusal(lambda: receiver.on_chunk(sender, bad, payload))
    for part in (max_parts, max_parts + 1, 10**6, wire.MAX_INT):
        bad = _chunk(m.phase, m.step, part, m.dtype, m.count)
        expect_refusal(lambda: receiver.on_chunk(sender, bad, payload))
    if kind in ("broadcast", "p2p"):
        bad = _chunk(m.phase, 1, m.part, m.dtype, m.count)
        expect_refusal(lambda: receiver.on_chunk(sender, bad, payload))
    for phase in wire.PHASES:
        if kind == "allreduce" and phase in (wire.PHASE_REDUCE_SCATTER, wire.PHASE_ALL_GATHER):
            continue
        if phase == m.phase:
            continue
        bad = _chunk(phase, m.step, m.part, m.dtype, m.count)
        expect_refusal(lambda: receiver.on_chunk(sender, bad, payload))
    receiver.on_chunk(sender, m, payload)


def test_allreduce_accepts_only_in_range_chunks() -> None:
    """Every (phase, step, part) combination from the left neighbour: only in-range ones may be accepted."""
    rec = Recorder("allreduce", 3, size=90, sb=40)
    ops, _ = rec.first_sends()
    r1 = ops["peer-1"]
    for step in range(0, 5):
        for part in range(0, 6):
            for phase in wire.PHASES:
                c = r1._ag_chunk(step) if phase != wire.PHASE_REDUCE_SCATTER else r1._rs_chunk(step)
                count = 1
                if step <= 1 and part < len(r1.parts[c]):
                    lo, hi = r1.parts[c][part]
                    count = hi - lo
                msg = _chunk(phase, step, part, "float32", count)
                fresh = Recorder("allreduce", 3, size=90, sb=40).build()["peer-1"]
                try:
                    fresh.on_chunk("peer-0", msg, b"\x00" * (count * 4))
                except (ProtocolError, WireError):
                    continue
                assert phase in (wire.PHASE_REDUCE_SCATTER, wire.PHASE_ALL_GATHER) and step <= 1


@pytest.mark.parametrize("kind", ["broadcast-root", "p2p-sender", "allreduce-1", "allgather-1", "broadcast-1"])
def test_refuses_data_to_members_that_expect_none(kind: str) -> None:
    x = np.ones(10, np.float32)
    if kind == "broadcast-root":
        op: Any = Broadcast(OP, ["a", "b"], "a", "a", x, "float32", 16)
        sender = "b"
    elif kind == "p2p-sender":
        op = PointToPoint(OP, "a", "a", "b", x, "float32", 16)
        sender = "b"
    elif kind == "allreduce-1":
        op, sender = AllReduce(OP, ["a"], "a", x, "float32", "sum", 16), "a"
    elif kind == "allgather-1":
        op, sender = AllGather(OP, ["a"], "a", x, "float32", 16), "a"
    else:
        op, sender = Broadcast(OP, ["a"], "a", "a", x, "float32", 16), "a"
    for phase in wire.PHASES:
        for step in (0, 1):
            for part in (0, 1):
                expect_refusal(lambda: op.on_chunk(sender, _chunk(phase, step, part, "float32", 4), b"\x00" * 16))
                expect_refusal(lambda: op.on_chunk("z", _chunk(phase, step, part, "float32", 4), b"\x00" * 16))


@pytest.mark.parametrize("kind,n", KINDS, ids=[f"{k}-{n}" for k, n in KINDS])
def test_random_chunks_are_accepted_or_refused_cleanly(kind: str, n: int) -> None:
    """Fuzz: arbitrary (sender, phase, step, part, dtype, count, payload) never raises anything else."""
    rnd = random.Random(hash((kind, n)) % 2**32)
    rec = Recorder(kind, n, size=rnd.choice([0, 1, 7, 100]), sb=rnd.choice([4, 12, 40]))
    dtypes = list(tensors.DTYPES) + ["complex64", ""]
    for _ in range(60):
        ops = rec.build()
        for o in ops.values():
            o.start()
        for _ in range(15):
            to = rnd.choice(rec.names)
            sender = rnd.choice(rec.names + ["mallory"])
            dtype = rnd.choice(["float32"] * 4 + dtypes)
            count = rnd.choice([0, 1, 2, 3, 10, 25, 100, 2**40])
            msg = _chunk(rnd.choice(wire.PHASES), rnd.choice([0, 0, 1, 2, 3, 4, 9, 2**62]),
                         rnd.choice([0, 0, 1, 2, 3, 8, 2**62]), dtype, count)
            itemsize = tensors.DTYPES[dtype].itemsize if dtype in tensors.DTYPES else 4
            nbytes = rnd.choice([count * itemsize, count * itemsize + 1, 0, 4]) if count < 10**6 else 8
            try:
                out = ops[to].on_chunk(sender, msg, b"\x01" * nbytes)
            except (ProtocolError, WireError):
                continue
            assert isinstance(out, list) and all(isinstance(s, Send) for s in out)


def test_refuses_chunk_with_too_few_bytes_without_state_change() -> None:
    rec = Recorder("allreduce", 2)
    ops, sends = rec.first_sends()
    sender, s = sends[0]
    receiver = ops[s.to]
    before = (receiver.remaining, set(receiver.seen), receiver.bytes_received)
    expect_refusal(lambda: receiver.on_chunk(sender, s.msg, to_bytes(s.payload)[:-1]))
    assert (receiver.remaining, receiver.seen, receiver.bytes_received) == before


def test_in_place_restore_puts_back_every_written_slice() -> None:
    rng = np.random.default_rng(9)
    names = ["a", "b", "c"]
    srcs = {m: rng.standard_normal(3000).astype(np.float32) for m in names}
    originals = {m: x.copy() for m, x in srcs.items()}
    ops = {m: ring.AllReduce(ring.OpId(1, "w", 0), names, m, srcs[m], "float32", "sum", 400, out=srcs[m])
           for m in names}
    for op in ops.values():
        op.backup = np.empty_like(op.src)
    queue = [(m, s) for m, op in ops.items() for s in op.start()]
    for _ in range(len(queue) * 3):  # deliver part of the traffic, then abort
        if not queue:
            break
        frm, s = queue.pop(0)
        queue += [(s.to, o) for o in ops[s.to].on_chunk(frm, s.msg, to_bytes(s.payload))]
        ops[s.to].flush()
    assert any(not np.array_equal(srcs[m], originals[m]) for m in names), "some slices were written"
    for m, op in ops.items():
        op.restore()
        assert srcs[m].tobytes() == originals[m].tobytes()
