"""collectives.ring.DirectAllReduce: a small all-reduce in one step, every member reducing the same bytes
in the same order (ring order, left to right), run in-process with the simulated network of test_ring."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from collectives import ring, tensors, wire
from collectives.errors import LocalError, ProtocolError
from collectives.ring import DirectAllReduce, OpId
from tests.unit.test_ring import OP, Net, bits, make_inputs, members

pytestmark = pytest.mark.timeout(60)


def run_direct(inputs: list[np.ndarray], dtype: str, op: str, slice_bytes: int, *, seed: int = 0,
               lazy: bool = False, private: bool = False) -> dict[str, DirectAllReduce]:
    names = members(len(inputs))
    srcs = [x.copy() for x in inputs]
    ops = {name: DirectAllReduce(OP, names, name, src, dtype, op, slice_bytes) for name, src in zip(names, srcs)}
    Net(ops, seed=seed, lazy=lazy, private=private).run()
    for src, orig in zip(srcs, inputs):  # only read before the commit (I2)
        assert np.array_equal(bits(src), bits(orig))
    return ops


def _expected(inputs: list[np.ndarray], op: str, dtype: str) -> np.ndarray:
    out = tensors.reference_reduce(inputs, op, dtype)
    tensors.canonical_nans(out, dtype)
    return out


EXACT = [(d, op) for d in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8")
         for op in tensors.REDUCE_OPS if ring.direct(0, 2, op, d)]


def test_float_min_and_max_stay_in_the_ring() -> None:
    assert {op for d, op in EXACT if d.startswith(("float", "bfloat"))} == {"sum", "avg"}
    assert {op for d, op in EXACT if d == "int64"} == set(tensors.REDUCE_OPS)
    with pytest.raises(LocalError):
        DirectAllReduce(OP, members(2), "peer-0", np.zeros(4, np.float32), "float32", "min", 1 << 20)


@pytest.mark.parametrize("dtype,op", EXACT)
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("mode", ["bytes", "lazy", "private"])
def test_every_member_holds_the_left_to_right_reduction_in_ring_order_bit_for_bit(dtype: str, op: str, n: int,
                                                                                mode: str) -> None:
    rng = np.random.default_rng(n)
    for size in (0, 1, 7, 1000):
        inputs = make_inputs(rng, dtype, n, size)
        itemsize = tensors.DTYPES[dtype].itemsize
        ops = run_direct(inputs, dtype, op, 96 * itemsize, seed=size,  # several slices per buffer
                         lazy=mode == "lazy", private=mode == "private")
        expect = _expected(inputs, op, dtype)
        for o in ops.values():
            out = np.full_like(inputs[0], 7)
            o.write_into(out)
            assert np.array_equal(bits(out), bits(expect)), (dtype, op, n, size)
        assert len({o.digest() for o in ops.values()}) == 1


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_nans_of_any_payload_and_signed_zeros_sum_to_the_same_bits_everywhere(dtype: str) -> None:
    """Which NaN payload survives a sum depends on numpy's code path (alignment, SIMD width), so a sum with
    NaNs is made canonical; +0 + -0 is exact in IEEE arithmetic."""
    store = tensors.DTYPES[dtype]
    width = {"float32": np.uint32, "float64": np.uint64, "float16": np.uint16, "bfloat16": np.uint16}[dtype]
    quiet = {"float32": 0x7FC00000, "float64": 0x7FF8000000000000, "float16": 0x7E00, "bfloat16": 0x7FC0}[dtype]

    def nan(payload: int) -> Any:
        return np.array([quiet | payload], width).view(store)[0]

    def num(v: float) -> Any:
        return tensors.f32_to_bf16(np.array([v], np.float32))[0] if dtype == "bfloat16" else store.type(v)

    rows = [[num(0.0), num(-0.0), nan(1), num(1.0), num(-0.0)],
            [num(-0.0), num(0.0), nan(2), nan(1), num(-0.0)],
            [num(0.0), num(-0.0), num(1.0), nan(2), num(-0.0)]]
    inputs = [np.array(r, store) for r in rows]
    for seed in range(5):
        ops = run_direct(inputs, dtype, "sum", store.itemsize, seed=seed)  # one element per slice
        results = [bits(o.result) for o in ops.values()]
        assert all(np.array_equal(r, results[0]) for r in results)
        assert np.array_equal(results[0], bits(_expected(inputs, "sum", dtype)))
        assert results[0][2] == quiet and results[0][3] == quiet  # canonical
        assert results[0][4] == bits(np.array([num(-0.0)], store))[0]  # -0 + -0 + -0 is -0


def _op(n: int = 3, me: int = 1, size: int = 10) -> DirectAllReduce:
    return DirectAllReduce(OP, members(n), f"peer-{me}", np.arange(size, dtype=np.float32), "float32", "sum", 1 << 20)


def _chunk(step: int = 0, part: int = 0, phase: int = wire.PHASE_DIRECT, count: int = 10,
           dtype: str = "float32") -> wire.Chunk:
    return wire.Chunk(OP.epoch, OP.group, OP.seq, phase, step, part, dtype, count)


def _payload(count: int = 10) -> Any:
    return np.zeros(count, np.float32).tobytes()


@pytest.mark.parametrize("case", ["from itself", "from an outsider", "step is not the sender's rank",
                                  "a ring phase", "wrong count", "wrong dtype", "no such part"])
def test_chunks_it_did_not_expect_are_refused(case: str) -> None:
    o = _op()
    sender, msg = "peer-0", _chunk()
    if case == "from itself":
        sender = "peer-1"
        msg = _chunk(step=1)
    elif case == "from an outsider":
        sender = "peer-9"
    elif case == "step is not the sender's rank":
        msg = _chunk(step=2)
    elif case == "a ring phase":
        msg = _chunk(phase=wire.PHASE_REDUCE_SCATTER)
    elif case == "wrong count":
        msg = _chunk(count=9)
    elif case == "wrong dtype":
        msg = _chunk(dtype="float64")
    elif case == "no such part":
        msg = _chunk(part=1)
    with pytest.raises(ProtocolError):
        o.on_chunk(sender, msg, _payload(msg.count))
    assert o.remaining == 2 and not o.held


def test_a_duplicate_is_refused_and_the_last_contribution_completes_it() -> None:
    o = _op()
    assert o.on_chunk("peer-0", _chunk(step=0), _payload()) == []
    with pytest.raises(ProtocolError, match="duplicate"):
        o.on_chunk("peer-0", _chunk(step=0), _payload())
    assert not o.done and not o.held
    o.on_chunk("peer-2", _chunk(step=2), np.ones(10, np.float32).tobytes())
    o.flush()
    assert o.done and np.array_equal(o.result, np.arange(10, dtype=np.float32) + 1)


def test_it_sends_its_whole_buffer_to_every_other_member_and_nothing_on_receipt() -> None:
    o = DirectAllReduce(OpId(1, "w", 0), members(4), "peer-2", np.arange(10, dtype=np.float32), "float32", "sum",
                        16)  # 4 elements per slice: 3 slices
    sends = o.start()
    assert sorted((s.to, s.msg.part) for s in sends) == [(f"peer-{r}", k) for r in (0, 1, 3) for k in range(3)]
    assert all(s.msg.phase == wire.PHASE_DIRECT and s.msg.step == 2 for s in sends)
    assert o.remaining == 9


def test_which_all_reduces_run_in_one_step() -> None:
    limit = ring.DIRECT_MAX_BYTES
    assert ring.direct(limit, 2) and not ring.direct(limit + 1, 2)
    assert ring.direct(limit // 3, 4) and not ring.direct(limit // 3 + 1, 4)
    assert not ring.direct(4, 1)  # a single member runs no exchange at all
