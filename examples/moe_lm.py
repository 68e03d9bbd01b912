"""A small mixture-of-experts byte-level language model on the stdlib text (``examples.charlm``'s data).

    from examples.moe_lm import MoEConfig, MoELM
    from examples.charlm import load_corpus
    model = MoELM(MoEConfig(width=128, layers=4, experts=8, top_k=2))
    loss = model.loss(x, y)          # cross-entropy + load-balance + router z-loss (what training minimizes)
    ce = model.ce(x, y)              # cross-entropy only, nats per byte (what validation reports)

Each block: attention, then an MoE feed-forward of ``experts`` SwiGLU experts with top-k routing (softmax
over the k chosen logits). Auxiliary losses (Switch / ST-MoE): load balance ``E * sum_e f_e * P_e`` (f_e the
share of routed slots, P_e the mean router probability) and router z-loss ``mean(logsumexp(logits)^2)``.
Expert parameters are named ``blocks.<l>.moe.experts.<e>.<w1|w2|w3>`` (``peer.train.experts.expert_map``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.charlm import load_corpus  # noqa: F401  (the data this model trains on)


@dataclass(frozen=True)
class MoEConfig:
    vocab: int = 256
    block: int = 64           # context length
    width: int = 128
    layers: int = 4
    heads: int = 4
    experts: int = 8
    top_k: int = 2
    expert_hidden: int = 256  # SwiGLU hidden width of one expert
    lb_coef: float = 1e-2     # load-balance loss weight (SPES: 1e-2)
    z_coef: float = 1e-3      # router z-loss weight (SPES: 1e-3)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(width, hidden, bias=False)
        self.w3 = nn.Linear(width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:              # (n, C) -> (n, C)
        y: torch.Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return y


class MoE(nn.Module):
    def __init__(self, c: MoEConfig) -> None:
        super().__init__()
        self.k = c.top_k
        self.router = nn.Linear(c.width, c.experts, bias=False)
        self.experts: list[SwiGLU] = nn.ModuleList(  # type: ignore[assignment]
            SwiGLU(c.width, c.expert_hidden) for _ in range(c.experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) -> output (B, T, C), load-balance loss, z-loss."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)                                          # (n, C)
        logits = self.router(flat)                                       # (n, E)
        E = logits.shape[-1]
        top, idx = logits.topk(self.k, dim=-1)                           # (n, k)
        gate = top.softmax(-1)                                           # (n, k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)               # tokens routed to e
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * gate[rows, slot, None])
        probs = logits.softmax(-1)                                       # (n, E)
        share = F.one_hot(idx, E).sum(1).float().mean(0) / self.k        # (E,) f_e
        lb = E * (share * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        return out.reshape(B, T, C), lb, z


class Block(nn.Module):
    def __init__(self, c: MoEConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1 = nn.LayerNorm(c.width)
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)
        self.ln2 = nn.LayerNorm(c.width)
        self.moe = MoE(c)
        mask = torch.full((c.block, c.block), float("-inf")).triu(1)
        self.mask: torch.Tensor
        self.register_buffer("mask", mask, persistent=False)            # (T, T) causal

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // self.heads) + self.mask[:T, :T]  # (B, h, T, T)
        x = x + self.proj((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
        y, lb, z = self.moe(self.ln2(x))
        return x + y, lb, z


class MoELM(nn.Module):
    """A GPT-style decoder over bytes with MoE feed-forwards; the output layer shares the embedding."""

    def __init__(self, c: MoEConfig) -> None:
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Parameter(torch.zeros(c.block, c.width))
        self.blocks: list[Block] = nn.ModuleList(Block(c) for _ in range(c.layers))  # type: ignore[assignment]
        self.ln_f = nn.LayerNorm(c.width)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
        for b in self.blocks:  # residual projections scaled down with depth (GPT-2)
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * c.layers))
            for ex in b.moe.experts:
                nn.init.normal_(ex.w2.weight, std=0.02 / math.sqrt(2 * c.layers))

    def forward(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T) -> logits (B, T, V), mean load-balance loss, mean z-loss over layers."""
        T = idx.shape[1]
        x = self.tok(idx) + self.pos[:T]
        lb = z = x.new_zeros(())
        for b in self.blocks:
            x, l_, z_ = b(x)
            lb, z = lb + l_, z + z_
        n = len(self.blocks)
        return self.ln_f(x) @ self.tok.weight.t(), lb / n, z / n

    def ce(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, _, _ = self(idx)
        ce: torch.Tensor = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ce

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, lb, z = self(idx)
        ce: torch.Tensor = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        total: torch.Tensor = ce + self.config.lb_coef * lb + self.config.z_coef * z
        return total


@torch.no_grad()
def evaluate(model: MoELM, windows: tuple[torch.Tensor, torch.Tensor], batch: int = 64) -> float:
    """Mean validation cross-entropy (nats per byte) over fixed windows."""
    was = model.training
    model.eval()
    x, y = windows
    total = 0.0
    for i in range(0, x.shape[0], batch):
        total += float(model.ce(x[i:i + batch], y[i:i + batch])) * x[i:i + batch].shape[0]
    model.train(was)
    return total / x.shape[0]


def split_counts(model: MoELM) -> tuple[int, int]:
    """(shared parameter count, parameters of one expert)."""
    one = sum(p.numel() for p in model.blocks[0].moe.experts[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    return total - one * model.config.layers * model.config.experts, one
