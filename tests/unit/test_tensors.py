"""collectives.tensors: zero-copy views, payload checks, bfloat16 bit arithmetic, reduction, chunking."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collectives import tensors
from collectives.errors import LocalError, WireError

pytestmark = pytest.mark.timeout(60)

TORCH_DTYPES = {
    torch.float32: "float32", torch.float64: "float64", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8",
}
NUMPY_DTYPES = ["float32", "float64", "float16", "int32", "int64", "uint8", "uint16"]
FLOAT_BITS = {"float16": np.uint16, "float32": np.uint32, "float64": np.uint64}


def bits(a: np.ndarray) -> np.ndarray:
    """Raw bits of an array, for bitwise comparisons."""
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def torch_bf16_bits(x: np.ndarray) -> np.ndarray:
    """torch's float32 -> bfloat16 conversion, as uint16 bits."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16).copy()


def bf16_is_nan(b: np.ndarray) -> np.ndarray:
    return ((b & 0x7F80) == 0x7F80) & ((b & 0x007F) != 0)


def random_f32(rng: np.random.Generator, n: int, with_nan: bool = False) -> np.ndarray:
    """float32 values over the whole range: random bit patterns, scaled normals, and edge cases."""
    raw = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    scaled = (rng.standard_normal(n) * 10.0 ** rng.uniform(-45, 38, n)).astype(np.float32)
    edges = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.finfo(np.float32).max, -np.finfo(np.float32).max,
                      np.finfo(np.float32).tiny, np.finfo(np.float32).smallest_subnormal, 65504.0, 3.0e38],
                     dtype=np.float32)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80_8001, 0x3F80_7FFF, 0x7F7F8000, 0x7F7F7FFF, 0x00008000,
                     0x00018000, 0x80008000, 0xBF818000, 0x7F7FFFFF, 0x0000FFFF, 0x807FFFFF],
                    dtype=np.uint32).view(np.float32)
    out = np.concatenate([raw, scaled, edges, ties])
    if not with_nan:
        out = out[~np.isnan(out)]
    return out


def random_values(rng: np.random.Generator, dtype: str, n: int, *, nonzero: bool = False) -> np.ndarray:
    """Random data stored as ``tensors.DTYPES[dtype]`` (bfloat16 as uint16 bits); never NaN."""
    if dtype == "bfloat16":
        x = tensors.f32_to_bf16((rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32))
    elif dtype in FLOAT_BITS:
        x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
    elif dtype == "uint8":
        x = rng.integers(0, 256, n).astype(np.uint8)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype)
    if nonzero:
        zero = (tensors.bf16_to_f32(x) == 0) if dtype == "bfloat16" else (x == 0)
        x[zero] = tensors.f32_to_bf16(np.ones(1, np.float32))[0] if dtype == "bfloat16" else 1
    return x


# ---------------------------------------------------------------- flat_view: torch


@pytest.mark.parametrize("tdtype", list(TORCH_DTYPES), ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (1,), (0,), ()])
def test_flat_view_torch_shares_memory(tdtype: torch.dtype, shape: tuple) -> None:
    t = (torch.arange(int(np.prod(shape))) % 100).to(tdtype).reshape(shape)
    view, name = tensors.flat_view(t)
    assert name == TORCH_DTYPES[tdtype]
    assert view.ndim == 1 and view.size == t.numel()
    assert view.dtype == tensors.DTYPES[name]
    if t.numel() == 0:
        return
    assert view.ctypes.data == t.data_ptr()
    if tdtype == torch.bfloat16:
        assert tensors.bf16_to_f32(view).tolist() == t.float().reshape(-1).tolist()
        view[-1] = 0x3FC0  # bfloat16 bits of 1.5
        assert t.reshape(-1)[-1].item() == 1.5
        t.reshape(-1)[0] = 2.0
        assert view[0] == 0x4000
    else:
        assert view.tolist() == t.reshape(-1).tolist()
        view[-1] = 42
        assert t.reshape(-1)[-1].item() == 42
        t.reshape(-1)[0] = 7
        assert view[0] == 7


def test_flat_view_torch_requires_grad_and_offsets() -> None:
    leaf = torch.zeros(6, requires_grad=True)
    view, _ = tensors.flat_view(leaf)
    view[2] = 5.0
    assert leaf[2].item() == 5.0
    nonleaf = leaf * 1
    v2, _ = tensors.flat_view(nonleaf)
    v2[0] = 3.0
    assert nonleaf[0].item() == 3.0
    base = torch.zeros(10)
    part = base[4:8]  # contiguous, with a storage offset
    v3, _ = tensors.flat_view(part)
    v3[:] = 1.0
    assert base.tolist() == [0.0] * 4 + [1.0] * 4 + [0.0] * 2
    row = torch.zeros(3, 4)[1]
    v4, _ = tensors.flat_view(row)
    v4[:] = 9
    assert v4.size == 4


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(4, 5).t(),
    lambda: torch.zeros(10)[::2],
    lambda: torch.zeros(4, 5)[:, 1:3],
    lambda: torch.zeros(3, 1).expand(3, 4),
    lambda: torch.zeros(2, 3, 4).permute(2, 0, 1),
    lambda: torch.zeros(4, 4, dtype=torch.bfloat16).t(),
], ids=["transpose", "stride2", "columns", "expand", "permute", "bf16-transpose"])
def test_flat_view_torch_rejects_non_contiguous(make: Any) -> None:
    with pytest.raises(LocalError):
        tensors.flat_view(make())


@pytest.mark.parametrize("tdtype", [torch.complex64, torch.complex128, torch.bool, torch.int16, torch.int8,
                                    torch.float8_e4m3fn, torch.uint16, torch.uint32], ids=str)
def test_flat_view_torch_rejects_unsupported_dtypes(tdtype: torch.dtype) -> None:
    with pytest.raises(LocalError):
        tensors.flat_view(torch.zeros(4, dtype=tdtype))


def test_flat_view_rejects_non_cpu_and_non_tensors() -> None:
    with pytest.raises(LocalError):
        tensors.flat_view(torch.empty(4, device="meta"))
    for bad in ([1.0, 2.0], (1, 2), b"abcd", bytearray(4), memoryview(b"ab"), None, 3.0, "x"):
        with pytest.raises(LocalError):
            tensors.flat_view(bad)


# ---------------------------------------------------------------- flat_view: numpy


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(5,), (2, 3), (0,), ()])
def test_flat_view_numpy_shares_memory(dtype: str, shape: tuple) -> None:
    a = (np.arange(int(np.prod(shape))) % 100).astype(dtype).reshape(shape)
    view, name = tensors.flat_view(a)
    assert name == dtype and view.ndim == 1 and view.size == a.size
    if a.size == 0:
        return
    assert np.shares_memory(view, a)
    view[-1] = 42
    assert a.reshape(-1)[-1] == 42


def test_flat_view_numpy_write_through_to_torch_from_numpy() -> None:
    t = torch.zeros(8, dtype=torch.float64)
    a = t.numpy()
    view, _ = tensors.flat_view(a)
    view[3] = 1.25
    assert t[3].item() == 1.25


@pytest.mark.parametrize("make", [
    lambda: np.zeros((4, 5), np.float32).T,
    lambda: np.zeros(10, np.float32)[::2],
    lambda: np.zeros((4, 5), np.float64, order="F"),
    lambda: np.zeros((4, 5), np.int64)[:, 1:3],
    lambda: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(4,), strides=(0,)),
], ids=["transpose", "stride2", "fortran", "columns", "stride0"])
def test_flat_view_numpy_rejects_non_contiguous(make: Any) -> None:
    with pytest.raises(LocalError):
        tensors.flat_view(make())


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "bool", "int16", "int8", "uint32",
                                   "uint64", "float128" if hasattr(np, "float128") else "longdouble",
                                   "object", "U4", "S4", "datetime64[s]", "V4"])
def test_flat_view_numpy_rejects_unsupported_dtypes(dtype: str) -> None:
    with pytest.raises(LocalError):
        tensors.flat_view(np.zeros(4, dtype=dtype))


def test_flat_view_numpy_rejects_read_only() -> None:
    a = np.zeros(4, np.float32)
    a.flags.writeable = False
    with pytest.raises(LocalError):
        tensors.flat_view(a)
    with pytest.raises(LocalError):
        tensors.flat_view(np.frombuffer(b"\x00" * 16, dtype=np.float32))


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i8"])
def test_flat_view_numpy_rejects_non_native_byte_order(dtype: str) -> None:
    with pytest.raises(LocalError):
        tensors.flat_view(np.arange(4, dtype=dtype))


# ---------------------------------------------------------------- from_payload


@pytest.mark.parametrize("dtype", list(tensors.DTYPES))
def test_from_payload_round_trip(dtype: str) -> None:
    src = np.arange(10).astype(tensors.DTYPES[dtype])
    raw = src.tobytes()
    for buf in (raw, bytearray(raw), memoryview(raw)):
        out = tensors.from_payload(buf, dtype, 10)
        assert out.dtype == tensors.DTYPES[dtype]
        assert np.array_equal(out, src)
    assert tensors.from_payload(b"", dtype, 0).size == 0


@pytest.mark.parametrize("dtype", list(tensors.DTYPES))
def test_from_payload_rejects_byte_count_mismatch(dtype: str) -> None:
    size = tensors.DTYPES[dtype].itemsize
    for count, nbytes in [(10, 10 * size - 1), (10, 10 * size + 1), (10, 0), (0, 1), (1, 0), (3, 4 * size),
                          (-1, 0), (-1, size), (2**62, 8)]:
        with pytest.raises(WireError):
            tensors.from_payload(b"\x00" * nbytes, dtype, count)


@pytest.mark.parametrize("dtype", ["complex64", "bool", "int16", "object", "", "float32 ", "Float32",
                                   "float", "torch.float32", "<f4", "f4", "bfloat16\x00"])
def test_from_payload_rejects_unknown_dtypes(dtype: str) -> None:
    with pytest.raises(WireError):
        tensors.from_payload(b"\x00" * 8, dtype, 1)
    with pytest.raises(WireError):
        tensors.from_payload(b"", dtype, 0)


def test_dtype_table() -> None:
    assert set(tensors.DTYPES) == {"float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8",
                                   "uint16"}
    assert tensors.DTYPES["bfloat16"] == np.dtype(np.uint16)
    assert all(dt.isnative for dt in tensors.DTYPES.values())
    assert tensors.REDUCE_OPS == ("sum", "avg", "min", "max")


# ---------------------------------------------------------------- bfloat16


def test_f32_to_bf16_matches_torch_bitwise() -> None:
    rng = np.random.default_rng(0)
    x = random_f32(rng, 200_000)
    assert np.array_equal(tensors.f32_to_bf16(x), torch_bf16_bits(x))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 15, 16, 17, 31, 33])
def test_f32_to_bf16_matches_torch_small_arrays(n: int) -> None:
    """Short arrays exercise torch's scalar tail path as well as its vector path."""
    rng = np.random.default_rng(n)
    for _ in range(20):
        x = random_f32(rng, n)[:n]
        assert np.array_equal(tensors.f32_to_bf16(x), torch_bf16_bits(x))


def test_f32_to_bf16_all_exactly_representable_values_round_trip() -> None:
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    ok = ~bf16_is_nan(every)
    f = tensors.bf16_to_f32(every[ok])
    assert np.array_equal(tensors.f32_to_bf16(f), every[ok])
    # bf16_to_f32 agrees with torch's bfloat16 -> float32
    t = torch.from_numpy(every.view(np.int16).copy()).view(torch.bfloat16).float().numpy()
    assert np.array_equal(bits(tensors.bf16_to_f32(every))[ok], bits(t)[ok])


def test_f32_to_bf16_nan_stays_nan_and_out_param() -> None:
    rng = np.random.default_rng(1)
    x = random_f32(rng, 5000, with_nan=True)
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F80FFFF],
                        dtype=np.uint32).view(np.float32)
    x = np.concatenate([x, nan_bits])
    got = tensors.f32_to_bf16(x)
    nan = np.isnan(x)
    assert nan.sum() >= len(nan_bits)
    assert bf16_is_nan(got[nan]).all()  # a NaN never rounds to infinity
    assert not bf16_is_nan(got[~nan]).any()
    assert np.array_equal(got[~nan], torch_bf16_bits(x[~nan]))
    out = np.empty(x.size, np.uint16)
    assert tensors.f32_to_bf16(x, out=out) is out
    assert np.array_equal(out, got)


def _bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` bfloat16 values (bits) over the whole range, never NaN."""
    return rng.permutation(torch_bf16_bits(random_f32(rng, n)))[:n]


def test_reduce_into_bf16_sum_matches_torch_bitwise() -> None:
    rng = np.random.default_rng(2)
    a, b = _bf16(rng, 100_000), _bf16(rng, 100_000)
    # plus operands of similar magnitude, where rounding of the sum matters most
    c = tensors.f32_to_bf16(rng.standard_normal(100_000).astype(np.float32))
    d = tensors.f32_to_bf16(rng.standard_normal(100_000).astype(np.float32))
    for x, y in [(a, b), (c, d), (a, d)]:
        tx = torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
        ty = torch.from_numpy(y.view(np.int16).copy()).view(torch.bfloat16)
        want = (tx.float() + ty.float()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):
            got = tensors.reduce_into(np.empty_like(x), x, y, "sum", "bfloat16")
        ok = ~bf16_is_nan(want)  # inf + -inf: both NaN, but torch's NaN bits differ from ours
        assert np.array_equal(got[ok], want[ok])
        assert bf16_is_nan(got[~ok]).all()


@pytest.mark.parametrize("op,fn", [("min", torch.minimum), ("max", torch.maximum)])
def test_reduce_into_bf16_min_max_match_torch(op: str, fn: Any) -> None:
    rng = np.random.default_rng(3)
    a, b = _bf16(rng, 20_000), _bf16(rng, 20_000)
    tx = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    ty = torch.from_numpy(b.view(np.int16).copy()).view(torch.bfloat16)
    want = fn(tx, ty).float().numpy()
    got = tensors.bf16_to_f32(tensors.reduce_into(np.empty_like(a), a, b, op, "bfloat16"))
    assert np.array_equal(got, want)  # value equality (+0 == -0)


COMMUTE_CASES = [(dt, op) for dt in tensors.DTYPES for op in tensors.REDUCE_OPS]


@pytest.mark.parametrize("dtype,op", COMMUTE_CASES, ids=[f"{d}-{o}" for d, o in COMMUTE_CASES])
def test_reduce_into_is_commutative_bitwise(dtype: str, op: str) -> None:
    rng = np.random.default_rng(abs(hash((dtype, op))) % 2**32)
    n = 50_000
    a = random_values(rng, dtype, n, nonzero=True)
    b = random_values(rng, dtype, n, nonzero=True)
    if dtype in FLOAT_BITS:  # infinities too (inf + -inf gives the same default NaN either way)
        a[:50] = np.inf
        b[25:75] = -np.inf
        b[100:110] = a[100:110]  # equal operands
        b[110:120] = -a[110:120]  # x + -x = +0 either way
    with np.errstate(over="ignore", invalid="ignore"):
        ab = tensors.reduce_into(np.empty_like(a), a, b, op, dtype)
        ba = tensors.reduce_into(np.empty_like(a), b, a, op, dtype)
        assert np.array_equal(bits(ab), bits(ba))
        # out may alias a
        acc = a.copy()
        tensors.reduce_into(acc, acc, b, op, dtype)
    assert np.array_equal(bits(acc), bits(ab))
    # the op itself
    if dtype == "bfloat16":
        fa, fb = tensors.bf16_to_f32(a), tensors.bf16_to_f32(b)
        ref = tensors.f32_to_bf16({"sum": fa + fb, "avg": fa + fb, "min": np.minimum(fa, fb),
                                   "max": np.maximum(fa, fb)}[op])
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            ref = {"sum": a + b, "avg": a + b, "min": np.minimum(a, b), "max": np.maximum(a, b)}[op]
    assert np.array_equal(bits(ab), bits(ref))


def test_reduce_into_integer_sum_wraps_like_numpy() -> None:
    a = np.array([np.iinfo(np.int64).max, 5], np.int64)
    b = np.array([1, -7], np.int64)
    out = tensors.reduce_into(np.empty_like(a), a, b, "sum", "int64")
    assert out.tolist() == [np.iinfo(np.int64).min, -2]
    u = tensors.reduce_into(np.empty(2, np.uint8), np.array([250, 1], np.uint8), np.array([10, 2], np.uint8),
                            "sum", "uint8")
    assert u.tolist() == [4, 3]


# ---------------------------------------------------------------- finish_avg and reference_reduce


@pytest.mark.parametrize("dtype", list(tensors.DTYPES))
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_finish_avg(dtype: str, n: int) -> None:
    rng = np.random.default_rng(n)
    x = random_values(rng, dtype, 1000)
    if dtype in ("int32", "int64"):
        x = (x // 4).astype(dtype)
    orig = x.copy()
    assert tensors.finish_avg(x, n, dtype) is None  # in place
    if dtype == "bfloat16":
        t = torch.from_numpy(orig.view(np.int16).copy()).view(torch.bfloat16)
        want = (t.float() / n).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(x, want)
    elif dtype in FLOAT_BITS:
        assert np.array_equal(bits(x), bits(orig / orig.dtype.type(n)))
    else:
        assert np.array_equal(x, orig // n)  # floor division (rounds towards -inf)


def test_finish_avg_integer_floor() -> None:
    x = np.array([-7, 7, -1, 0, 6], np.int64)
    tensors.finish_avg(x, 2, "int64")
    assert x.tolist() == [-4, 3, -1, 0, 3]


@pytest.mark.parametrize("dtype", list(tensors.DTYPES))
@pytest.mark.parametrize("op", tensors.REDUCE_OPS)
def test_reference_reduce(dtype: str, op: str) -> None:
    rng = np.random.default_rng(7)
    arrays = [random_values(rng, dtype, 100) for _ in range(4)]
    if dtype in ("int32", "int64"):
        arrays = [(a // 8).astype(dtype) for a in arrays]
    before = [a.copy() for a in arrays]
    got = tensors.reference_reduce(arrays, op, dtype)
    for a, b in zip(arrays, before):
        assert np.array_equal(bits(a), bits(b))  # inputs untouched
    acc = arrays[0].copy()
    for other in arrays[1:]:
        acc = tensors.reduce_into(np.empty_like(acc), acc, other, op, dtype)
    if op == "avg":
        tensors.finish_avg(acc, 4, dtype)
    assert np.array_equal(bits(got), bits(acc))
    if op in ("min", "max"):
        vals = [tensors.bf16_to_f32(a) if dtype == "bfloat16" else a for a in arrays]
        fn = np.minimum if op == "min" else np.maximum
        want = fn.reduce(np.stack(vals))
        have = tensors.bf16_to_f32(got) if dtype == "bfloat16" else got
        assert np.array_equal(have, want)
    assert tensors.reference_reduce([arrays[0]], op, dtype).tolist() == arrays[0].tolist()


# ---------------------------------------------------------------- chunking


def check_chunks(n: int, k: int) -> None:
    bounds = tensors.chunk_bounds(n, k)
    assert len(bounds) == k
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (a0, a1), (b0, _) in zip(bounds, bounds[1:]):
        assert a1 == b0
    sizes = [hi - lo for lo, hi in bounds]
    assert all(s >= 0 for s in sizes)
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == n


def test_chunk_bounds_grid() -> None:
    for n, k in itertools.product(list(range(0, 40)) + [999, 1000, 1001, 12345, 2**31 + 7], range(1, 18)):
        check_chunks(n, k)
    assert tensors.chunk_bounds(0, 3) == [(0, 0), (0, 0), (0, 0)]
    assert tensors.chunk_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert tensors.chunk_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**12), st.integers(1, 5000))
def test_chunk_bounds_property(n: int, k: int) -> None:
    check_chunks(n, k)


@pytest.mark.parametrize("k", [0, -1, -100])
def test_chunk_bounds_rejects_non_positive_count(k: int) -> None:
    with pytest.raises(LocalError):
        tensors.chunk_bounds(10, k)


def check_slices(start: int, stop: int, itemsize: int, max_bytes: int) -> None:
    pieces = tensors.slice_bounds(start, stop, itemsize, max_bytes)
    assert pieces, "at least one piece"
    if stop <= start:
        assert pieces == [(start, start)]
        return
    assert pieces[0][0] == start and pieces[-1][1] == stop
    for (a0, a1), (b0, _) in zip(pieces, pieces[1:]):
        assert a1 == b0
    per = max(1, max_bytes // itemsize)
    for lo, hi in pieces:
        assert 0 < hi - lo <= per
        if max_bytes >= itemsize:
            assert (hi - lo) * itemsize <= max_bytes
    for lo, hi in pieces[:-1]:
        assert hi - lo == per  # as few pieces as possible
    assert len(pieces) == -(-(stop - start) // per)


def test_slice_bounds_grid() -> None:
    for start, length, itemsize, max_bytes in itertools.product(
            [0, 3, 1000], [0, 1, 2, 5, 17, 1000, 12345], [1, 2, 4, 8], [1, 2, 3, 4, 7, 8, 13, 64, 1000, 1 << 20]):
        check_slices(start, start + length, itemsize, max_bytes)
    assert tensors.slice_bounds(5, 5, 4, 16) == [(5, 5)]
    assert tensors.slice_bounds(5, 3, 4, 16) == [(5, 5)]
    assert tensors.slice_bounds(0, 10, 4, 16) == [(0, 4), (4, 8), (8, 10)]
    assert tensors.slice_bounds(0, 3, 8, 1) == [(0, 1), (1, 2), (2, 3)]  # max_bytes < itemsize: one element each


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**5), st.sampled_from([1, 2, 4, 8]), st.integers(1, 10**6))
def test_slice_bounds_property(start: int, length: int, itemsize: int, max_bytes: int) -> None:
    check_slices(start, start + length, itemsize, max_bytes)

