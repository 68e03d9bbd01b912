"""The merge warm-up of SPES, as pure numpy on flat float32 expert weights. No I/O.

At a sync point with step count ``t < T`` (and every ``every`` sync points), in each MoE layer every expert
moves toward the mean of its ``k`` most similar experts of the same layer::

    alpha = alpha0 * (1 - t / T)
    e_i  <- e_i + alpha * mean_{j in top-k(i)} (e_j - e_i)      (all experts from the old values)

Similarity is the cosine of the experts' whole weight vectors. Every member runs this on the same synced
weights and must get the same bits on any machine, so nothing here depends on BLAS or SIMD summation order:
dot products are exact sums (``math.fsum`` of float64 products of float32 values, each product exact), and
the update is a fixed sequence of elementwise float32 operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from collectives.errors import LocalError


@dataclass(frozen=True)
class MergeWarmup:
    """SPES's released settings: alpha0 0.01 with T 10000, or 0.05 with T 20000 (k 4, every 500 steps)."""
    alpha0: float = 0.05
    T: int = 10_000       # steps after which the warm-up is off
    k: int = 4            # neighbours (capped at experts - 1)
    every: int = 1        # merge at every ``every``-th sync point (the interval is a multiple of the sync's)

    def __post_init__(self) -> None:
        if self.alpha0 < 0 or self.T < 1 or self.k < 1 or self.every < 1:
            raise LocalError("MergeWarmup needs alpha0 >= 0, T >= 1, k >= 1, every >= 1")

    def alpha(self, t: int) -> float:
        return self.alpha0 * (1.0 - min(t / self.T, 1.0))

    def due(self, sync_index: int, t: int) -> bool:
        """Whether the ``sync_index``-th committed sync (1-based) at step ``t`` merges."""
        return sync_index % self.every == 0 and self.alpha(t) > 0


def exact_dot(a: np.ndarray, b: np.ndarray) -> float:
    """The correctly rounded dot product of two float32 vectors (platform independent)."""
    return math.fsum((a.astype(np.float64) * b.astype(np.float64)).tolist())


def neighbours(experts: Sequence[np.ndarray], k: int) -> list[list[int]]:
    """For each expert, the indices of its ``k`` most cosine-similar other experts (ties: lower index)."""
    n = len(experts)
    k = min(k, n - 1)
    norms = [math.sqrt(exact_dot(e, e)) for e in experts]
    sim = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d = norms[i] * norms[j]
            sim[i][j] = sim[j][i] = exact_dot(experts[i], experts[j]) / d if d > 0 else 0.0
    return [sorted(sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i][j], j))[:k])
            for i in range(n)]


def merge_layer(experts: Sequence[np.ndarray], alpha: float, k: int) -> None:
    """In place: one merge step over one layer's experts (flat float32 views of equal size)."""
    if len(experts) < 2 or alpha <= 0:
        return
    sizes = {e.size for e in experts}
    if len(sizes) != 1:
        raise LocalError("merge warm-up needs experts of equal size within a layer")
    nbrs = neighbours(experts, k)
    old = [e.copy() for e in experts]
    step = np.float32(alpha / len(nbrs[0]))
    acc = np.empty_like(old[0])
    diff = np.empty_like(old[0])
    for i, e in enumerate(experts):
        acc[...] = 0
        for j in nbrs[i]:
            np.subtract(old[j], old[i], out=diff)
            np.add(acc, diff, out=acc)
        np.multiply(acc, step, out=acc)
        np.add(old[i], acc, out=e)
