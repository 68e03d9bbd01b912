"""Which parameters of a model are experts, and their place in one flat float32 buffer. No I/O.

``expert_map(model)`` finds the common ``...<layer path>.experts.<e>.<...>`` naming; ``ExpertLayout`` orders
the shared parameters first, then every expert's parameters by (layer, expert), and freezes the experts a
peer does not own. Used by ``peer.train.experts.ExpertSync`` and by the experiment's simulated workers.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch

from collectives.errors import LocalError
from peer.train.experts_own import Expert
from peer.train.outer import flatten_params, load_params

_EXPERT_RE = re.compile(r"^(?P<layer>.*?)(?:^|\.)experts\.(?P<expert>\d+)\.")


def expert_map(model: torch.nn.Module, marker: str = "experts") -> dict[str, Expert]:
    """Parameter name -> (layer, expert) for the common ``...<layer path>.experts.<e>.<...>`` naming: each
    distinct path before ``.experts.`` is one MoE layer, numbered in the model's parameter order."""
    pat = _EXPERT_RE if marker == "experts" else re.compile(
        rf"^(?P<layer>.*?)(?:^|\.){re.escape(marker)}\.(?P<expert>\d+)\.")
    layers: dict[str, int] = {}
    out: dict[str, Expert] = {}
    for name, _ in model.named_parameters():
        m = pat.match(name)
        if m:
            out[name] = (layers.setdefault(m.group("layer"), len(layers)), int(m.group("expert")))
    return out


class ExpertLayout:
    """A model's parameters split into shared ones and experts, and their place in one flat float32 buffer:
    the shared parameters first (model order), then each expert's parameters by (layer, expert)."""

    def __init__(self, model: torch.nn.Module, experts: Mapping[str, Expert]) -> None:
        emap = dict(experts)
        named = list(model.named_parameters())
        unknown = set(emap) - {n for n, _ in named}
        if unknown:
            raise LocalError(f"experts names not in the model: {sorted(unknown)[:3]}")
        if not emap:
            raise LocalError("no expert parameters (pass experts= or name them '...experts.<e>....')")
        self.layers = 1 + max(l for l, _ in emap.values())
        self.n_experts = 1 + max(e for _, e in emap.values())
        grid = {(l, e) for l in range(self.layers) for e in range(self.n_experts)}
        if set(emap.values()) != grid:
            raise LocalError("every layer must have experts 0..E-1 (missing: "
                             f"{sorted(grid - set(emap.values()))[:3]})")
        self.shared_params = [p for n, p in named if n not in emap]
        self.expert_params: dict[Expert, list[torch.nn.Parameter]] = {x: [] for x in sorted(grid)}
        for n, p in named:
            if n in emap:
                self.expert_params[emap[n]].append(p)
        self.order = self.shared_params + [p for x in sorted(grid) for p in self.expert_params[x]]
        self.n_shared = sum(p.numel() for p in self.shared_params)
        self.bounds: dict[Expert, tuple[int, int]] = {}
        off = self.n_shared
        for x in sorted(grid):
            size = sum(p.numel() for p in self.expert_params[x])
            self.bounds[x] = (off, off + size)
            off += size
        self.size = off

    def flatten(self) -> np.ndarray:
        return flatten_params(self.order)

    def load(self, flat: np.ndarray) -> None:
        load_params(self.order, flat)

    def freeze(self, owned: set[Expert]) -> list[torch.nn.Parameter]:
        """Experts outside ``owned`` stop taking gradients; returns the parameters that train."""
        for x, ps in self.expert_params.items():
            for p in ps:
                p.requires_grad_(x in owned)
                p.grad = None
        return self.shared_params + [p for x in sorted(owned) for p in self.expert_params[x]]
