"""CheckFree and CheckFree+: rebuild a lost pipeline stage from its neighbours, as pure rules.

Blesing et al. 2025, "All is Not Lost: LLM Recovery without Checkpoints" (arXiv 2506.15461). Arrays in, arrays
out: no I/O, no torch, the same bits for the same inputs on every peer. The runtime (``recovery.stage`` with the
pipeline in ``peer.train``) calls ``CheckFree.rebuild`` only when a stage has lost every replica.

Stages are numbered ``0 .. num_stages-1`` in pipeline order; every stage holds blocks of one shape (the rule needs
identical block shapes). Where the (de)embeddings live is the runtime's business: a lost stage's parameters that
its neighbours do not hold as blocks are looked up in the neighbours' ``extra`` arrays (the CheckFree+ copies, see
``embedding_copies``) and copied.

The rules, in the order ``CheckFree.rebuild`` tries them:

1. **CheckFree+ edge stage** (``plus=True``, lost stage 0 or ``num_stages-1``, its swap partner survives): copy
   the swap partner, which trained in the lost stage's position on every odd micro-batch (``swap-copy``).
2. **Middle stage, both adjacent stages survive:** ``W_i = (n_{i-1} W_{i-1} + n_{i+1} W_{i+1}) / (n_{i-1} +
   n_{i+1})`` with ``n_j = ||g_j|| + eps`` (``checkfree``). ``norm="pre"`` (default) takes the raw norm, measured
   before clipping; ``norm="post"`` takes the norm after clipping, as the reference code does, which makes the
   rule a plain average whenever both raw norms exceed the clip threshold.
   *A neighbour without a valid norm* (it was itself rebuilt since its last committed step, or its norm is
   unknown): the **uniform average** of the two neighbours (``checkfree-uniform``, degraded). Chosen over copying
   the other neighbour because the rebuilt neighbour's weights still carry information (they were built from its
   own neighbours), and the uniform average is what the rule gives with equal norms.
3. **Otherwise** (two adjacent stages lost together; an edge stage under plain CheckFree, which has one neighbour;
   an edge stage whose swap partner is lost too): copy the nearest surviving stage, the earlier one on a tie
   (``copy-nearest``, degraded: no paper's rule covers it).
4. No surviving stage, shapes that differ, non-finite data: ``RebuildRefused`` with the reason.

Every rebuilt stage gets a fresh optimizer state and its learning rate times ``lr_scale`` (1.1, the paper's).
When several stages are lost at once, ``rebuild_lost`` rebuilds each from the survivors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal, Mapping, Optional

import numpy as np

from collectives.errors import LocalError
from recovery.rebuild import NeighbourState, RebuildRefused, RebuildResult, StageRebuild

EPS = 1e-4          # added to every gradient norm (the reference's value)
LR_SCALE = 1.1      # the rebuilt stage's learning-rate factor (the paper's)
NormKind = Literal["pre", "post"]


# ------------------------------------------------------------------------------------------ the formula

def gradnorm_average(prev: np.ndarray, nxt: np.ndarray, n_prev: float, n_next: float,
                     eps: float = EPS) -> np.ndarray:
    """``(a*prev + b*nxt) / (a + b)`` with ``a = n_prev + eps``, ``b = n_next + eps``, in float32.

    Computed as ``prev + (nxt - prev) * t`` with ``t = b / (a + b)`` (the same quantity), one numpy ufunc per
    operation in this fixed order, then clamped to ``[min(prev, nxt), max(prev, nxt)]`` elementwise (a rounding
    guard): identical neighbours give back their exact bits, and the result is always a convex combination."""
    if prev.shape != nxt.shape:
        raise LocalError(f"gradnorm_average: shapes differ {prev.shape} vs {nxt.shape}")
    for n in (n_prev, n_next, eps):
        if not math.isfinite(n) or n < 0:
            raise LocalError(f"gradnorm_average: norms and eps must be finite and >= 0, got {n}")
    a = np.float32(n_prev + eps)
    b = np.float32(n_next + eps)
    total = np.float32(a + b)
    if total <= 0:
        raise LocalError("gradnorm_average: both weights are zero (give eps > 0)")
    t = np.float32(b / total)
    p = np.asarray(prev, dtype=np.float32)
    q = np.asarray(nxt, dtype=np.float32)
    out = np.subtract(q, p, dtype=np.float32)
    np.multiply(out, t, out=out)
    np.add(out, p, out=out)
    np.maximum(out, np.minimum(p, q), out=out)
    np.minimum(out, np.maximum(p, q), out=out)
    return out


def clipped_norm(raw: float, max_norm: float = 1.0) -> float:
    """The gradient norm after ``torch.nn.utils.clip_grad_norm_(max_norm)``: the gradient is scaled by
    ``max_norm / (raw + 1e-6)`` when that is below 1."""
    if not math.isfinite(raw) or raw < 0:
        raise LocalError(f"clipped_norm: the raw norm must be finite and >= 0, got {raw}")
    coef = max_norm / (raw + 1e-6)
    return raw * coef if coef < 1.0 else raw


# ------------------------------------------------------------------------------- CheckFree+ swap schedule

def swap_pairs(num_stages: int) -> tuple[tuple[int, int], ...]:
    """CheckFree+'s swapped pairs: the first two and the last two stages (one pair when there are two)."""
    if num_stages < 1:
        raise LocalError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages == 1:
        return ()
    if num_stages == 2:
        return ((0, 1),)
    if num_stages == 3:
        raise LocalError("CheckFree+ needs 2 or >= 4 stages: with 3 the first and last pairs overlap")
    return ((0, 1), (num_stages - 2, num_stages - 1))


def swap_partner(stage: int, num_stages: int) -> Optional[int]:
    """The stage that runs in ``stage``'s position on odd micro-batches (None: a stage that never swaps)."""
    _check_stage(stage, num_stages)
    for a, b in swap_pairs(num_stages):
        if stage == a:
            return b
        if stage == b:
            return a
    return None


def swapped_order(num_stages: int, micro_batch: int) -> list[int]:
    """The order in which micro-batch ``micro_batch`` visits the stages under CheckFree+: the identity on even
    micro-batches, the first two and the last two stages swapped on odd ones. A function of its two arguments
    only, so every replica and every peer runs the same order."""
    if micro_batch < 0:
        raise LocalError(f"micro_batch must be >= 0, got {micro_batch}")
    order = list(range(num_stages))
    pairs = swap_pairs(num_stages)
    if micro_batch % 2 == 1:
        for a, b in pairs:
            order[a], order[b] = order[b], order[a]
    return order


# ------------------------------------------------------------------------ CheckFree+ (de)embedding copies

@dataclass(frozen=True)
class EmbeddingCopies:
    """Which stages hold a copy of the (de)embedding under CheckFree+, and what the copies cost.

    ``holders``: stage -> the layers it holds a copy of ("embedding", "head"). ``extra_bytes``: stage -> bytes
    of those copies (memory held; also the bytes its owner sends each time it refreshes the copy, i.e. after
    every optimizer step if the copy is kept current)."""
    holders: dict[int, tuple[str, ...]]
    extra_bytes: dict[int, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.extra_bytes.values())


def embedding_copies(num_stages: int, embed_bytes: int, head_bytes: int, embed_stage: int = 0,
                     head_stage: Optional[int] = None, tied: bool = False) -> EmbeddingCopies:
    """The embedding (owned by ``embed_stage``) and the output head (owned by ``head_stage``, default the last
    stage) are each copied to the owner's swap partner, or its nearest stage when it has none. ``tied``: one
    matrix serves both (counted once per holder)."""
    head = num_stages - 1 if head_stage is None else head_stage
    _check_stage(embed_stage, num_stages)
    _check_stage(head, num_stages)
    if embed_bytes < 0 or head_bytes < 0:
        raise LocalError("byte counts must be >= 0")
    holders: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    if num_stages == 1:
        return EmbeddingCopies({}, {})
    for owner, layer, nbytes in ((embed_stage, "embedding", embed_bytes), (head, "head", head_bytes)):
        holder = _copy_holder(owner, num_stages)
        if tied and "embedding" in holders.get(holder, []) and layer == "head":
            holders[holder].append(layer)
            continue
        holders.setdefault(holder, []).append(layer)
        sizes[holder] = sizes.get(holder, 0) + nbytes
    return EmbeddingCopies({s: tuple(v) for s, v in holders.items()}, sizes)


def _copy_holder(owner: int, num_stages: int) -> int:
    partner = swap_partner(owner, num_stages) if num_stages != 3 else None
    if partner is not None:
        return partner
    return owner + 1 if owner + 1 < num_stages else owner - 1


# ---------------------------------------------------------------------------------------------- the rule

class CheckFree:
    """CheckFree (``plus=False``) or CheckFree+ (``plus=True``): a ``StageRebuild`` (see the module doc)."""

    def __init__(self, norm: NormKind = "pre", eps: float = EPS, lr_scale: float = LR_SCALE,
                 plus: bool = False) -> None:
        if norm not in ("pre", "post"):
            raise LocalError(f"norm must be 'pre' or 'post', got {norm!r}")
        if not math.isfinite(eps) or eps < 0:
            raise LocalError(f"eps must be finite and >= 0, got {eps}")
        if not math.isfinite(lr_scale) or lr_scale <= 0:
            raise LocalError(f"lr_scale must be finite and > 0, got {lr_scale}")
        self.norm: NormKind = norm
        self.eps = eps
        self.lr_scale = lr_scale
        self.plus = plus

    def rebuild(self, stage: int, num_stages: int, shapes: dict[str, tuple[int, ...]],
                neighbours: dict[int, NeighbourState]) -> RebuildResult:
        _check_stage(stage, num_stages)
        for j, st in neighbours.items():
            if j != st.stage or not 0 <= j < num_stages or j == stage:
                raise LocalError(f"neighbour key {j} (state of stage {st.stage}) is not a surviving stage "
                                 f"of a {num_stages}-stage pipeline other than {stage}")
        if not neighbours:
            raise RebuildRefused(f"stage {stage}: no surviving stage to rebuild it from")
        if self.plus and stage in (0, num_stages - 1):
            partner = swap_partner(stage, num_stages)
            if partner is not None and partner in neighbours:
                w = _assemble(stage, shapes, [neighbours[partner]], neighbours, None)
                return self._result(w, "swap-copy", False, f"copied swap partner stage {partner}")
        lo, hi = neighbours.get(stage - 1), neighbours.get(stage + 1)
        if lo is not None and hi is not None:
            n_lo, n_hi = self._norm(lo), self._norm(hi)
            if n_lo is not None and n_hi is not None:
                w = _assemble(stage, shapes, [lo, hi], neighbours, (n_lo, n_hi, self.eps))
                return self._result(w, "checkfree", False,
                                    f"stages {lo.stage},{hi.stage} weighted by {self.norm}-clip norms "
                                    f"{n_lo:.6g},{n_hi:.6g}")
            bad = [s.stage for s, n in ((lo, n_lo), (hi, n_hi)) if n is None]
            w = _assemble(stage, shapes, [lo, hi], neighbours, (1.0, 1.0, 0.0))
            return self._result(w, "checkfree-uniform", True,
                                f"uniform average of stages {lo.stage},{hi.stage}: no valid gradient norm "
                                f"for stage(s) {bad} (rebuilt or unknown)")
        near = min(neighbours, key=lambda j: (abs(j - stage), j))
        w = _assemble(stage, shapes, [neighbours[near]], neighbours, None)
        return self._result(w, "copy-nearest", True, f"copied nearest surviving stage {near}")

    def _norm(self, st: NeighbourState) -> Optional[float]:
        """The neighbour's norm for the weights, None when it has no valid one."""
        if st.rebuilt:
            return None
        n = st.grad_norm if self.norm == "pre" else st.grad_norm_clipped
        if n is None:
            return None
        if not math.isfinite(n) or n < 0:
            raise RebuildRefused(f"stage {st.stage} reported an invalid gradient norm {n!r}")
        return float(n)

    def _result(self, weights: dict[str, np.ndarray], how: str, degraded: bool, note: str) -> RebuildResult:
        return RebuildResult(weights=weights, how=how, degraded=degraded, lr_scale=self.lr_scale,
                             fresh_optimizer=True, note=note)


def _assemble(stage: int, shapes: dict[str, tuple[int, ...]], sources: list[NeighbourState],
              everyone: Mapping[int, NeighbourState],
              mix: Optional[tuple[float, float, float]]) -> dict[str, np.ndarray]:
    """The lost stage's arrays: block parameters from ``sources`` (copied, or mixed by gradnorm_average with
    ``mix = (n_first, n_second, eps)``), other parameters copied from the nearest stage's ``extra``."""
    out: dict[str, np.ndarray] = {}
    by_distance = sorted(everyone.values(), key=lambda s: (abs(s.stage - stage), s.stage))
    for name, shape in shapes.items():
        shape = tuple(shape)
        held = [name in s.weights for s in sources]
        if all(held):
            arrays = [_checked(stage, name, shape, s.stage, s.weights[name]) for s in sources]
            if mix is None or len(arrays) == 1:
                out[name] = arrays[0].copy()
            else:
                out[name] = gradnorm_average(arrays[0], arrays[1], mix[0], mix[1], mix[2])
            continue
        if any(held):
            missing = [s.stage for s, h in zip(sources, held) if not h]
            raise RebuildRefused(f"stage {stage}: parameter {name!r} is missing from stage(s) {missing}: the "
                                 f"neighbour rule needs identical block shapes")
        copy = next((s for s in by_distance if name in s.extra), None)
        if copy is None:
            raise RebuildRefused(f"stage {stage}: parameter {name!r} is held by no surviving stage (neither "
                                 f"as a block of stage(s) {[s.stage for s in sources]} nor as a copy)")
        out[name] = _checked(stage, name, shape, copy.stage, copy.extra[name]).copy()
    return out


def _checked(stage: int, name: str, shape: tuple[int, ...], source: int, a: np.ndarray) -> np.ndarray:
    if tuple(a.shape) != shape:
        raise RebuildRefused(f"stage {stage}: parameter {name!r} has shape {shape} but stage {source} holds "
                             f"{tuple(a.shape)}: the neighbour rule needs identical block shapes")
    if a.dtype.kind != "f":
        raise RebuildRefused(f"stage {stage}: parameter {name!r} from stage {source} is {a.dtype}, not float")
    f = np.asarray(a, dtype=np.float32)
    if not np.isfinite(f).all():
        raise RebuildRefused(f"stage {stage}: parameter {name!r} from stage {source} is not finite")
    return f


def _check_stage(stage: int, num_stages: int) -> None:
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise LocalError(f"stage {stage} is not in a pipeline of {num_stages} stage(s)")


def rebuild_lost(rule: StageRebuild, lost: Iterable[int], num_stages: int,
                 shapes: Mapping[int, dict[str, tuple[int, ...]]],
                 survivors: Mapping[int, NeighbourState]) -> dict[int, RebuildResult]:
    """Rebuild every stage in ``lost`` from ``survivors`` only (never from a stage rebuilt in the same round),
    so the result does not depend on the order of ``lost``. Raises ``RebuildRefused`` for the first stage the
    rule refuses (nothing is applied then: the caller applies all results or none)."""
    gone = sorted(set(lost))
    overlap = [s for s in gone if s in survivors]
    if overlap:
        raise LocalError(f"stage(s) {overlap} are both lost and surviving")
    return {s: rule.rebuild(s, num_stages, dict(shapes[s]), dict(survivors)) for s in gone}
