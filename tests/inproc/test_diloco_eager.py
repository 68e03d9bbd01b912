"""DiLoCo: the eager mode against its single-process reference, the outer step, fragments, misuse, and the
example corpus."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytest
import torch

from collectives.errors import LocalError
from peer.train.diloco import DiLoCo, flatten_params, fragment_bounds, outer_sgd, state_digest
from tests.helpers import InProcess, run_all
from tests.inproc.test_collectives_inproc import form
from tests.inproc.test_diloco import (BATCH, H, LR, _load, assert_parity, batch, by_revision, check, die_in_average,
                               local_step, make_inner, make_model, ref_outer, ring_sum, train)

pytestmark = pytest.mark.timeout(90)


def reference_eager(opts: dict[int, DiLoCo], rounds: int) -> list[str]:
    """The eager mode in one process: the average of round k is applied to the shared state at sync point
    k+1; meanwhile each peer starts round k+1 from a tentative step whose pseudo-gradient is its share of its
    own fresh one plus the others' part of the last applied average."""
    ids = {o.swarm.id: i for i, o in opts.items()}
    root = next(i for i, o in opts.items() if not o.history[0].adopted)
    theta = flatten_params(list(make_model(root).parameters()))
    mom = np.zeros_like(theta)
    models = {i: make_model(i) for i in opts}
    inners = {i: make_inner(m) for i, m in models.items()}
    start = {i: theta.copy() for i in opts}
    for m in models.values():
        _load(m, theta)
    prev_avg: Optional[np.ndarray] = None
    prev_mine: dict[int, np.ndarray] = {}
    members = by_revision(opts[0])[1].members
    digests = []
    for k in range(1, rounds + 1):
        deltas = {}
        for i in opts:
            for step in range((k - 1) * H, k * H):
                local_step(models[i], inners[i], i, step)
            deltas[i] = np.subtract(start[i], flatten_params(list(models[i].parameters())))
        order = [ids[m] for m in members]
        total = ring_sum([np.array([BATCH * H], np.float32) for _ in order])[0]
        scale = np.float32(np.float32(BATCH * H) / total)
        avg = ring_sum([np.multiply(deltas[i], scale) for i in order])
        for i in opts:  # the tentative start of round k+1, from the shared state of sync point k
            proxy = np.multiply(deltas[i], scale)
            if prev_avg is not None:
                proxy = np.subtract(np.add(proxy, prev_avg), prev_mine[i])
            t, mo = theta.copy(), mom.copy()
            ref_outer(t, mo, proxy)
            start[i] = t
            _load(models[i], t)
        ref_outer(theta, mom, avg)  # committed at sync point k+1 (or at finish)
        digests.append(state_digest(theta, mom).hex())
        prev_avg, prev_mine = avg, {i: np.multiply(deltas[i], scale) for i in opts}
    return digests


def test_eager_matches_the_reference(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    opts = check(run_all([lambda s=s, i=i: train(s, i, rounds=4, mode="eager") for i, s in enumerate(peers)]))
    assert_parity(opts)
    assert reference_eager(dict(enumerate(opts)), 4) == [by_revision(opts[0])[r].digest for r in range(1, 5)]


def test_eager_parity_after_every_commit_and_survives_a_lost_member(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    survivors, victim = peers[:2], peers[2]
    die_in_average(inproc, victim, survivors, nth=3)  # round 3's average: the survivors train on meanwhile
    results = run_all([lambda s=s, i=i: train(s, i, rounds=5, mode="eager") for i, s in enumerate(peers)])
    assert isinstance(results[2], RuntimeError)
    opts = check(results[:2])
    assert_parity(opts)
    revs = by_revision(opts[0])
    assert sorted(revs) == [1, 2, 3, 4, 5]
    assert revs[3].retried  # the in-flight average was rerun on the survivors at the next sync point
    assert [len(revs[r].members) for r in range(1, 6)] == [3, 3, 2, 2, 2]


def test_outer_step_is_torch_nesterov_sgd_and_plain_averaging_is_the_mean() -> None:
    rng = np.random.default_rng(0)
    theta, g = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)
    p = torch.nn.Parameter(torch.from_numpy(theta.copy()))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    mom = np.zeros_like(theta)
    for _ in range(3):
        p.grad = torch.from_numpy(g.copy())
        sgd.step()
        outer_sgd(theta, mom, g, 0.7, 0.9, True, np.empty_like(g))
    np.testing.assert_allclose(theta, p.detach().numpy(), rtol=1e-6, atol=1e-6)
    # lr 1, no momentum: the new weights are the average of the local weights
    locals_ = [rng.standard_normal(100).astype(np.float32) for _ in range(4)]
    w = np.zeros(100, np.float32)
    outer_sgd(w, np.zeros_like(w), np.mean([w - x for x in locals_], axis=0), 1.0, 0.0, False, np.empty_like(w))
    np.testing.assert_allclose(w, np.mean(locals_, axis=0), atol=1e-6)


def test_fragment_bounds_cut_between_parameters() -> None:
    assert fragment_bounds([10, 10, 10, 10], 2) == [(0, 20), (20, 40)]
    assert fragment_bounds([100, 1, 1], 3) == [(0, 100), (100, 101), (101, 102)]
    assert fragment_bounds([5], 1) == [(0, 5)]
    with pytest.raises(LocalError):
        fragment_bounds([5, 5], 3)


def test_misuse_and_lr_scheduler(inproc: InProcess) -> None:
    peers = form(inproc, 2)
    m = make_model(0)
    for bad in (dict(codec="zip"), dict(mode="async"), dict(mode="streaming", fragments=2, inner_steps=3),
                dict(fragments=2)):
        with pytest.raises(LocalError):
            DiLoCo(m, make_inner(m), peers[0], **bad)  # type: ignore[arg-type]

    def run(i: int) -> list[float]:
        model = make_model(i)
        inner = make_inner(model)
        sched = torch.optim.lr_scheduler.StepLR(inner, step_size=2, gamma=0.5)
        opt = DiLoCo(model, inner, peers[i], inner_steps=2, op_timeout=30, codec="bf16")
        lrs = []
        for step in range(6):
            local_step(model, opt, i, step)
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        opt.finish()
        return lrs

    out = check(run_all([lambda: run(0), lambda: run(1)]))
    assert out[0] == pytest.approx([LR, LR / 2, LR / 2, LR / 4, LR / 4, LR / 8])


def test_example_corpus_split_is_by_file_and_the_main_jobs_plot_draws_its_events(tmp_path: Any) -> None:
    from matplotlib.image import imread

    from examples.charlm import CharLM, LMConfig, is_validation, load_corpus, stdlib_files
    from examples.local_swarm import plot

    files = stdlib_files()
    assert files and all("/test/" not in f.as_posix() for f in files)
    assert is_validation("json/decoder.py") == is_validation("json/decoder.py")  # a pure function of the path
    corpus = load_corpus(max_bytes=100_000)
    assert corpus.train.numel() == 100_000 and corpus.val.numel() > 10_000 and corpus.val_files > 0
    x, y = corpus.batch("train", 2, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert CharLM(LMConfig(block=16)).loss(x, y).item() == pytest.approx(np.log(256), rel=0.05)
    # the main job's plot, from event records like the trainers print (examples/train_swarm.py --events)
    events: list[dict[str, Any]] = [{"event": "listening", "peer": p, "wall": 100.0} for p in ("a", "b")]
    for r in range(1, 9):
        for p in ("a", "b"):
            events.append({"event": "round", "peer": p, "wall": 100.0 + r, "kind": "outer", "revision": r,
                           "committed": r != 5, "members": 2, "loss": 3.0 - 0.1 * r,
                           "val": 3.1 - 0.1 * r if p == "a" and r != 5 else None})
    faults = [{"wall": 104.5, "kind": "kill", "who": "c", "revision": 4}]
    path = tmp_path / "p.png"
    assert plot(events, faults, path, subtitle="2 peers")
    img = imread(path)[..., :3]
    assert img.shape[:2] == (660, 1000)
    assert (img.max(axis=-1) < 0.05).mean() > 0.002                      # the black validation-loss line
    red = (img[..., 0] > 0.7) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)
    assert red.sum() > 60                                                # the kill mark and the failed sync
    assert not plot([e for e in events if e.get("val") is None], faults, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
