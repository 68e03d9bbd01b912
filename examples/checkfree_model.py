"""The CheckFree experiment's model: many runs of a LLaMA-style byte-level LM, trained in lockstep.

Each *member* is one independent run (its own init, data, failures, recovery rule and learning rate); members
share no parameter, their tensors are stacked on a leading member axis so that one process trains several runs
for little more than the cost of one (the machine this runs on is small). The maths per member is exactly a
pipeline of one embedding/head part (token embedding, learned positions, final RMSNorm, output head; it never
fails, as in the paper's simulation) and ``stages`` identical transformer stages of ``blocks_per_stage`` blocks
(RMSNorm, causal attention, RMSNorm, SwiGLU; no biases), each part with its own gradient clipping and its own
Adam (beta 0.9/0.999, no weight decay), as each stage's peers would have.

A member's stage order per micro-batch is given by the caller (CheckFree+ swaps stages on odd micro-batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelConfig:
    vocab: int = 256
    block: int = 128          # context
    width: int = 128
    heads: int = 4
    stages: int = 4
    blocks_per_stage: int = 2
    hidden: int = 344         # SwiGLU hidden width (about 8/3 of the width, a multiple of 8)


def block_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """One stage's parameters (without the member axis); linear weights stored (in, out)."""
    out: dict[str, tuple[int, ...]] = {}
    for b in range(c.blocks_per_stage):
        out.update({f"{b}.attn_norm": (c.width,), f"{b}.wqkv": (c.width, 3 * c.width),
                    f"{b}.wo": (c.width, c.width), f"{b}.mlp_norm": (c.width,),
                    f"{b}.w13": (c.width, 2 * c.hidden), f"{b}.w2": (c.hidden, c.width)})
    return out


def emb_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {"tok": (c.vocab, c.width), "pos": (c.block, c.width), "norm": (c.width,), "head": (c.width, c.vocab)}


def init_stage(c: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LLaMA/GPT-2 style: normal(0, 0.02) matrices, residual outputs scaled by depth, norms at one."""
    depth = c.stages * c.blocks_per_stage
    out = {}
    for name, shape in block_shapes(c).items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * depth) if name.endswith(("wo", "w2")) else 0.02
            out[name] = torch.randn(shape, generator=gen) * std
    return out


def init_emb(c: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02
            for k, s in emb_shapes(c).items()}


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:        # x (A, N, C), w (A, C)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w[:, None, :]


class Adam:
    """Adam over stacked tensors with a step count and learning rate per (part, member) (torch.optim.Adam's
    update: p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps))."""

    def __init__(self, params: dict[str, torch.Tensor], lead: tuple[int, ...], eps: float = 1e-8) -> None:
        self.params = params
        self.lead = lead                                   # (S, A) for the stages, (A,) for the embedding
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = torch.zeros(lead)
        self.eps = eps

    def reset(self, index: tuple[int, ...]) -> None:
        for k in self.params:
            self.m[k][index] = 0.0
            self.v[k][index] = 0.0
        self.t[index] = 0.0

    @torch.no_grad()
    def step(self, lr: torch.Tensor, b1: float = 0.9, b2: float = 0.999) -> None:   # lr shaped like lead
        self.t += 1
        bc1 = 1 - b1 ** self.t
        bc2 = 1 - b2 ** self.t
        n = len(self.lead)
        for k, p in self.params.items():
            g = p.grad
            assert g is not None
            self.m[k].mul_(b1).add_(g, alpha=1 - b1)
            self.v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
            extra = (1,) * (p.dim() - n)
            step = (lr / bc1).view(self.lead + extra)
            denom = (self.v[k].sqrt() / bc2.sqrt().view(self.lead + extra)).add_(self.eps)
            p.addcdiv_(self.m[k] * step, denom, value=-1.0)
            p.grad = None


class Ensemble:
    """``members`` independent pipelines stacked: stage tensors (S, A, ...), embedding tensors (A, ...)."""

    def __init__(self, c: ModelConfig, seeds: Sequence[int]) -> None:
        self.c = c
        self.A = len(seeds)
        stages: dict[str, list[torch.Tensor]] = {k: [] for k in block_shapes(c)}
        emb: dict[str, list[torch.Tensor]] = {k: [] for k in emb_shapes(c)}
        per_member = []
        for seed in seeds:                      # the same seed gives the same initial model in every arm
            gen = torch.Generator().manual_seed(seed)
            e = init_emb(c, gen)
            per_member.append((e, [init_stage(c, gen) for _ in range(c.stages)]))
        for k in stages:
            self_k = torch.stack([torch.stack([st[s][k] for _, st in per_member]) for s in range(c.stages)])
            stages[k] = [self_k]
        for k in emb:
            emb[k] = [torch.stack([e[k] for e, _ in per_member])]
        self.P = {k: v[0].requires_grad_(True) for k, v in stages.items()}     # (S, A, ...)
        self.E = {k: v[0].requires_grad_(True) for k, v in emb.items()}        # (A, ...)
        self.opt_p = Adam(self.P, (c.stages, self.A))
        self.opt_e = Adam(self.E, (self.A,))
        self.base_lr = torch.zeros(self.A)        # (A,) the embedding part's rate, set by the driver each step

    # ------------------------------------------------------------------------------------- forward
    def _stage_params(self, k: int, order: Optional[torch.Tensor], members: Optional[torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """Parameters at pipeline position ``k``: stage ``order[k, a]`` of member ``a`` (A', ...)."""
        if order is None:
            return {n: (p[k] if members is None else p[k, members]) for n, p in self.P.items()}
        mem = torch.arange(self.A) if members is None else members
        idx = order[k] if members is None else order[k, members]
        return {n: p[idx, mem] for n, p in self.P.items()}

    def forward(self, x: torch.Tensor, order: Optional[torch.Tensor] = None,
                members: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (A', B, T) int64 -> logits (A', B*T, V). ``order`` (S, A) long: the stage each member runs at each
        position (None: in order); ``members``: a subset of member indices (None: all)."""
        c = self.c
        E = {n: (e if members is None else e[members]) for n, e in self.E.items()}
        A, B, T = x.shape
        V, C, h = c.vocab, c.width, c.heads
        flat = (x + torch.arange(A)[:, None, None] * V).reshape(-1)
        hid = E["tok"].reshape(A * V, C)[flat].view(A, B, T, C) + E["pos"][:, None, :T]
        hid = hid.reshape(A, B * T, C)
        for k in range(c.stages):
            P = self._stage_params(k, order, members)
            for b in range(c.blocks_per_stage):
                q, kk, v = torch.bmm(rms(hid, P[f"{b}.attn_norm"]), P[f"{b}.wqkv"]).split(C, dim=-1)  # type: ignore[no-untyped-call]
                q, kk, v = (t.reshape(A * B, T, h, C // h).transpose(1, 2) for t in (q, kk, v))  # (AB, h, T, d)
                y = F.scaled_dot_product_attention(q, kk, v, is_causal=True)
                hid = hid + torch.bmm(y.transpose(1, 2).reshape(A, B * T, C), P[f"{b}.wo"])
                gate, up = torch.bmm(rms(hid, P[f"{b}.mlp_norm"]), P[f"{b}.w13"]).chunk(2, dim=-1)
                hid = hid + torch.bmm(F.silu(gate) * up, P[f"{b}.w2"])
        return torch.bmm(rms(hid, E["norm"]), E["head"])

    def losses(self, x: torch.Tensor, y: torch.Tensor, order: Optional[torch.Tensor] = None,
               members: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy (nats per byte) per member: (A',)."""
        logits = self.forward(x, order, members)
        A = logits.shape[0]
        ce = F.cross_entropy(logits.reshape(-1, self.c.vocab), y.reshape(-1), reduction="none")
        return ce.view(A, -1).mean(1)

    @torch.no_grad()
    def eval_losses(self, x: torch.Tensor, y: torch.Tensor, members: Optional[torch.Tensor] = None,
                    chunk: int = 8) -> np.ndarray:
        """x, y (N, T): the same windows for every member; returns (A',) mean losses."""
        A = self.A if members is None else len(members)
        tot = torch.zeros(A)
        for i in range(0, x.shape[0], chunk):
            xs, ys = x[i:i + chunk], y[i:i + chunk]
            tot += self.losses(xs.expand(A, -1, -1), ys.expand(A, -1, -1), None, members) * xs.shape[0]
        return (tot / x.shape[0]).numpy().astype(np.float64)

    # --------------------------------------------------------------------------------- optimizer
    @torch.no_grad()
    def clip_and_step(self, lr: torch.Tensor, max_norm: float = 1.0) -> np.ndarray:
        """Clip each (stage, member) and each member's embedding part to ``max_norm``; Adam with ``lr`` (S, A)
        for the stages and ``lr[0]``-shaped (A,) base rates for the embedding. Returns raw norms (S, A)."""
        S = self.c.stages
        sq = sum(p.grad.pow(2).reshape(S, self.A, -1).sum(-1) for p in self.P.values()
                 if p.grad is not None)
        raw = torch.as_tensor(sq).sqrt()
        coef = (max_norm / (raw + 1e-6)).clamp(max=1.0)
        for p in self.P.values():
            assert p.grad is not None
            p.grad.mul_(coef.view(S, self.A, *([1] * (p.dim() - 2))))
        sqe = sum(e.grad.pow(2).reshape(self.A, -1).sum(-1) for e in self.E.values())  # type: ignore
        rawe = torch.as_tensor(sqe).sqrt()
        coefe = (max_norm / (rawe + 1e-6)).clamp(max=1.0)
        for e in self.E.values():
            assert e.grad is not None
            e.grad.mul_(coefe.view(self.A, *([1] * (e.dim() - 1))))
        self.opt_p.step(lr)
        self.opt_e.step(self.base_lr)
        return raw.numpy().astype(np.float64)

    # ---------------------------------------------------------------------- stage weights as arrays
    def stage_arrays(self, s: int, a: int) -> dict[str, np.ndarray]:
        return {k: p[s, a].detach().numpy().copy() for k, p in self.P.items()}

    @torch.no_grad()
    def replace_stage(self, s: int, a: int, weights: dict[str, np.ndarray]) -> None:
        """Load rebuilt weights into member ``a``'s stage ``s`` and give it a fresh Adam state."""
        for k, p in self.P.items():
            p[s, a] = torch.from_numpy(np.ascontiguousarray(weights[k], dtype=np.float32))
        self.opt_p.reset((s, a))
