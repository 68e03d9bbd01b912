"""Stage recovery for the pipeline runtime: a stage's shared state, and the order in which a stage that a
member must take over gets its weights.

A stage's state is its parameters, its optimizer state (materialised up front, so every replica holds the
same named tensors) and a small ``meta`` array (learning-rate scale); it is a ``SharedState`` whose revision
is the number of committed pipeline steps. Recovery order (``restore``'s callers follow it):

1. ``copy_from_replicas``: the stage's up-to-date replicas and the members that need its state run the
   shared-state sync over their sub-group: hash-verified, fetched from every source in parallel; the
   weights *and* the optimizer state arrive exactly.
2. ``rebuild_from_neighbours``: no replica survives. The neighbouring stages' weights (and their last
   gradient norms, and any ``extra`` tensors they serve, e.g. CheckFree+ (de)embedding copies) are copied,
   hash-verified, into the rebuilding member's own copies of those stages; a ``StageRebuild`` rule computes
   the lost stage's weights; its optimizer state starts fresh.
3. Neither: ``StageLost`` names the stage.

This module does not import ``peer``: ``comm`` is any communicator with the ``shared_state.Comm`` methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from collectives.errors import LocalError
from recovery.rebuild import NeighbourState, RebuildRefused, RebuildResult, StageLost, StageRebuild
from recovery.shared_state import Comm, SharedState, SyncResult, sync

log = logging.getLogger(__name__)

NORM_WORDS = 3  # pre-clip norm, post-clip norm, rebuilt flag (NaN: unknown)


def zero_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """A fresh state in place: every state tensor zeroed (Adam's lazy initial state is all zeros)."""
    for st in opt.state.values():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                v.zero_()
            else:
                raise LocalError(f"optimizer state {key!r} is not a tensor ({type(v).__name__}); "
                                 "the pipeline needs tensor-only optimizer state")


def materialize_optimizer(params: Sequence[torch.nn.Parameter], opt: torch.optim.Optimizer) -> None:
    """Create the optimizer's lazy state now (one step on zero gradients, then the parameters are put back
    and the state zeroed), so that replicas hold the same named state tensors before their first step.
    Exact for optimizers whose lazy initial state is zeros (SGD without dampening, Adam, AdamW, ...)."""
    if params and all(opt.state.get(p) for p in params):
        return
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    with torch.no_grad():
        for p, s, g in zip(params, saved, grads):
            p.copy_(s)
            p.grad = g
    zero_optimizer_state(opt)


def stage_state(module: torch.nn.Module, opt: Optional[torch.optim.Optimizer], meta: np.ndarray,
                revision: int = 0) -> SharedState:
    """The named tensors of one stage: ``p/<param>``, ``o/<index>/<key>`` (optimizer state), ``meta``."""
    named: dict[str, Any] = {f"p/{n}": p.data for n, p in module.named_parameters()}
    if opt is not None:
        for i, p in enumerate(module.parameters()):
            for key, v in sorted(opt.state.get(p, {}).items()):
                if isinstance(v, torch.Tensor):
                    named[f"o/{i}/{key}"] = v
    named["meta"] = meta
    return SharedState(named, revision)


def weights_state(module: torch.nn.Module, norms: np.ndarray,
                  extra: Optional[Mapping[str, Any]] = None) -> SharedState:
    """A stage's weights and its last gradient norms (what a rebuild needs from a neighbour), plus ``extra``
    named tensors it serves with them (``x/<name>``: e.g. the CheckFree+ copy of a (de)embedding it holds)."""
    named: dict[str, Any] = {f"p/{n}": p.data for n, p in module.named_parameters()}
    named["norms"] = norms
    for n, t in (extra or {}).items():
        named[f"x/{n}"] = t
    return SharedState(named, 0)


def copy_from_replicas(comm: Comm, state: SharedState, source: bool, committed: int,
                       timeout: float) -> SyncResult:
    """(1) The sub-group sync: sources vote with their committed revision; the others take its bytes."""
    if source:
        state.revision = state.last_synced = committed
    else:
        state.revision, state.last_synced = -1, -1
    res = sync(comm, state, "enforce_popular" if source else "receive_only", timeout=timeout)
    state.revision = state.last_synced = committed
    return res


def agree_initial(comm: Comm, state: SharedState, timeout: float) -> SyncResult:
    """Before the first step: the stage's members take one copy (the most common, ties to the first in
    ring order), so that replicas start bit-identical whatever each built."""
    state.revision, state.last_synced = 0, -1
    return sync(comm, state, "enforce_popular", timeout=timeout)


@dataclass
class NeighbourCopy:
    """One neighbour's transfer group: its up-to-date replicas (sources) and the rebuilding members."""
    stage: int
    sources: list[str]
    receivers: list[str]


def fetch_neighbour(comm: Comm, copy: NeighbourCopy, module: torch.nn.Module, norms: np.ndarray,
                    timeout: float, extra: Optional[Mapping[str, Any]] = None) -> SyncResult:
    """Copy a neighbour stage's weights and norms (and ``extra``: the same names on every member; sources
    serve theirs, receivers give buffers), hash-verified, into ``module``/``norms``/``extra`` on the
    receivers; run by the sources and the receivers of ``copy``."""
    st = weights_state(module, norms, extra)
    source = comm.me in copy.sources
    st.revision, st.last_synced = (1, 1) if source else (-1, -1)
    return sync(comm.group(copy.sources + copy.receivers), st,
                "enforce_popular" if source else "receive_only", timeout=timeout)


def neighbour_state(stage: int, module: torch.nn.Module, norms: np.ndarray, swap_partner: bool = False,
                    extra: Optional[Mapping[str, Any]] = None) -> NeighbourState:
    """What the rule gets from a fetched neighbour (arrays copied). ``extra``: named tensors it served with
    its weights (e.g. a (de)embedding copy), which the rule takes for parameters no neighbour holds as blocks."""
    pre, post, rebuilt = (float(v) for v in norms[:NORM_WORDS])
    return NeighbourState(stage=stage,
                          weights={n: p.detach().cpu().numpy().copy() for n, p in module.named_parameters()},
                          grad_norm=None if np.isnan(pre) else pre,
                          grad_norm_clipped=None if np.isnan(post) else post,
                          rebuilt=bool(rebuilt), swap_partner=swap_partner,
                          extra={n: np.array(torch.as_tensor(t).detach().cpu().numpy(), copy=True)
                                 for n, t in (extra or {}).items()})


def rebuild_from_neighbours(rule: Optional[StageRebuild], stage: int, num_stages: int,
                            module: torch.nn.Module, neighbours: dict[int, NeighbourState]) -> RebuildResult:
    """(2) Rebuild ``stage`` into ``module`` from the fetched neighbours, or (3) raise ``StageLost``."""
    if rule is None:
        raise StageLost(stage, "no surviving replica and no rebuild rule configured")
    if not neighbours:
        raise StageLost(stage, "no surviving replica and no neighbouring stage to rebuild from")
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}
    try:
        result = rule.rebuild(stage, num_stages, shapes, neighbours)
    except RebuildRefused as exc:
        raise StageLost(stage, f"no surviving replica, and the rebuild was refused: {exc}") from exc
    load_weights(module, result.weights)
    return result


def load_weights(module: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy named arrays into the module's parameters; names, shapes and dtypes must match exactly."""
    params = dict(module.named_parameters())
    if set(weights) != set(params):
        raise LocalError(f"rebuilt weights name {sorted(set(weights) ^ set(params))[:4]}... unlike the stage")
    with torch.no_grad():
        for n, p in params.items():
            w = np.asarray(weights[n])
            if tuple(w.shape) != tuple(p.shape) or w.dtype != torch.empty(0, dtype=p.dtype).numpy().dtype:
                raise LocalError(f"rebuilt {n!r} is {w.shape} {w.dtype}, the stage's is {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(w)))


__all__ = ["NeighbourCopy", "StageLost", "agree_initial", "copy_from_replicas", "fetch_neighbour",
           "load_weights", "materialize_optimizer", "neighbour_state", "rebuild_from_neighbours",
           "stage_state", "weights_state", "zero_optimizer_state"]
