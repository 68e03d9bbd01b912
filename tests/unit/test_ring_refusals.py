"""collectives.ring refuses bad input: wrong sender, duplicates, wrong sizes, dtypes, steps and phases."""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import pytest

from collectives import ring, tensors, wire
from collectives.errors import ProtocolError, WireError
from collectives.ring import AllGather, AllReduce, Broadcast, OpId, PointToPoint, Send

from tests.unit.test_ring import DTYPES, Net, OP, members, to_bytes

pytestmark = pytest.mark.timeout(60)


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


def test_in_place_op_never_writes_the_caller_buffer_before_commit() -> None:
    """I2 without a backup copy: an in-place all-reduce, aborted at any point (here: part of the traffic
    delivered, then all of it), has not written one byte of the caller's buffer; ``write_into`` is the
    commit and the only write."""
    rng = np.random.default_rng(9)
    names = ["a", "b", "c"]
    srcs = {m: rng.standard_normal(3000).astype(np.float32) for m in names}
    originals = {m: x.copy() for m, x in srcs.items()}
    ops = {m: ring.AllReduce(ring.OpId(1, "w", 0), names, m, srcs[m], "float32", "sum", 400, out=srcs[m])
           for m in names}
    queue = [(m, s) for m, op in ops.items() for s in op.start()]
    delivered = 0
    while queue:
        frm, s = queue.pop(0)
        queue += [(s.to, o) for o in ops[s.to].on_chunk(frm, s.msg, to_bytes(s.payload))]
        ops[s.to].flush()
        delivered += 1
        if delivered == 10:  # mid-op, an abort would find every buffer exactly as it was
            assert not any(op.done for op in ops.values())
            assert all(srcs[m].tobytes() == originals[m].tobytes() for m in names)
    assert all(op.done for op in ops.values())
    assert all(srcs[m].tobytes() == originals[m].tobytes() for m in names), "done, not yet committed"
    want = sum(originals.values())
    for m, op in ops.items():
        op.write_into(srcs[m])
        assert np.allclose(srcs[m], want, rtol=1e-5, atol=1e-5)
    assert len({srcs[m].tobytes() for m in names}) == 1
