"""Files of the wall-clock experiment (``examples/diloco_wallclock.py``): the warm start every arm begins from,
and the weight snapshots peer 0 writes while an arm runs (evaluated afterwards, outside the time budget).

All files are plain ``.npz`` / ``.npy`` arrays, read with object arrays refused (``allow_pickle=False``):
no Python object deserialisation anywhere.

    warm = make_warm_start(path, steps=30)      # 30 synchronous steps of 4 x 16 windows, LR warm-up to 4e-3
    model, inner = build(warm_path)             # the charlm model + AdamW holding that state
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from examples.charlm import CharLM, Corpus, LMConfig, evaluate
from peer.train.outer import flatten_params, load_params

MODEL = LMConfig(width=64, layers=2, heads=4, block=64)   # the main job's model (121k parameters)
BATCH = 16                # windows of 64 bytes per peer per step
WORKERS = 4
LR = 4e-3                 # the inner LR tuned in the toy experiment (diloco_experiment_summary.json)
BETAS = (0.9, 0.95)
WARM_STEPS = 30           # the toy experiment's LR warm-up length; also its "warm30" synchronous start
VAL_WINDOWS = 256         # as in the toy experiment
WARM_SEED, DATA_SEED = 0, 1000   # model init; peer r's data stream is seeded DATA_SEED + r


def new_model_and_optimizer(lr: float = LR) -> tuple[CharLM, torch.optim.AdamW]:
    torch.manual_seed(WARM_SEED)
    model = CharLM(MODEL)
    inner = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS, weight_decay=0.0)
    return model, inner


def make_warm_start(path: Path, corpus: Corpus, steps: int = WARM_STEPS) -> Path:
    """``steps`` synchronous data-parallel steps (4 peers' batches = one batch of 4 x 16), LR linear from
    lr/steps to lr; saves the weights and the AdamW state. The same file starts every arm."""
    model, inner = new_model_and_optimizer()
    gen = torch.Generator().manual_seed(WARM_SEED + 7)
    for step in range(steps):
        for g in inner.param_groups:
            g["lr"] = LR * (step + 1) / steps
        x, y = corpus.batch("train", BATCH * WORKERS, MODEL.block, gen)   # (64, T)
        torch.autograd.backward(model.loss(x, y))
        inner.step()
        inner.zero_grad()
    save_state(path, model, inner, {"warm_steps": steps})
    return path


def save_state(path: Path, model: torch.nn.Module, inner: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    params = list(model.parameters())
    arrays: dict[str, np.ndarray] = {"theta": flatten_params(params)}
    for i, p in enumerate(params):
        st = inner.state[p]
        arrays[f"m{i}"] = st["exp_avg"].detach().numpy().reshape(-1).copy()
        arrays[f"v{i}"] = st["exp_avg_sq"].detach().numpy().reshape(-1).copy()
        arrays[f"s{i}"] = np.array([float(st["step"])], np.float64)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    tmp = path.with_suffix(".tmp.npz")
    savez: Any = np.savez   # (numpy's stub matches **arrays against its allow_pickle flag)
    savez(tmp, **arrays)
    tmp.replace(path)


def load_state(path: Path, model: torch.nn.Module, inner: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a ``save_state`` file (shapes checked) into the model and the AdamW optimizer."""
    params = list(model.parameters())
    with np.load(path, allow_pickle=False) as z:
        theta = z["theta"]
        if theta.dtype != np.float32 or theta.size != sum(p.numel() for p in params):
            raise ValueError(f"{path}: weights of {theta.size} {theta.dtype}, the model has "
                             f"{sum(p.numel() for p in params)} float32")
        load_params(params, theta)
        for i, p in enumerate(params):
            m, v, s = z[f"m{i}"], z[f"v{i}"], z[f"s{i}"]
            if m.size != p.numel() or v.size != p.numel() or s.size != 1:
                raise ValueError(f"{path}: optimizer state {i} does not fit parameter {tuple(p.shape)}")
            inner.state[p] = {"step": torch.tensor(float(s[0])),
                              "exp_avg": torch.from_numpy(m.astype(np.float32)).reshape(p.shape).clone(),
                              "exp_avg_sq": torch.from_numpy(v.astype(np.float32)).reshape(p.shape).clone()}
        meta: dict[str, Any] = json.loads(bytes(z["meta"]).decode())
    return meta


def save_corpus(path: Path, corpus: Corpus) -> None:
    """The corpus as one .npz (peers load it in well under a second instead of reading ~670 files)."""
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, train=corpus.train.numpy(), val=corpus.val.numpy(),
             files=np.array([corpus.train_files, corpus.val_files], np.int64))
    tmp.replace(path)


def load_cached_corpus(path: Path) -> Corpus:
    with np.load(path, allow_pickle=False) as z:
        train, val, files = z["train"], z["val"], z["files"]
        if train.dtype != np.uint8 or val.dtype != np.uint8 or files.shape != (2,):
            raise ValueError(f"{path}: not a saved corpus")
        return Corpus(torch.from_numpy(train.copy()), torch.from_numpy(val.copy()), int(files[0]), int(files[1]))


# ---------------------------------------------------------------------- snapshots
class Snapshots:
    """Peer 0's record of the model an arm would deliver at each moment: weights (``.npy``) and a JSONL index
    (t since the arm's start, samples that went into the weights, steps, syncs), at most one per ``every`` s."""

    def __init__(self, directory: Path, t0: float, every: float) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0, self.every = t0, every
        self.last = -1e9
        self.count = 0
        self.index = open(self.dir / "index.jsonl", "a", encoding="utf-8")

    def maybe(self, flat: np.ndarray, samples: float, steps: int, syncs: int, force: bool = False) -> bool:
        now = time.time()
        if not force and now - self.last < self.every:
            return False
        self.last = now
        name = f"{self.count:05d}.npy"
        np.save(self.dir / name, np.ascontiguousarray(flat, np.float32), allow_pickle=False)
        self.index.write(json.dumps({"file": name, "t": now - self.t0, "samples": samples, "steps": steps,
                                     "syncs": syncs}) + "\n")
        self.index.flush()
        self.count += 1
        return True

    def close(self) -> None:
        self.index.close()


class Evaluator:
    """Validation loss of chosen snapshots (and of the warm start at t = 0): evaluation is the slow part on a
    loaded machine, so the runner evaluates a strided subset and refines it where a target loss is crossed."""

    def __init__(self, corpus: Corpus, warm: Path) -> None:
        self.model, inner = new_model_and_optimizer()
        load_state(warm, self.model, inner)
        self.windows = corpus.val_windows(MODEL.block, VAL_WINDOWS)
        self.params = list(self.model.parameters())
        self.n = sum(p.numel() for p in self.params)
        self.warm_val = evaluate(self.model, self.windows)

    def index(self, directory: Path) -> list[dict[str, Any]]:
        path = directory / "index.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        return sorted((json.loads(line) for line in lines if line.strip()), key=lambda m: float(m["t"]))

    def val(self, directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
        flat = np.load(directory / meta["file"], allow_pickle=False)
        if flat.dtype != np.float32 or flat.size != self.n:
            raise ValueError(f"snapshot {meta['file']}: {flat.size} {flat.dtype}")
        load_params(self.params, flat)
        return {"t": round(float(meta["t"]), 3), "samples": float(meta["samples"]), "steps": int(meta["steps"]),
                "syncs": int(meta["syncs"]), "val": evaluate(self.model, self.windows)}

    def curve(self, directory: Path, budget: float, points: int, targets: Sequence[float],
              known: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
        """About ``points`` evenly spaced snapshots with t <= budget (always the last one), plus every snapshot
        between the last evaluated one above each target and the first at or below it, so ``time_to`` is
        exact at those targets (assuming no earlier crossing between strided points)."""
        metas = [m for m in self.index(directory) if float(m["t"]) <= budget]
        done: dict[str, dict[str, Any]] = {}
        for r in known:
            if "file" in r:
                done[r["file"]] = r

        def get(i: int) -> dict[str, Any]:
            m = metas[i]
            if m["file"] not in done:
                done[m["file"]] = {**self.val(directory, m), "file": m["file"]}
            return done[m["file"]]

        if metas:
            stride = max(1, len(metas) // max(1, points))
            chosen = sorted(set(range(0, len(metas), stride)) | {len(metas) - 1})
            for i in chosen:
                get(i)
            for target in targets:
                prev = -1
                for i in chosen:
                    if get(i)["val"] <= target:
                        for j in range(prev + 1, i):
                            get(j)
                        break
                    prev = i
        warm = {"t": 0.0, "samples": 0.0, "steps": 0, "syncs": 0, "val": self.warm_val}
        return [warm] + sorted(done.values(), key=lambda r: r["t"])


def time_to(curve: Sequence[dict[str, Any]], target: float) -> Optional[float]:
    """First snapshot time at which the validation loss is at or below ``target`` (None: never)."""
    for r in curve:
        if r["val"] <= target:
            return float(r["t"])
    return None
