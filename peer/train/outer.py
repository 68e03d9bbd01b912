"""The pure maths of an outer step: flat float32 buffers, elementwise numpy in a fixed order (bit-identical
on every peer), fragments, and copying between a model's parameters and a flat buffer. No I/O.

DiLoCo (``peer.train.diloco``) and the sparse expert sync reuse it.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np
import torch

from collectives.errors import LocalError


def outer_sgd(theta: np.ndarray, mom: np.ndarray, delta: np.ndarray, lr: float, momentum: float,
              nesterov: bool, scratch: np.ndarray) -> None:
    """In place, torch.optim.SGD semantics (dampening 0) with ``delta`` as the gradient::

        mom = momentum * mom + delta
        d   = delta + momentum * mom   (nesterov)   or   mom
        theta = theta - lr * d

    One numpy ufunc per operation, in this order, in float32: the same bits on every peer."""
    mu, eta = np.float32(momentum), np.float32(lr)
    np.multiply(mom, mu, out=mom)
    np.add(mom, delta, out=mom)
    if nesterov:
        np.multiply(mom, mu, out=scratch)
        np.add(scratch, delta, out=scratch)
    else:
        scratch[...] = mom
    np.multiply(scratch, eta, out=scratch)
    np.subtract(theta, scratch, out=theta)


def weight_scale(w: float, total: np.float32) -> np.float32:
    """My factor in the weighted average (float32: the reference computes exactly this)."""
    return np.float32(np.float32(w) / total)


def state_digest(theta: np.ndarray, mom: np.ndarray) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(theta).data.cast("B"))
    h.update(np.ascontiguousarray(mom).data.cast("B"))
    return h.digest()


def fragment_bounds(sizes: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Split parameters (flat sizes, in order) into ``n`` contiguous groups of about equal numel, cutting
    only between parameters. Returns element ranges [lo, hi) into the flat buffer."""
    if n < 1 or n > len(sizes):
        raise LocalError(f"fragments must be within 1..{len(sizes)} (the number of parameters)")
    total = sum(sizes)
    bounds, lo, acc, k = [], 0, 0, 1
    for i, s in enumerate(sizes):
        acc += s
        if k < n and (acc >= total * k / n or len(sizes) - i - 1 == n - k):
            bounds.append((lo, acc))
            lo, k = acc, k + 1
    bounds.append((lo, total))
    return bounds


def flatten_params(params: Sequence[torch.Tensor]) -> np.ndarray:
    """(N,) float32 copy of the parameters, in order, on the CPU."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params]).numpy()


def load_params(params: Sequence[torch.Tensor], flat: np.ndarray, lo: int = 0, hi: Optional[int] = None) -> None:
    """Copy ``flat[lo:hi]`` into the parameters that lie inside that range."""
    hi = flat.size if hi is None else hi
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            if lo <= off and off + n <= hi:
                p.copy_(torch.from_numpy(flat[off:off + n]).view(p.shape))
            off += n
