"""recovery.checkfree: the grad-norm average, CheckFree / CheckFree+ rebuild cases, refusals, swap schedule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collectives.errors import LocalError
from recovery.checkfree import (CheckFree, clipped_norm, embedding_copies, gradnorm_average, rebuild_lost,
                                swap_pairs, swap_partner, swapped_order)
from recovery.rebuild import NeighbourState, RebuildRefused, StageRebuild

pytestmark = pytest.mark.timeout(60)

SHAPES = {"0.w": (2, 3), "0.b": (3,), "1.w": (3, 3)}


def stage_weights(value: float, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(value * 1000) % 2**32)
    return {k: (value + rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def state(stage: int, value: float, norm: float | None = 1.0, clipped: float | None = None,
          rebuilt: bool = False, **kw: dict[str, np.ndarray]) -> NeighbourState:
    return NeighbourState(stage=stage, weights=kw.get("weights", stage_weights(value)), grad_norm=norm,
                          grad_norm_clipped=clipped, rebuilt=rebuilt, extra=kw.get("extra", {}))


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ------------------------------------------------------------------------------------------ the formula

def test_formula_matches_a_hand_computation() -> None:
    prev = np.array([0.0, 4.0, -2.0], np.float32)
    nxt = np.array([4.0, 0.0, 2.0], np.float32)
    # a = 1, b = 3 (eps 0): W = (1*prev + 3*nxt) / 4 = [3, 1, 1]
    out = gradnorm_average(prev, nxt, 1.0, 3.0, eps=0.0)
    assert out.dtype == np.float32
    assert out.tolist() == [3.0, 1.0, 1.0]


def test_weights_order_first_norm_goes_with_first_array() -> None:
    prev, nxt = np.zeros(4, np.float32), np.ones(4, np.float32)
    # a big norm on prev pulls toward prev; a big norm on nxt pulls toward nxt
    assert np.allclose(gradnorm_average(prev, nxt, 9.0, 1.0, eps=0.0), 0.1)
    assert np.allclose(gradnorm_average(prev, nxt, 1.0, 9.0, eps=0.0), 0.9)


def test_eps_is_added_to_each_norm() -> None:
    prev, nxt = np.zeros(3, np.float32), np.ones(3, np.float32)
    # both raw norms zero: eps alone weights them, equally
    assert np.allclose(gradnorm_average(prev, nxt, 0.0, 0.0), 0.5)
    # n_prev = 0 + 1e-4, n_next = 1 + 1e-4
    expect = (1.0 + 1e-4) / (1.0 + 2e-4)
    assert np.allclose(gradnorm_average(prev, nxt, 0.0, 1.0), expect, rtol=1e-6)
    assert not np.allclose(gradnorm_average(prev, nxt, 0.0, 1.0, eps=0.0),
                           gradnorm_average(prev, nxt, 0.0, 1.0, eps=0.5))
    with pytest.raises(LocalError, match="both weights are zero"):
        gradnorm_average(prev, nxt, 0.0, 0.0, eps=0.0)


def test_formula_matches_float64_reference_and_is_bit_reproducible() -> None:
    rng = np.random.default_rng(3)
    prev = rng.standard_normal(1000).astype(np.float32)
    nxt = rng.standard_normal(1000).astype(np.float32)
    a, b = 0.37 + 1e-4, 2.9 + 1e-4
    ref = (a * prev.astype(np.float64) + b * nxt.astype(np.float64)) / (a + b)
    out = gradnorm_average(prev, nxt, 0.37, 2.9)
    assert np.allclose(out, ref, rtol=0, atol=1e-6)
    assert (bits(out) == bits(gradnorm_average(prev.copy(), nxt.copy(), 0.37, 2.9))).all()


def test_formula_refuses_misuse() -> None:
    x = np.zeros(2, np.float32)
    with pytest.raises(LocalError, match="shapes differ"):
        gradnorm_average(x, np.zeros(3, np.float32), 1.0, 1.0)
    with pytest.raises(LocalError, match="finite"):
        gradnorm_average(x, x, float("nan"), 1.0)
    with pytest.raises(LocalError, match="finite"):
        gradnorm_average(x, x, -1.0, 1.0)


finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)
norms = st.floats(0.0, 1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 20), elements=finite32), norms, norms)
def test_identical_neighbours_give_themselves_back(w: np.ndarray, n1: float, n2: float) -> None:
    assert (bits(gradnorm_average(w, w.copy(), n1, n2)) == bits(w)).all()


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, 16, elements=finite32), hnp.arrays(np.float32, 16, elements=finite32), norms, norms)
def test_result_is_a_convex_combination(p: np.ndarray, q: np.ndarray, n1: float, n2: float) -> None:
    out = gradnorm_average(p, q, n1, n2)
    assert (out >= np.minimum(p, q)).all() and (out <= np.maximum(p, q)).all()


# ------------------------------------------------------------------------------------- pre vs post clip

def test_clipped_norm_follows_torch() -> None:
    torch = pytest.importorskip("torch")
    for raw_scale in (0.3, 5.0):
        p = torch.nn.Parameter(torch.zeros(10))
        p.grad = torch.full((10,), raw_scale)
        raw = float(torch.nn.utils.clip_grad_norm_([p], 1.0))
        assert clipped_norm(raw) == pytest.approx(float(torch.linalg.vector_norm(p.grad)), rel=1e-6)


def test_post_clip_degenerates_to_uniform_when_both_raw_norms_exceed_one() -> None:
    lo, hi = state(0, 1.0), state(2, 5.0)
    lo.grad_norm, lo.grad_norm_clipped = 2.0, clipped_norm(2.0)
    hi.grad_norm, hi.grad_norm_clipped = 8.0, clipped_norm(8.0)
    post = CheckFree(norm="post").rebuild(1, 3, SHAPES, {0: lo, 2: hi})
    pre = CheckFree(norm="pre").rebuild(1, 3, SHAPES, {0: lo, 2: hi})
    for k in SHAPES:
        uniform = (lo.weights[k] + hi.weights[k]) / 2
        assert np.allclose(post.weights[k], uniform, atol=1e-5)
        assert np.allclose(pre.weights[k], (2.0 * lo.weights[k] + 8.0 * hi.weights[k]) / 10.0, atol=1e-5)
        assert not np.allclose(pre.weights[k], uniform, atol=1e-3)
    assert post.how == pre.how == "checkfree" and not pre.degraded


# ------------------------------------------------------------------------------------------ the cases

def test_middle_stage_is_the_gradnorm_average_bit_for_bit() -> None:
    lo, hi = state(1, 1.0, norm=0.7), state(3, -2.0, norm=3.1)
    res = CheckFree().rebuild(2, 4, SHAPES, {1: lo, 3: hi, 0: state(0, 9.0)})
    assert res.how == "checkfree" and not res.degraded
    assert res.lr_scale == pytest.approx(1.1) and res.fresh_optimizer
    assert list(res.weights) == list(SHAPES)
    for k in SHAPES:
        assert (bits(res.weights[k]) == bits(gradnorm_average(lo.weights[k], hi.weights[k], 0.7, 3.1))).all()


def test_lr_scale_is_configurable() -> None:
    res = CheckFree(lr_scale=1.2).rebuild(1, 3, SHAPES, {0: state(0, 1.0), 2: state(2, 2.0)})
    assert res.lr_scale == pytest.approx(1.2)


@pytest.mark.parametrize("which", ["rebuilt", "unknown"])
def test_neighbour_without_valid_norm_gives_the_uniform_average(which: str) -> None:
    lo = state(0, 1.0, norm=50.0)
    hi = state(2, 3.0, norm=0.01, rebuilt=True) if which == "rebuilt" else state(2, 3.0, norm=None)
    res = CheckFree().rebuild(1, 3, SHAPES, {0: lo, 2: hi})
    assert res.how == "checkfree-uniform" and res.degraded and "stage(s) [2]" in res.note
    for k in SHAPES:
        assert (bits(res.weights[k]) == bits(gradnorm_average(lo.weights[k], hi.weights[k], 1, 1, 0))).all()


def test_post_clip_without_clipped_norm_falls_back_to_uniform() -> None:
    res = CheckFree(norm="post").rebuild(1, 3, SHAPES, {0: state(0, 1.0, clipped=0.5), 2: state(2, 2.0)})
    assert res.how == "checkfree-uniform"


def test_two_adjacent_stages_lost_copy_the_nearest_survivor_degraded() -> None:
    survivors = {0: state(0, 1.0), 3: state(3, 4.0)}        # stages 1 and 2 of 4 lost together
    out = rebuild_lost(CheckFree(), [2, 1], 4, {1: SHAPES, 2: SHAPES}, survivors)
    assert out[1].how == out[2].how == "copy-nearest" and out[1].degraded and out[2].degraded
    for k in SHAPES:
        assert (out[1].weights[k] == survivors[0].weights[k]).all()
        assert (out[2].weights[k] == survivors[3].weights[k]).all()
    # equidistant survivors: the earlier stage, deterministically
    tie = CheckFree().rebuild(2, 5, SHAPES, {0: state(0, 1.0), 4: state(4, 2.0)})
    assert tie.note.endswith("stage 0")


def test_copies_are_not_aliases() -> None:
    lo = state(0, 1.0)
    res = CheckFree().rebuild(1, 2, SHAPES, {0: lo})
    res.weights["0.w"][...] = 123.0
    assert not (lo.weights["0.w"] == 123.0).any()


@pytest.mark.parametrize("lost, partner", [(0, 1), (3, 2)])
def test_checkfree_plus_edge_stage_copies_its_swap_partner(lost: int, partner: int) -> None:
    others = {j: state(j, float(j), norm=1.0 + j) for j in range(4) if j != lost}
    res = CheckFree(plus=True).rebuild(lost, 4, SHAPES, others)
    assert res.how == "swap-copy" and not res.degraded and res.lr_scale == pytest.approx(1.1)
    for k in SHAPES:
        assert (res.weights[k] == others[partner].weights[k]).all()
    # without plus the edge stage has one neighbour: a degraded copy of the nearest
    plain = CheckFree().rebuild(lost, 4, SHAPES, others)
    assert plain.how == "copy-nearest" and plain.degraded


def test_checkfree_plus_middle_stage_still_averages() -> None:
    res = CheckFree(plus=True).rebuild(1, 4, SHAPES, {0: state(0, 1.0), 2: state(2, 2.0), 3: state(3, 3.0)})
    assert res.how == "checkfree"


def test_checkfree_plus_edge_stage_with_partner_lost_is_degraded() -> None:
    res = CheckFree(plus=True).rebuild(0, 4, SHAPES, {2: state(2, 2.0), 3: state(3, 3.0)})
    assert res.how == "copy-nearest" and res.degraded and res.note.endswith("stage 2")


def test_parameters_not_held_as_blocks_come_from_a_neighbours_copy() -> None:
    shapes = dict(SHAPES, **{"tok.weight": (5, 3)})
    emb = np.arange(15, dtype=np.float32).reshape(5, 3)
    partner = state(1, 1.0, extra={"tok.weight": emb})
    res = CheckFree(plus=True).rebuild(0, 4, shapes, {1: partner, 2: state(2, 2.0)})
    assert res.how == "swap-copy" and (res.weights["tok.weight"] == emb).all()
    with pytest.raises(RebuildRefused, match="'tok.weight' is held by no surviving stage"):
        CheckFree(plus=True).rebuild(0, 4, shapes, {1: state(1, 1.0), 2: state(2, 2.0)})


# ---------------------------------------------------------------------------------------------- refusals

def test_refuses_shapes_that_differ_from_the_neighbours() -> None:
    odd = dict(SHAPES, **{"1.w": (3, 4)})
    with pytest.raises(RebuildRefused, match=r"'1.w' has shape \(3, 3\) but stage 2 holds \(3, 4\).*identical"):
        CheckFree().rebuild(1, 3, SHAPES, {0: state(0, 1.0), 2: state(2, 1.0, weights=stage_weights(1.0, odd))})
    missing = {k: v for k, v in SHAPES.items() if k != "0.b"}
    with pytest.raises(RebuildRefused, match=r"'0.b' is missing from stage\(s\) \[0\]"):
        CheckFree().rebuild(1, 3, SHAPES, {0: state(0, 1.0, weights=stage_weights(1.0, missing)),
                                           2: state(2, 1.0)})


def test_refuses_without_any_surviving_stage() -> None:
    with pytest.raises(RebuildRefused, match="stage 1: no surviving stage"):
        CheckFree().rebuild(1, 3, SHAPES, {})


def test_refuses_non_finite_weights_and_norms() -> None:
    bad = stage_weights(1.0)
    bad["0.b"][1] = np.inf
    with pytest.raises(RebuildRefused, match="'0.b' from stage 2 is not finite"):
        CheckFree().rebuild(1, 3, SHAPES, {0: state(0, 1.0), 2: state(2, 1.0, weights=bad)})
    with pytest.raises(RebuildRefused, match="invalid gradient norm"):
        CheckFree().rebuild(1, 3, SHAPES, {0: state(0, 1.0, norm=float("nan")), 2: state(2, 1.0)})


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalError):
        CheckFree().rebuild(3, 3, SHAPES, {0: state(0, 1.0)})
    with pytest.raises(LocalError):
        CheckFree().rebuild(1, 3, SHAPES, {0: state(2, 1.0)})       # key and stage disagree
    with pytest.raises(LocalError):
        rebuild_lost(CheckFree(), [1], 3, {1: SHAPES}, {1: state(1, 1.0)})
    with pytest.raises(LocalError):
        CheckFree(norm="mid")  # type: ignore[arg-type]


def test_checkfree_is_a_stage_rebuild() -> None:
    rule: StageRebuild = CheckFree()
    assert rule.rebuild(1, 3, SHAPES, {0: state(0, 1.0), 2: state(2, 2.0)}).how == "checkfree"


# ------------------------------------------------------------------------------ swap schedule, copies

def test_swapped_order() -> None:
    assert swapped_order(4, 0) == [0, 1, 2, 3]
    assert swapped_order(4, 1) == [1, 0, 3, 2]
    assert swapped_order(6, 3) == [1, 0, 2, 3, 5, 4]
    assert swapped_order(6, 4) == list(range(6))
    assert swapped_order(2, 1) == [1, 0]
    assert swapped_order(1, 1) == [0]
    with pytest.raises(LocalError, match="overlap"):
        swapped_order(3, 1)
    assert [swap_partner(s, 6) for s in range(6)] == [1, 0, None, None, 5, 4]
    assert swap_pairs(8) == ((0, 1), (6, 7))


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 40), st.integers(0, 1000))
def test_swapped_order_is_a_permutation_and_an_involution(n: int, mb: int) -> None:
    order = swapped_order(n, mb)
    assert sorted(order) == list(range(n))
    assert [order[i] for i in order] == list(range(n))
    assert all(order[s] == s for s in range(2, n - 2))


def test_embedding_copies_and_their_bytes() -> None:
    c = embedding_copies(4, embed_bytes=1000, head_bytes=300)
    assert c.holders == {1: ("embedding",), 2: ("head",)}
    assert c.extra_bytes == {1: 1000, 2: 300} and c.total_bytes == 1300
    both = embedding_copies(4, 1000, 1000, embed_stage=0, head_stage=0, tied=True)
    assert both.holders == {1: ("embedding", "head")} and both.total_bytes == 1000
    three = embedding_copies(3, 10, 20)
    assert three.holders == {1: ("embedding", "head")} and three.total_bytes == 30
    assert embedding_copies(1, 10, 20).total_bytes == 0
