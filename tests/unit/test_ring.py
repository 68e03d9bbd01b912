"""collectives.ring: the pure ring schedules, run in-process with a simulated FIFO-per-link network."""

from __future__ import annotations

import random
from collections import deque
from typing import Any, Optional

import numpy as np
import pytest

from collectives import ring, tensors, wire
from collectives.errors import ProtocolError
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
    delivery, so a buffer the op writes again before delivery would be caught. ``private``: deliver each
    payload as a writable copy of its own and tell the ops they own it (``owns_payloads``, what a zmq
    transport does). Every header goes through ``wire.encode``/``wire.decode`` on the way.
    """

    def __init__(self, ops: dict[str, Any], seed: Optional[int] = 0, lazy: bool = False,
                 land: bool = False, private: bool = False) -> None:
        self.ops = ops
        self.land = land  # deliver into ``op.landing`` buffers where offered (as the sealed transport does)
        self.private = private
        for op in ops.values():
            op.owns_payloads = private
        self.landed = 0
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
            dest = op.landing(sender, msg) if self.land else None
            if dest is not None:
                memoryview(dest).cast("B")[:] = data
                self.landed += 1
            payload = dest if dest is not None else bytearray(data) if self.private else data
            out = op.on_chunk(sender, msg, payload)
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
                  inplace: bool = False, lazy: bool = False, out: bool = False,
                  private: bool = False) -> dict[str, AllReduce]:
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
    Net(ops, seed=seed, lazy=lazy, private=private).run()
    if private:  # each partial sum went into the frame it arrived in: no scratch at all
        assert all(o.acc is None and not o.allocated for o in ops.values())
    for name, src, orig in zip(names, srcs, inputs):
        # in place too: nothing touches the caller's buffer before the commit (``write_into``), so an
        # aborted op leaves it exactly as it was (I2)
        assert ring.digest(src) == ring.digest(orig), "the input must only be read"
        if inplace:
            ops[name].write_into(src)
            assert np.array_equal(bits(src), bits(ops[name].result))
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
        if size:  # the op's cheap parity digest is a function of the result bytes it holds
            o = next(iter(ops.values()))
            before = o.digest()
            lo, (hi, held) = next((lo, v) for lo, v in o.held.items() if v[1].size)
            flipped = held.copy()
            flipped.view(np.uint8)[-1] ^= 1
            o.held[lo] = (hi, flipped)
            o._checks.clear()
            assert o.digest() != before
            o.held[lo] = (hi, held)
            assert o.digest() == before
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
        # summed into the received frames themselves (a transport's own buffers), in place: the same bits
        private = run_allreduce(inputs, dtype, op, sb, seed=size + n + 2, inplace=True, private=True)
        assert digests(private) == digests(ops)
        assert all(np.array_equal(bits(p.result), bits(o.result)) for p, o in zip(private.values(), ops.values()))


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
            assert digests(run_allreduce(inputs, dtype, op, 13 * itemsize, seed=seed, private=True)) == ref


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
            assert digests(run_allreduce(inputs, dtype, op, sb, seed=seed, inplace=True, lazy=True,
                                         private=True)) == ref


LAND_CASES = [(n, dtype, op) for n in (2, 3, 5) for dtype in DTYPES for op in ("sum", "avg", "max")]


@pytest.mark.parametrize("n,dtype,op", LAND_CASES, ids=[f"n{n}-{d}-{o}" for n, d, o in LAND_CASES])
def test_allreduce_with_chunks_landing_in_its_scratch(n: int, dtype: str, op: str) -> None:
    """What the sealed transport does: every chunk decrypted straight into the slice ``landing`` offers.
    Same bits on every member as without landing, and the reference result."""
    rng = np.random.default_rng(n * 31 + len(dtype))
    inputs = make_inputs(rng, dtype, n, 12345)
    sb = slice_bytes_for(12345, n, tensors.DTYPES[dtype].itemsize)
    plain = run_allreduce(inputs, dtype, op, sb, seed=1)
    names = members(n)
    ops = {name: AllReduce(OP, names, name, x.copy(), dtype, op, sb) for name, x in zip(names, inputs)}
    net = Net(ops, seed=2, land=True)
    net.run()
    assert net.landed == net.delivered  # every chunk of a started op lands
    for name in names:
        assert np.array_equal(bits(ops[name].result), bits(plain[name].result))
    assert len(digests(ops)) == 1 and digests(ops) == digests(plain)
    assert_matches_reference(ops[names[0]].result, inputs, op, dtype)


def test_a_payload_it_owns_is_summed_in_place_and_sent_on_and_a_read_only_one_is_not() -> None:
    """With ``owns_payloads`` a reduce-scatter slice is summed into the buffer it arrived in, and that very
    buffer is what goes on to the right neighbour (one pass, no scratch); a payload that is not writable
    is summed into scratch instead, with the same bits."""
    names = members(3)
    rng = np.random.default_rng(7)
    inputs = make_inputs(rng, "float32", 3, 300)
    sends: dict[str, list[Send]] = {}
    ops = {}
    for name, x in zip(names, inputs):
        ops[name] = AllReduce(OP, names, name, x.copy(), "float32", "sum", 4 * 40)
        ops[name].owns_payloads = True
        sends[name] = ops[name].start()
    first = sends[names[0]][0]  # peer-0 -> peer-1, reduce-scatter step 0
    frame = bytearray(to_bytes(first.payload))
    out = ops[names[1]].on_chunk(names[0], first.msg, frame)
    assert len(out) == 1 and out[0].msg.step == 1
    assert np.shares_memory(out[0].payload, np.frombuffer(frame, np.float32)), "summed in the frame itself"
    assert ops[names[1]].acc is None
    lo, hi = ops[names[1]].parts[ops[names[1]]._rs_chunk(0)][first.msg.part]
    assert np.array_equal(np.frombuffer(frame, np.float32), inputs[1][lo:hi] + inputs[0][lo:hi])
    # the same chunk as read-only bytes: scratch, same bits
    other = AllReduce(OP, names, names[1], inputs[1].copy(), "float32", "sum", 4 * 40)
    other.owns_payloads = True
    other.start()
    out2 = other.on_chunk(names[0], first.msg, to_bytes(first.payload))
    assert other.acc is not None and np.shares_memory(out2[0].payload, other.acc)
    assert np.array_equal(bits(out2[0].payload), bits(out[0].payload))


def test_landing_refuses_what_on_chunk_would_refuse() -> None:
    from collectives.codecs import get as codec

    names = members(3)
    src = np.arange(3000, dtype=np.float32)
    op = AllReduce(OP, names, names[1], src, "float32", "sum", 4000)
    rs = wire.Chunk(OP.epoch, OP.group, OP.seq, wire.PHASE_REDUCE_SCATTER, 0, 0, "float32", 1000)
    assert op.landing(names[0], rs) is None  # not started
    op.start()
    assert op.landing(names[2], rs) is None  # not the left neighbour
    for bad in (dict(count=999), dict(dtype="float64"), dict(step=2), dict(part=1),
                dict(phase=wire.PHASE_BROADCAST)):
        fields = dict(epoch=OP.epoch, group=OP.group, seq=OP.seq, phase=wire.PHASE_REDUCE_SCATTER, step=0,
                      part=0, dtype="float32", count=1000)
        fields.update(bad)  # type: ignore[arg-type]
        assert op.landing(names[0], wire.Chunk(**fields)) is None, bad  # type: ignore[arg-type]
    dest = op.landing(names[0], rs)
    assert dest is not None and np.shares_memory(dest, op.acc) and dest.size == 1000
    assert op.landing(names[0], rs) is None  # nothing lands twice
    coded = AllReduce(OP, names, names[1], src, "float32", "sum", 4000, codec=codec("fp16"))
    coded.start()
    assert coded.landing(names[0], rs) is None  # compressed chunks decode into fresh arrays


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
        assert ar2.start() == []
        ar2.write_into(x)
        assert np.array_equal(x, np.arange(10, dtype=np.float32))


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
