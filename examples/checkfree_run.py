"""The CheckFree experiment's trainer: several runs (members) in lockstep, failures injected from a schedule.

A member is (arm, p, seed, lr). Every member of the same seed starts from the same model and sees the same
batches; every member of the same (p, seed) sees the same failure schedule (``failure_schedule``). At a
failing iteration the failed stages are rebuilt at micro-batch 0 (before the forward pass) from the surviving
stages' current weights and the gradient norms of the previous iteration, and the iteration then continues,
as in the paper's simulation. Each rebuilt stage gets a fresh Adam state and its learning rate x1.1.

Arms trained here: nofail, random, copy, uniform, cf-pre, cf-post, cf+ (CheckFree+ with pre-clip norms, and
the swapped stage order on odd micro-batches). Checkpoint rollback and redundant computation are simulated
from the no-failure curves afterwards (``examples.checkfree_analysis``).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from examples.charlm import Corpus
from examples.checkfree_model import Ensemble, ModelConfig, block_shapes, init_stage
from recovery.checkfree import CheckFree, clipped_norm, rebuild_lost, swapped_order
from recovery.rebuild import NeighbourState, RebuildResult

log = logging.getLogger(__name__)

TRAINED_ARMS = ("nofail", "random", "copy", "uniform", "cf-pre", "cf-post", "cf+")
MICRO_BATCHES = 2       # per iteration (CheckFree+ swaps the stage order on the odd one)
MICRO_BATCH = 1         # windows per micro-batch
WARMUP = 100            # linear learning-rate warm-up steps, then constant (the paper's LLaMA configs)
LR_SCALE = 1.1
MAX_NORM = 1.0          # per-stage gradient clipping (the reference's)
EVAL_WINDOWS = 32       # validation windows (fixed, the same for every run)
PROBE_WINDOWS = 16      # the loss before/after a rebuild is measured on these


@dataclass(frozen=True)
class Member:
    arm: str
    p: float
    seed: int
    lr: float

    @property
    def key(self) -> str:
        return f"{self.arm}|p={self.p}|seed={self.seed}|lr={self.lr}"


def failure_schedule(p: float, seed: int, stages: int, length: int) -> np.ndarray:
    """(length, stages) bool: stage s fails at iteration t. One per (p, seed), shared by every arm."""
    rng = np.random.default_rng([seed, int(round(p * 1e6)), 12])
    out: np.ndarray = rng.random((length, stages)) < p
    return out


def warmup_lr(base: float, step: int) -> float:
    return base * min(1.0, (step + 1) / WARMUP)


class Trainer:
    def __init__(self, members: Sequence[Member], corpus: Corpus, c: ModelConfig, steps: int) -> None:
        self.members = list(members)
        self.c = c
        self.corpus = corpus
        self.steps = steps
        self.ens = Ensemble(c, [m.seed for m in self.members])
        self.shapes = block_shapes(c)
        A, S = len(self.members), c.stages
        self.lr_factor = np.ones((S, A))
        self.norm: Optional[np.ndarray] = None        # (S, A) raw norms of the previous iteration
        self.sched = {m.key: failure_schedule(m.p, m.seed, S, steps) for m in self.members if m.arm != "nofail"}
        self.gens = {s: torch.Generator().manual_seed(10_000 + s) for s in sorted({m.seed for m in self.members})}
        self.plus = torch.tensor([m.arm == "cf+" for m in self.members])
        self.eval_x, self.eval_y = corpus.val_windows(c.block, EVAL_WINDOWS)
        px, py = corpus.val_windows(c.block, PROBE_WINDOWS * 3)
        self.probe_x, self.probe_y = px[1::3], py[1::3]                    # not the eval windows
        self.train_loss: list[list[float]] = [[] for _ in self.members]
        self.val: list[list[tuple[int, float]]] = [[] for _ in self.members]
        self.events: list[list[dict[str, Any]]] = [[] for _ in self.members]
        self.step_seconds: list[float] = []

    # ------------------------------------------------------------------------------------- recovery
    def _rebuild(self, a: int, lost: list[int], t: int) -> dict[int, RebuildResult]:
        m = self.members[a]
        S = self.c.stages
        norms = self.norm
        survivors = {}
        for j in range(S):
            if j in lost:
                continue
            raw = None if norms is None else float(norms[j, a])
            survivors[j] = NeighbourState(stage=j, weights=self.ens.stage_arrays(j, a), grad_norm=raw,
                                          grad_norm_clipped=None if raw is None else clipped_norm(raw, MAX_NORM))
        shapes = {s: self.shapes for s in lost}
        if m.arm in ("cf-pre", "cf-post", "cf+"):
            rule = CheckFree(norm="post" if m.arm == "cf-post" else "pre", lr_scale=LR_SCALE, plus=m.arm == "cf+")
            return rebuild_lost(rule, lost, S, shapes, survivors)
        if m.arm == "uniform":    # the same rule with equal norms: a plain average of the two neighbours
            for st in survivors.values():
                st.grad_norm = 1.0
            out = rebuild_lost(CheckFree(lr_scale=LR_SCALE), lost, S, shapes, survivors)
            return {s: RebuildResult(r.weights, "uniform" if r.how == "checkfree" else r.how, r.degraded,
                                     r.lr_scale, True, r.note) for s, r in out.items()}
        res = {}
        for s in lost:
            if m.arm == "copy":     # the paper's "copy": the previous stage (the next one for the first)
                src = s + 1 if s == 0 else s - 1
                how = "copy"
                if src in lost:
                    src = min(survivors, key=lambda j: (abs(j - s), j))
                    how = "copy-nearest"
                res[s] = RebuildResult({k: v.copy() for k, v in survivors[src].weights.items()}, how,
                                       how != "copy", LR_SCALE)
            elif m.arm == "random":
                gen = torch.Generator().manual_seed(zlib.crc32(f"{m.seed}/{m.p}/{t}/{s}".encode()))
                res[s] = RebuildResult({k: v.numpy() for k, v in init_stage(self.c, gen).items()}, "random",
                                       False, LR_SCALE)
            else:
                raise ValueError(f"arm {m.arm!r} has no recovery rule")
        return res

    def _failures(self, t: int) -> None:
        failing = []
        for a, m in enumerate(self.members):
            if m.arm == "nofail":
                continue
            lost = [int(s) for s in np.flatnonzero(self.sched[m.key][t])]
            if lost:
                failing.append((a, lost))
        if not failing:
            return
        idx = torch.tensor([a for a, _ in failing])
        before = self.ens.eval_losses(self.probe_x, self.probe_y, idx)
        hows = {}
        for a, lost in failing:
            results = self._rebuild(a, lost, t)
            for s, r in results.items():            # all computed from the survivors first, then applied
                self.ens.replace_stage(s, a, r.weights)
                self.lr_factor[s, a] = r.lr_scale
            hows[a] = {str(s): [r.how, r.degraded] for s, r in results.items()}
        after = self.ens.eval_losses(self.probe_x, self.probe_y, idx)
        for i, (a, lost) in enumerate(failing):
            self.events[a].append({"step": t, "stages": lost, "how": hows[a], "probe_before": round(before[i], 5),
                                   "probe_after": round(after[i], 5), "jump": round(after[i] - before[i], 5)})

    # -------------------------------------------------------------------------------------- training
    def _order(self, mb: int) -> Optional[torch.Tensor]:
        if mb % 2 == 0 or not bool(self.plus.any()):
            return None
        S, A = self.c.stages, len(self.members)
        ident = torch.arange(S)[:, None].expand(S, A)
        swapped = torch.tensor(swapped_order(S, mb))[:, None].expand(S, A)
        return torch.where(self.plus[None, :], swapped, ident).contiguous()

    def step(self, t: int) -> None:
        t0 = time.perf_counter()
        self._failures(t)
        batches = {s: self.corpus.batch("train", MICRO_BATCHES * MICRO_BATCH, self.c.block, g)
                   for s, g in self.gens.items()}
        x = torch.stack([batches[m.seed][0] for m in self.members])        # (A, MB*b, T)
        y = torch.stack([batches[m.seed][1] for m in self.members])
        total = torch.zeros(len(self.members))
        for mb in range(MICRO_BATCHES):
            sl = slice(mb * MICRO_BATCH, (mb + 1) * MICRO_BATCH)
            losses = self.ens.losses(x[:, sl], y[:, sl], self._order(mb))
            (losses.sum() / MICRO_BATCHES).backward()  # type: ignore[no-untyped-call]
            total += losses.detach() / MICRO_BATCHES
        lr_now = np.array([warmup_lr(m.lr, t) for m in self.members])
        self.ens.base_lr = torch.tensor(lr_now, dtype=torch.float32)
        lr = torch.tensor(lr_now[None, :] * self.lr_factor, dtype=torch.float32)
        self.norm = self.ens.clip_and_step(lr, MAX_NORM)
        for a, v in enumerate(total.tolist()):
            self.train_loss[a].append(round(v, 4))
        self.step_seconds.append(time.perf_counter() - t0)

    def evaluate(self, t: int) -> None:
        for a, v in enumerate(self.ens.eval_losses(self.eval_x, self.eval_y)):
            self.val[a].append((t, round(float(v), 5)))

    def run(self, eval_every: int, progress: Optional[Path] = None) -> list[dict[str, Any]]:
        self.evaluate(0)
        for t in range(self.steps):
            self.step(t)
            if (t + 1) % eval_every == 0 or t + 1 == self.steps:
                self.evaluate(t + 1)
                log.info("step %d/%d  %.2f s/step  val %s", t + 1, self.steps,
                         float(np.mean(self.step_seconds[-eval_every:])),
                         " ".join(f"{m.arm}:{v[-1][1]:.3f}" for m, v in zip(self.members, self.val)))
                if progress is not None:
                    progress.write_text(json.dumps(self.records(partial=True)))
        return self.records(partial=False)

    def records(self, partial: bool) -> list[dict[str, Any]]:
        return [{"member": asdict(m), "key": m.key, "partial": partial, "steps": len(self.train_loss[a]),
                 "config": asdict(self.c), "micro_batches": MICRO_BATCHES, "micro_batch": MICRO_BATCH,
                 "warmup": WARMUP, "lr_scale": LR_SCALE, "max_norm": MAX_NORM,
                 "members_in_process": len(self.members),
                 "mean_step_seconds_process": float(np.mean(self.step_seconds)) if self.step_seconds else None,
                 "train_loss": self.train_loss[a], "val": self.val[a], "events": self.events[a]}
                for a, m in enumerate(self.members)]
