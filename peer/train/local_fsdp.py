"""DiLoCo for a machine whose local ranks train with FSDP (``torch.distributed.fsdp.fully_shard``): each rank
holds a shard of every parameter and of the inner optimizer's state; only local rank 0 is a swarm member::

    group = LocalGroup.from_env(timeout=1800)
    model = build().to(group.device)
    for block in model.blocks: fully_shard(block)          # FSDP2, as usual
    fully_shard(model)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)  # over the sharded parameters (DTensors)
    swarm = Swarm.join([...]) if group.is_leader else None
    with close_on_error(group, swarm):
        opt = LocalFSDPDiLoCo(model, inner, group, swarm, inner_steps=50)
        while opt.revision < target:
            model(x).loss.backward(); opt.step(samples=len(x)); opt.zero_grad()
        opt.finish()

Between sync points nothing changes from plain FSDP: every rank steps its inner optimizer on its shards
(gradients already averaged over the machine by FSDP's reduce-scatter). At a sync point, the same step on
every rank (``peer.train.local_group.LocalOuterSync``)::

    all ranks    gather every parameter in full (``DTensor.full_tensor``) into a host mirror
    all ranks    all-reduce (sum) the samples since the last sync point -> the machine's samples
    rank 0       DiLoCo's outer sync over the mirror (pseudo-gradient = outer weights - full parameters)
    all ranks    broadcast from rank 0: status, revision, the mirror, outer weights, momentum
                 (``LocalDiLoCo``'s protocol), then each rank writes its shard of the new parameters

so after every sync point each rank's shards are exactly rank 0's outer result, and the outer state is the
same bit for bit on every rank. Rank 0's DiLoCo runs over the mirror with an inner optimizer that does
nothing (the real inner steps are the sharded ones). Memory: the mirror holds the full parameters in host
memory on every rank (4 bytes per float32 parameter), and a sync point moves 3x that through the broadcast,
as ``LocalDiLoCo`` does; device memory stays FSDP's. Failures behave as ``LocalDiLoCo``'s.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from collectives.errors import LocalError
from peer.swarm import Swarm
from peer.train.local_group import OK, LocalDiLoCo, LocalGroup


class _NoStep(torch.optim.Optimizer):
    """Rank 0's DiLoCo's inner optimizer over the mirror: the inner steps are the sharded optimizer's."""

    def __init__(self, params: Iterable[torch.nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None


class _Mirror(torch.nn.Module):
    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.params = torch.nn.ParameterList(params)


class LocalFSDPDiLoCo(LocalDiLoCo):
    """``LocalDiLoCo`` for a model sharded with FSDP2 (``fully_shard``); the same call on every rank, with
    the inner optimizer over the sharded parameters and DiLoCo's keyword arguments (rank 0's)."""

    what = "DiLoCo (FSDP)"

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, group: LocalGroup,
                 swarm: Optional[Swarm], **kw: Any) -> None:
        self.sharded = list(model.parameters())
        if not self.sharded or not all(isinstance(p, DTensor) for p in self.sharded):
            raise LocalError("LocalFSDPDiLoCo needs a model sharded with fully_shard (every parameter a "
                             "DTensor); for a replicated (DDP) model use LocalDiLoCo")
        self._sharded_inner = inner_optimizer
        mirror = [torch.nn.Parameter(torch.zeros(tuple(p.shape), dtype=p.dtype), requires_grad=False)
                  for p in self.sharded]
        self.mirror = _Mirror(mirror)
        self._gather()          # rank 0's DiLoCo starts from the full parameters
        super().__init__(self.mirror, _NoStep(self.mirror.parameters()), group, swarm, **kw)

    @property
    def inner(self) -> torch.optim.Optimizer:
        return self._sharded_inner

    def step(self, samples: float = 1.0) -> None:
        """Every rank: the sharded inner step; at a sync point the gather, rank 0's outer sync, the shards."""
        self._sharded_inner.step()
        self._inner_step(samples)

    def finish(self) -> None:
        self._gather()
        super().finish()

    # ------------------------------------------------------------------ shards <-> the mirror
    def _local_step(self) -> None:
        pass   # the sharded inner step already ran in ``step``

    def _before_sync(self) -> None:
        self._gather()

    def _gather(self) -> None:
        """Every rank (a collective per parameter): the full parameters into the host mirror."""
        with torch.no_grad():
            for p, m in zip(self.sharded, self.mirror.parameters()):
                assert isinstance(p, DTensor)
                m.copy_(p.full_tensor().cpu())

    def _scatter(self) -> None:
        """Every rank: its shard of the mirror into its sharded parameters (no communication)."""
        with torch.no_grad():
            for p, m in zip(self.sharded, self.mirror.parameters()):
                assert isinstance(p, DTensor)
                local = p.to_local()
                mine = distribute_tensor(m.detach().to(local.device), p.device_mesh, p.placements,
                                         src_data_rank=None).to_local()
                local.copy_(mine)

    def _share(self, status: int) -> None:
        super()._share(status)     # the other ranks raise LocalGroupFailed on rank 0's failure status
        if status == OK:
            self._scatter()
