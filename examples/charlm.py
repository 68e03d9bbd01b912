"""A small byte-level transformer language model and its data: the Python standard library's own source.

Every machine with Python has this corpus offline. Files are split into train and validation by a hash of
their path relative to the stdlib root, so the split is the same on every machine with the same Python
version, and no file contributes to both sides.

    from examples.charlm import LMConfig, CharLM, load_corpus
    corpus = load_corpus()                                   # bytes of ~670 stdlib .py files
    model = CharLM(LMConfig(width=64, layers=2))
    x, y = corpus.batch("train", batch=16, block=64, gen=torch.Generator().manual_seed(0))
    loss = model.loss(x, y)                                  # cross-entropy in nats per byte
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# Directories left out: tests are a different kind of text (and half of the stdlib by size), idlelib and
# site-packages are not the library proper.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})
VAL_PERCENT = 5
SEPARATOR = 0  # byte between files (never occurs in source text)


# ---------------------------------------------------------------------------------------------- data

def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """Every .py file of the standard library outside SKIP_DIRS, sorted by relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relpath: str) -> bool:
    h = hashlib.blake2b(relpath.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % 100 < VAL_PERCENT


@dataclass
class Corpus:
    train: torch.Tensor  # (N,) uint8: the training files joined by SEPARATOR
    val: torch.Tensor    # (M,) uint8
    train_files: int
    val_files: int

    def batch(self, split: str, batch: int, block: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs (B, T) and next-byte targets (B, T), int64."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, data.numel() - block - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(block + 1)[None, :]      # (B, T+1)
        win = data[idx].long()
        return win[:, :-1], win[:, 1:]

    def val_windows(self, block: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed, evenly spaced set of validation windows (the same on every peer and every run)."""
        step = (self.val.numel() - block - 1) // count
        starts = torch.arange(count) * step
        idx = starts[:, None] + torch.arange(block + 1)[None, :]
        win = self.val[idx].long()
        return win[:, :-1], win[:, 1:]


def load_corpus(root: Optional[Path] = None, max_bytes: Optional[int] = None) -> Corpus:
    """Read the stdlib sources and split them by file. ``max_bytes`` caps the training text (tests)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train: list[bytes] = []
    val: list[bytes] = []
    for path in stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        text = path.read_bytes().replace(bytes([SEPARATOR]), b"")
        (val if is_validation(rel) else train).append(text)
    sep = bytes([SEPARATOR])
    train_bytes = sep.join(train)
    if max_bytes is not None:
        train_bytes = train_bytes[:max_bytes]
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return Corpus(as_tensor(train_bytes), as_tensor(sep.join(val)), len(train), len(val))


# ---------------------------------------------------------------------------------------------- model

@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256      # bytes
    block: int = 64       # context length
    width: int = 64
    layers: int = 2
    heads: int = 4


class Block(nn.Module):
    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.ln2 = nn.LayerNorm(c.width)
        self.fc = nn.Linear(c.width, 4 * c.width)
        self.out = nn.Linear(4 * c.width, c.width)
        mask = torch.full((c.block, c.block), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)           # (T, T) causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:                # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, d)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.heads) + self.mask[:T, :T]           # (B, h, T, T)
        y = att.softmax(-1) @ v                                                                     # (B, h, T, d)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    """A GPT-style decoder over bytes; the output layer shares the embedding matrix."""

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Parameter(torch.zeros(c.block, c.width))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f = nn.LayerNorm(c.width)
        self.apply(self._init)
        for b in self.blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * c.layers))
            nn.init.normal_(b.out.weight, std=0.02 / math.sqrt(2 * c.layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:             # (B, T) -> (B, T, V)
        T = idx.shape[1]
        x = self.tok(idx) + self.pos[:T]
        for b in self.blocks:
            x = b(x)
        return self.ln_f(x) @ self.tok.weight.t()

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model: CharLM, windows: tuple[torch.Tensor, torch.Tensor], batch: int = 64) -> float:
    """Mean validation cross-entropy (nats per byte) over fixed windows."""
    was_training = model.training
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, x.shape[0], batch):
        total += float(model.loss(x[i:i + batch], y[i:i + batch])) * x[i:i + batch].shape[0]
    model.train(was_training)
    return total / x.shape[0]


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
