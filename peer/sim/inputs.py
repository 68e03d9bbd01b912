"""The all-reduce workload's inputs, reproducible from (peer id, attempt): the workload draws them, the
history checks recompute them to verify every committed result against numpy."""

from __future__ import annotations

import zlib

import numpy as np


def seed_for(peer_id: str, attempt: int) -> int:
    return zlib.crc32(f"{peer_id}/{attempt}".encode())


def input_for(seed: int, elems: int) -> np.ndarray:
    """(elems,) float32 standard normal values from ``seed``."""
    return np.random.default_rng(seed).standard_normal(elems).astype(np.float32)
