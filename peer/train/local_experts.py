"""Sparse expert sync for a peer that is a whole machine: K local processes, one swarm member (local rank 0).

The machine is one member of the swarm, so every local rank owns the same experts (rank 0's ``ExpertSync``
learns the ownership, the other ranks receive it) and trains the same parameters::

    group = LocalGroup.from_env(timeout=1800)             # RANK / WORLD_SIZE / MASTER_* from torchrun
    model = MoELM(cfg).to(group.device)                    # no DDP wrapper: step() averages the gradients
    swarm = Swarm.join([...]) if group.is_leader else None
    with close_on_error(group, swarm):
        opt = LocalExpertSync(model, make_optimizer, group, swarm, sync_steps=50, owners_per_expert=2)
        while opt.revision < target:                       # the same on every rank
            model.loss(x, y).backward(); opt.step(samples=len(x)); opt.zero_grad()
        opt.finish()

Gradients: ``step`` all-reduces (mean) the gradients of the trainable parameters (the shared ones and the
owned experts) over the machine's ranks, then takes the inner step. Not DDP: DDP fixes its parameter set at
construction, while here the trainable set changes with ownership (a frozen expert is a parameter DDP would
wait for; ``find_unused_parameters`` and a new DDP per ownership change would be the alternative). The price:
the all-reduce runs after backward, without DDP's overlap of communication with the backward pass.

Every step on every rank: mean of the gradients, then the inner step. At every sync point (every
``sync_steps`` steps, the same step on every rank), after that::

    all ranks    all-reduce (sum) the samples since the last sync point -> the machine's samples
    rank 0       ExpertSync's sync with the swarm, with the machine's samples (``peer.train.experts``)
    all ranks    broadcast from rank 0: status, revision, the experts it owns; the model's parameters (the
                 shared ones and every expert), the outer weights and the outer momentum
    other ranks  freeze / unfreeze to the experts rank 0 owns; a changed set rebuilds the inner optimizer as
                 ExpertSync does (kept parameters keep their state, newly owned experts start fresh)

so after every sync point each local rank holds rank 0's parameters, outer state and ownership bit for bit
(a broadcast copies bytes). Between sync points the ranks stay equal: the same averaged gradients, the same
optimizer, the same steps. Samples of other steps count 0 at rank 0's ExpertSync and the machine's sum at
the sync point, so the sample-weighted averages see the whole machine.

Failure, as ``LocalDiLoCo``: a rank that dies breaks the next collective of the others (the gradient
all-reduce of the next step, or the broadcast); ``close_on_error`` makes rank 0 leave the swarm (one peer
leaves). If rank 0's sync raises, it broadcasts a failure status first, so the other ranks stop at once with
``LocalGroupFailed``. The group's timeout must exceed the slowest sync (``op_timeout``, ``join_timeout``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from collectives.errors import LocalError
from peer.swarm import Swarm
from peer.train.experts import ExpertLayout, ExpertSync, SyncRecord, expert_map
from peer.train.experts_own import Expert
from peer.train.local_group import OK, LocalGroup, LocalGroupFailed, LocalOuterSync, SyncClock, lead_then_share

log = logging.getLogger(__name__)

MakeOptimizer = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


class LocalExpertSync(LocalOuterSync):
    """ExpertSync for a machine of ``group.size`` local ranks: call it the same way on every rank (``swarm``
    and ``sync_kw`` matter on rank 0 only; the other ranks pass ``swarm=None``). ``sync_kw``: ExpertSync's
    keyword arguments (``owners_per_expert``, ``outer_lr``, ``op_timeout``, ``on_sync``, ``resume``, ...);
    ``sync_factory`` builds rank 0's ExpertSync (or a subclass) with them."""

    what = "ExpertSync"

    def __init__(self, model: torch.nn.Module, make_optimizer: MakeOptimizer, group: LocalGroup,
                 swarm: Optional[Swarm], *, experts: Optional[Mapping[str, Expert]] = None,
                 sync_steps: int = 50, sync_factory: Callable[..., ExpertSync] = ExpertSync,
                 **sync_kw: Any) -> None:
        if group.is_leader != (swarm is not None):
            raise LocalError("local rank 0 (and only rank 0) passes the swarm")
        if sync_steps < 1:
            raise LocalError("sync_steps must be at least 1")
        emap = dict(expert_map(model) if experts is None else experts)
        self.layout = ExpertLayout(model, emap)          # the same checks and order as ExpertSync's
        self.model, self.make_optimizer, self.group = model, make_optimizer, group
        self.n, self.n_shared = self.layout.size, self.layout.n_shared
        self.grid = sorted(self.layout.expert_params)    # every (layer, expert), in order
        self.sync: Optional[ExpertSync] = None
        self.clock = SyncClock(group, sync_steps)
        self.machine_samples = self.clock.machine_samples   # the machine's samples at each sync point
        self.theta = np.zeros(self.n, np.float32)        # (N,) outer weights, as on rank 0
        self.mom = np.zeros(self.n_shared, np.float32)   # (S,) outer momentum of the shared part, as on rank 0
        self.revision = 0
        self.owned: set[Expert] = set()
        self._inner: Optional[torch.optim.Optimizer] = None   # the other ranks' inner optimizer
        def enter() -> None:
            self.sync = sync_factory(model, make_optimizer, swarm, experts=emap, sync_steps=sync_steps, **sync_kw)

        if swarm is None:
            self._adopt(set())                           # as ExpertSync before its first sync
        # every rank starts from the swarm's state and rank 0's ownership
        lead_then_share(enter if swarm is not None else None, self._share)

    # ------------------------------------------------------------------ the optimizer interface
    @property
    def lead(self) -> Optional[ExpertSync]:
        return self.sync

    @property
    def inner(self) -> torch.optim.Optimizer:
        opt = self.sync.inner if self.sync is not None else self._inner
        assert opt is not None
        return opt

    @property
    def history(self) -> list[SyncRecord]:
        """Rank 0's sync records (empty on the other ranks)."""
        return self.sync.history if self.sync is not None else []

    def trainable(self) -> list[torch.nn.Parameter]:
        """The shared parameters and the owned experts' (ExpertSync's order), the same on every rank."""
        return self.layout.shared_params + [p for x in sorted(self.owned) for p in self.layout.expert_params[x]]

    def step(self, samples: float = 1.0) -> None:
        """Every rank: the mean of the gradients over the machine, one inner step; at a sync point rank 0's
        sync with the machine's samples, then its results on every rank."""
        self.group.mean_grads_(self.trainable())
        self._inner_step(samples)

    # ------------------------------------------------------------------ rank 0 -> every rank
    def _share(self, status: int) -> None:
        """Rank 0's status, revision, ownership, parameters, outer weights and momentum to every rank."""
        E = self.layout.n_experts
        head = np.zeros(2 + len(self.grid), np.int64)    # (2 + L*E,) status, revision, owned bitmap
        head[0] = status
        if self.sync is not None:
            head[1] = self.sync.revision
            for lay, e in self.sync.owned:
                head[2 + lay * E + e] = 1
        self.group.broadcast_(head)
        if int(head[0]) != OK:
            if self.sync is None:
                raise LocalGroupFailed(f"local rank 0 failed; local rank {self.group.rank} stops")
            return
        n, s = self.n, self.n_shared
        flat = np.empty(2 * n + s, np.float32)           # (2N + S,) parameters | outer weights | momentum
        if self.sync is not None:
            flat[:n] = self.layout.flatten()
            flat[n:2 * n] = self.sync.theta
            flat[2 * n:] = self.sync.mom
        self.group.broadcast_(flat)
        self.theta[...] = flat[n:2 * n]
        self.mom[...] = flat[2 * n:]
        self.revision = int(head[1])
        if self.sync is not None:
            self.owned = set(self.sync.owned)
        else:
            self.layout.load(flat[:n])
            self._adopt({(lay, e) for lay, e in self.grid if head[2 + lay * E + e]})

    def _adopt(self, new: set[Expert]) -> None:
        """The other ranks: take rank 0's owned set the way ``ExpertSync._own`` does (freeze the rest; a
        changed set rebuilds the inner optimizer, carrying the hyperparameters and the kept parameters' state),
        so their inner optimizer stays identical to rank 0's."""
        if new == self.owned and self._inner is not None:
            return
        kept = set(self.layout.shared_params) | {p for x in new & self.owned for p in self.layout.expert_params[x]}
        old = self._inner
        self.owned = new
        self._inner = self.make_optimizer(self.layout.freeze(new))
        if old is not None:
            if len(old.param_groups) == len(self._inner.param_groups):
                for g_old, g_new in zip(old.param_groups, self._inner.param_groups):
                    g_new.update({k: v for k, v in g_old.items() if k != "params"})
            for p in self.trainable():
                if p in kept and p in old.state:
                    self._inner.state[p] = old.state[p]
        log.info("local rank %d: owns %d experts, as rank 0", self.group.rank, len(new))
