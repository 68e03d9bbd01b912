"""Time the parity checksum (``collectives.tensors.slice_checksum``) at two row widths, in one process.

    .venv/bin/python examples/results/checksum_rows.py [--mb 64] [--reps 9]

Checksums a random buffer slice by slice (4 MiB and 1 MiB slices, as the ring does) with rows of 4096
64-bit words (before 2026-12-03) and of 512 (now), best of ``reps`` for each, and prints the ratio. The
checksum's bytes differ between widths; what it catches does not (a change confined to at most three
words always changes a row or a column sum, ``tests/unit/test_checksum.py``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from collectives import tensors


def best_ms(values: np.ndarray, slice_bytes: int, reps: int) -> float:
    step = slice_bytes // values.itemsize
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for lo in range(0, values.size, step):
            tensors.slice_checksum(values[lo:lo + step])
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=64)
    p.add_argument("--reps", type=int, default=9)
    a = p.parse_args()
    values = np.random.default_rng(0).standard_normal(int(a.mb * (1 << 20)) // 4).astype(np.float32)
    now = tensors._ROW_WORDS
    rows = []
    try:
        for slice_mb in (4, 1):
            ms = {}
            for width in (4096, now):
                tensors._ROW_WORDS = width
                ms[width] = best_ms(values, slice_mb << 20, a.reps)
            rows.append({"mb": a.mb, "slice_mb": slice_mb, "ms_rows_4096": round(ms[4096], 2),
                         f"ms_rows_{now}": round(ms[now], 2), "speedup": round(ms[4096] / ms[now], 2)})
    finally:
        tensors._ROW_WORDS = now
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
