"""A peer that is a whole machine: K local processes in one torch.distributed group, one swarm member.

Inside a machine the fast links and the right engine already exist (NCCL between GPUs, Gloo on CPU), so
the local ranks train with DDP and only local rank 0 joins the swarm::

    torchrun --nproc-per-node 8 examples/multi_gpu_peer.py --join coordhost:7000 ...

    group = LocalGroup.from_env(timeout=1800)            # RANK / WORLD_SIZE / MASTER_* from torchrun
    model = DDP(model.to(group.device), device_ids=...)   # inner steps: gradients averaged in the machine
    swarm = Swarm.join([...]) if group.is_leader else None
    opt = LocalDiLoCo(model.module, inner, group, swarm, inner_steps=50)   # same call on every rank
    while opt.revision < target:
        loss = ...; loss.backward(); opt.step(samples=len(x)); opt.zero_grad()
    opt.finish()

At every sync point (every ``inner_steps / fragments`` steps, the same step on every rank)::

    all ranks    all-reduce (sum) the samples since the last sync point -> the machine's samples
    rank 0       DiLoCo.step(samples=machine's)   (the swarm-wide outer sync: ``peer.train.diloco``)
    other ranks  the inner optimizer step only
    all ranks    broadcast from rank 0: status, revision, model parameters, outer weights, momentum

so every local rank holds rank 0's parameters and outer state bit for bit after each sync point (a
broadcast copies bytes). Between sync points no rank talks to the swarm; DDP keeps the parameters equal
(identical averaged gradients, identical optimizer steps). Samples of other steps count 0 at rank 0's
DiLoCo and the machine's sum at the sync point: the weighted average sees the whole machine.

Failure: the process group has a timeout (``timeout``: longer than the slowest outer sync, since other
ranks wait in the broadcast while rank 0 syncs with the swarm). A rank that dies breaks the next
collective on the others (Gloo/NCCL raise on a closed connection or at the timeout): the error reaches the
training loop on every rank, and ``close_on_error`` makes rank 0 leave the swarm, so the swarm sees one
peer leave. If rank 0's outer sync raises, it broadcasts a failure status first, so the other ranks stop
with ``LocalGroupFailed`` at once instead of waiting for the timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from collectives.errors import LocalError, SwarmError
from peer.swarm import Swarm
from peer.train.diloco import DiLoCo
from peer.train.outer import flatten_params, fragment_bounds, load_params, state_digest

log = logging.getLogger(__name__)

OK, FAILED = 0, 1   # the status word rank 0 broadcasts first after a sync point


class LocalGroupFailed(SwarmError):
    """Another local rank of this machine failed; this peer stops (the swarm sees it leave)."""


@dataclass
class LocalGroup:
    """This process's place in its machine: local rank, size, backend, device; the process group is the
    default one (``torch.distributed.init_process_group``)."""
    rank: int
    size: int
    backend: str
    device: torch.device

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout: float = 1800.0, backend: str = "") -> "LocalGroup":
        """Join the machine's process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
        MASTER_ADDR, MASTER_PORT; ``env://`` rendezvous). ``backend``: "" picks NCCL when CUDA is available,
        else Gloo. Every collective of the group fails after ``timeout`` seconds instead of hanging."""
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise LocalError(f"${var} is not set: launch with torchrun --nproc-per-node K (docs/multi-gpu.md)")
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if int(os.environ.get("LOCAL_WORLD_SIZE", size)) != size:
            raise LocalError("a peer is one machine: WORLD_SIZE must equal LOCAL_WORLD_SIZE "
                             "(run one torchrun per machine, each its own swarm member)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=timeout))
        return cls(rank, size, backend, device)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives of the machine
    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.backend == "nccl" else t

    def sum(self, value: float) -> float:
        """All-reduce (sum) one number over the machine's ranks (float64)."""
        t = self._dev(torch.tensor([value], dtype=torch.float64))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.cpu()[0])

    def mean_grads_(self, params: Sequence[torch.Tensor]) -> None:
        """In place: each parameter's gradient becomes the mean over the machine's ranks (sum, then divided
        by the size; one all-reduce per dtype). ``params``: the same list, in the same order, on every rank.
        A parameter with no gradient on some ranks counts zeros there; one with no gradient on any rank
        keeps none (the optimizer skips it, as it would in one process)."""
        if self.size == 1:
            return
        have = self._dev(torch.tensor([float(p.grad is not None) for p in params]))   # (P,) ranks with a grad
        dist.all_reduce(have, op=dist.ReduceOp.SUM)
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for p, n in zip(params, have.tolist()):
            if n > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                buckets.setdefault(p.grad.dtype, []).append(p)
        for ps in buckets.values():          # insertion order: the same on every rank
            grads = [p.grad for p in ps if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])                            # (sum of numel,)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.size
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()

    def broadcast_(self, arr: np.ndarray) -> None:
        """In place: every rank ends with rank 0's bytes of ``arr`` (a contiguous CPU numpy array)."""
        host = torch.from_numpy(arr)
        t = self._dev(host)
        dist.broadcast(t, src=0)
        if t is not host:
            host.copy_(t.cpu())


class SyncClock:
    """One local rank's steps and samples between sync points: every ``interval``-th step is a sync point,
    where the samples since the last one are summed over the machine (an all-reduce on every rank)."""

    def __init__(self, group: LocalGroup, interval: int) -> None:
        self.group, self.interval = group, interval
        self.steps, self.pending = 0, 0.0
        self.machine_samples: list[float] = []       # the machine's samples at each sync point

    def due(self) -> bool:
        """Whether the next ``tick`` is a sync point."""
        return (self.steps + 1) % self.interval == 0

    def tick(self, samples: float) -> Optional[float]:
        """One step of ``samples``: the machine's samples since the last sync point if this step is one,
        else None."""
        self.steps += 1
        self.pending += samples
        if self.steps % self.interval:
            return None
        machine = self.group.sum(self.pending)
        self.pending = 0.0
        self.machine_samples.append(machine)
        return machine


class LocalOuterSync:
    """What every local-group strategy shares (``LocalDiLoCo``, ``peer.train.local_experts.LocalExpertSync``):
    the optimizer interface and the sync-point protocol. Rank 0 holds ``lead`` (the swarm strategy: DiLoCo,
    ExpertSync); at a sync point it shares its status and results with every rank through ``_share``, and a
    failure there reaches the other ranks as ``FAILED`` (``LocalGroupFailed`` there) instead of a hang."""

    group: LocalGroup
    clock: SyncClock
    theta: np.ndarray     # (N,) outer weights, as on rank 0
    mom: np.ndarray       # outer momentum, as on rank 0
    what = "the strategy"

    @property
    def lead(self) -> Any:
        """Rank 0's swarm strategy (None on the other ranks)."""
        raise NotImplementedError

    @property
    def inner(self) -> torch.optim.Optimizer:
        raise NotImplementedError

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def digest(self) -> bytes:
        return state_digest(self.theta, self.mom)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def _share(self, status: int) -> None:
        raise NotImplementedError

    def _before_sync(self) -> None:
        """Every rank, at a sync point before rank 0's sync (``peer.train.local_fsdp``: gather the shards)."""

    def _local_step(self) -> None:
        """The other ranks' inner step (rank 0's runs inside its strategy's ``step``)."""
        self.inner.step()

    def _inner_step(self, samples: float) -> None:
        """One inner step on every rank (gradients already the machine's mean); at a sync point rank 0's
        sync with the machine's samples, then its results on every rank."""
        if self.clock.due():
            self._before_sync()
        machine = self.clock.tick(samples)
        sync_point = machine is not None
        lead = self.lead
        if lead is None:
            self._local_step()
        else:
            try:
                lead.step(samples=0.0 if machine is None else machine)
                if sync_point and lead.steps_since != 0:
                    raise LocalError(f"rank 0's {self.what} did not sync at the machine's sync point")
            except Exception:
                if sync_point:
                    self._share(FAILED)
                raise
        if sync_point:
            self._share(OK)

    def finish(self) -> None:
        """Every rank: rank 0 commits or discards the in-flight round and loads the outer weights; the
        other ranks receive them."""
        lead = self.lead
        lead_then_share(lead.finish if lead is not None else None, self._share)


class LocalDiLoCo(LocalOuterSync):
    """DiLoCo for a machine of ``group.size`` local ranks: call it the same way on every rank (``swarm`` and
    ``diloco_kw`` matter on rank 0 only; the other ranks pass ``swarm=None``). ``model`` is the module
    whose parameters the inner optimizer updates (``ddp.module`` for a DDP model). ``diloco_factory``
    builds rank 0's optimizer (``DiLoCo`` or a subclass) with DiLoCo's arguments."""

    what = "DiLoCo"

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, group: LocalGroup,
                 swarm: Optional[Swarm], *, inner_steps: int = 100, fragments: int = 1,
                 diloco_factory: Callable[..., DiLoCo] = DiLoCo, **diloco_kw: Any) -> None:
        if group.is_leader != (swarm is not None):
            raise LocalError("local rank 0 (and only rank 0) passes the swarm")
        self.model, self._inner, self.group = model, inner_optimizer, group
        self.params = list(model.parameters())
        self.n = sum(p.numel() for p in self.params)
        fragment_bounds([p.numel() for p in self.params], fragments)  # same checks as DiLoCo's
        if inner_steps < 1 or inner_steps % fragments:
            raise LocalError("inner_steps must be a positive multiple of fragments")
        self.clock = SyncClock(group, inner_steps // fragments)
        self.machine_samples = self.clock.machine_samples   # the machine's samples at each sync point
        self.opt: Optional[DiLoCo] = None
        self.theta = np.zeros(self.n, np.float32)    # (N,) outer weights, as on rank 0
        self.mom = np.zeros(self.n, np.float32)      # (N,) outer momentum, as on rank 0
        self.revision = 0
        if swarm is not None:
            try:
                self.opt = diloco_factory(model, inner_optimizer, swarm, inner_steps=inner_steps,
                                          fragments=fragments, **diloco_kw)
            except Exception:
                self._share(FAILED)
                raise
        self._share(OK)   # every rank starts from the swarm's outer weights

    @property
    def lead(self) -> Optional[DiLoCo]:
        return self.opt

    @property
    def inner(self) -> torch.optim.Optimizer:
        return self._inner

    def step(self, samples: float = 1.0) -> None:
        """One inner step on every rank (gradients already averaged by DDP); at a sync point the outer
        sync on rank 0 with the machine's samples, then its results on every rank."""
        self._inner_step(samples)

    def _share(self, status: int) -> None:
        """Rank 0's status, revision, parameters, outer weights and momentum to every rank."""
        head = np.array([status, self.opt.revision if self.opt is not None else 0], np.int64)
        self.group.broadcast_(head)
        if int(head[0]) != OK:
            if self.opt is None:
                raise LocalGroupFailed(f"local rank 0 failed; local rank {self.group.rank} stops")
            return
        flat = np.empty(3 * self.n, np.float32)        # (3N,) parameters | outer weights | momentum
        if self.opt is not None:
            flat[:self.n] = flatten_params(self.params)
            flat[self.n:2 * self.n] = self.opt.theta
            flat[2 * self.n:] = self.opt.mom
        self.group.broadcast_(flat)
        self.theta[...] = flat[self.n:2 * self.n]
        self.mom[...] = flat[2 * self.n:]
        self.revision = int(head[1])
        if self.opt is None:
            load_params(self.params, flat[:self.n])


def lead_then_share(fn: Optional[Callable[[], Any]], share: Callable[[int], None]) -> None:
    """Rank 0 runs ``fn`` (the other ranks pass None), then every rank calls ``share(OK)`` (rank 0's results
    to every rank). If ``fn`` raises, rank 0 calls ``share(FAILED)`` first, so the other ranks stop at once
    with ``LocalGroupFailed`` instead of waiting for the group's timeout; the error propagates."""
    if fn is not None:
        try:
            fn()
        except Exception:
            share(FAILED)
            raise
    share(OK)


class close_on_error:
    """``with close_on_error(group, swarm):`` around the training loop: on any error rank 0 leaves the
    swarm (one peer leaves, cleanly) and every rank tears down its process group; the error propagates."""

    def __init__(self, group: LocalGroup, swarm: Optional[Swarm]) -> None:
        self.group, self.swarm = group, swarm

    def __enter__(self) -> "close_on_error":
        return self

    def __exit__(self, kind: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc is not None:
            log.error("local rank %d failed (%s: %s); the whole peer stops", self.group.rank,
                      type(exc).__name__, exc)
        if self.swarm is not None:
            self.swarm.close()
        if exc is None:
            self.group.close()
        # after an error the process group may be broken: no collective teardown (it could block);
        # the process exits and the other ranks' next collective fails
