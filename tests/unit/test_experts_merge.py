"""The merge warm-up: schedule, neighbours by cosine similarity, the update, and platform-free arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from collectives.errors import LocalError
from peer.train.experts_merge import MergeWarmup, exact_dot, merge_layer, neighbours


def test_schedule_decays_to_zero_and_respects_the_interval() -> None:
    m = MergeWarmup(alpha0=0.05, T=100, k=2, every=2)
    assert m.alpha(0) == 0.05 and m.alpha(50) == pytest.approx(0.025) and m.alpha(100) == m.alpha(500) == 0.0
    assert [m.due(i, 10) for i in (1, 2, 3, 4)] == [False, True, False, True]
    assert not m.due(2, 100)
    with pytest.raises(LocalError):
        MergeWarmup(k=0)


def test_neighbours_are_the_most_similar_experts() -> None:
    base = np.array([1, 0, 0, 0], np.float32)
    experts = [base, base * 2 + np.float32(0.01), -base, np.array([0, 1, 0, 0], np.float32)]
    # expert 3 is orthogonal to 0 and slightly aligned with 1 (its 0.01 in slot 1); expert 2 opposes 0 and 1
    assert neighbours(experts, 1) == [[1], [0], [3], [1]]


def test_merge_moves_each_expert_toward_its_neighbours_mean_from_the_old_values() -> None:
    rng = np.random.default_rng(0)
    experts = [rng.standard_normal(64).astype(np.float32) for _ in range(6)]
    old = [e.copy() for e in experts]
    nbrs = neighbours(old, 2)
    merge_layer(experts, 0.1, 2)
    for i, e in enumerate(experts):
        want = old[i] + np.float32(0.1 / 2) * sum((old[j] - old[i] for j in nbrs[i]), np.zeros(64, np.float32))
        np.testing.assert_allclose(e, want, rtol=1e-6, atol=1e-7)
        assert np.linalg.norm(e - np.mean([old[j] for j in nbrs[i]], 0)) < \
            np.linalg.norm(old[i] - np.mean([old[j] for j in nbrs[i]], 0))


def test_same_bits_for_the_same_input_and_exact_dot() -> None:
    rng = np.random.default_rng(1)
    a = [rng.standard_normal(1000).astype(np.float32) for _ in range(4)]
    b = [x.copy() for x in a]
    merge_layer(a, 0.05, 2)
    merge_layer(b, 0.05, 2)
    assert all(x.tobytes() == y.tobytes() for x, y in zip(a, b))
    x = np.array([1e8, 1.0, -1e8], np.float32)
    assert exact_dot(x, np.ones(3, np.float32)) == 1.0   # a naive float32 sum in this order gives 0
    with pytest.raises(LocalError):
        merge_layer([np.zeros(2, np.float32), np.zeros(3, np.float32)], 0.1, 1)
