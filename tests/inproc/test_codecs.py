"""Compressed all-reduce: codec error bounds, and bit parity of compressed results across peers."""

from __future__ import annotations

import numpy as np
import pytest

from collectives import codecs, ring
from collectives.errors import LocalError
from peer.sim.history import check_records
from peer.sim.procs import LocalProcs
from tests.helpers import FAST_ARGS, InProcess, run_all
from tests.inproc.test_collectives_inproc import form

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e3])
def test_round_trip_error_bounds(scale: float) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(100_000) * scale).astype(np.float32)
    fp16 = codecs.get("fp16")
    bf16 = codecs.get("bf16")
    int8 = codecs.get("int8")
    assert fp16 and bf16 and int8
    normal = np.abs(x) > 6.2e-5  # fp16's smallest normal
    y = fp16.decode(fp16.encode(x), x.size)
    assert np.all(np.abs(y - x)[normal] <= np.abs(x)[normal] * 2.0**-11)
    y = bf16.decode(bf16.encode(x), x.size)
    assert np.all(np.abs(y - x) <= np.abs(x) * 2.0**-8)
    enc = int8.encode(x)
    assert enc.size == int8.wire_count(x.size) and enc.dtype == np.uint8
    y = int8.decode(enc, x.size)
    step = (x.max() - x.min()) / 255
    assert np.max(np.abs(y - x)) <= step / 2 * 1.001 + 1e-12


def test_int8_constant_and_non_finite_inputs() -> None:
    int8 = codecs.get("int8")
    assert int8
    assert np.array_equal(int8.decode(int8.encode(np.full(7, 3.5, np.float32)), 7), np.full(7, 3.5))
    x = np.array([0.0, 1.0, np.inf, -np.inf, np.nan], np.float32)
    y = int8.decode(int8.encode(x), 5)
    assert np.all(np.isfinite(y)) and y[0] == 0.0 and y[1] == 1.0


def test_fp16_clips_instead_of_overflowing() -> None:
    fp16 = codecs.get("fp16")
    assert fp16
    y = fp16.decode(fp16.encode(np.array([1e6, -1e6], np.float32)), 2)
    assert np.all(np.isfinite(y)) and abs(y[0]) == 65504


def test_unknown_codec_and_unsupported_dtype_are_local_errors() -> None:
    with pytest.raises(LocalError):
        codecs.get("zstd")
    with pytest.raises(LocalError):
        ring.AllReduce(ring.OpId(1, "w", 0), ["a", "b"], "a", np.zeros(4, np.int64), "int64", "sum", 4096,
                       codec=codecs.get("int8"))


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8"])
def test_compressed_all_reduce_is_bit_identical_and_close(inproc: InProcess, codec: str) -> None:
    peers = form(inproc, 4, slice_bytes=64 * 1024)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(100_003).astype(np.float32) for _ in peers]
    bufs = [x.copy() for x in inputs]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, op="avg", codec=codec, timeout=30)
             for p, b in zip(peers, bufs)])
    assert len({ring.digest(b) for b in bufs}) == 1, "compressed results must agree bit for bit"
    exact = np.mean(np.array(inputs, np.float64), axis=0)
    rel = np.linalg.norm(bufs[0] - exact) / np.linalg.norm(exact)
    assert rel < {"fp16": 1e-3, "bf16": 1e-2, "int8": 5e-2}[codec], rel


def test_int8_all_reduce_of_several_default_size_frames(inproc: InProcess) -> None:
    """Regression guard: int8 over tensors larger than one default 4 MiB frame (several slices per member,
    the size where an int8 failure was once seen in a process run)."""
    peers = form(inproc, 3)
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal(2_600_007).astype(np.float32) for _ in peers]  # ~10 MiB each
    bufs = [x.copy() for x in inputs]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, op="avg", codec="int8", timeout=60)
             for p, b in zip(peers, bufs)])
    assert len({ring.digest(b) for b in bufs}) == 1, "int8 results must agree bit for bit"
    exact = np.mean(np.array(inputs, np.float64), axis=0)
    assert np.linalg.norm(bufs[0] - exact) / np.linalg.norm(exact) < 5e-2


@pytest.mark.timeout(90)
def test_compressed_all_reduce_parity_across_four_processes(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    names = [f"q{i}" for i in range(4)]
    for n in names:
        procs.peer(n, [coord.hostport], ["--elems", "50000", "--duration", "5", "--codec", "int8", *FAST_ARGS])
    for n in names:
        procs.wait_done(n, 60)
    summary = check_records(procs.records())
    assert summary["ops_committed"] > 5 and summary["parity_violations"] == 0, summary
    assert summary["partial_commits"] == 0 and summary["unrestored_buffers"] == 0, summary
