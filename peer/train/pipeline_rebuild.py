"""Steps (2)/(3) of the pipeline's stage recovery order for a stage with no surviving replica: fetch the
neighbouring stages (and the (de)embedding copies their replicas hold, ``peer.train.pipeline_copies``) from
their replicas, hash-verified, into the rebuilding member's own copies; the rule rebuilds the stage; fresh
optimizer state, learning rate times the rule's ``lr_scale``. Without a rule: ``StageLost``.

Every member runs the same sequence of sub-group fetches (each the ones it belongs to). The rebuilding member
keeps what it used (``Pipeline.rebuilds``: the neighbours' arrays and norms, the copies' revisions) and the
SHA-256 of the weights it loaded, so that a test can recompute the pure rule from them and check both.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Optional, Protocol

import numpy as np
import torch

from peer.train.pipeline_copies import LAYER, Edges
from peer.train.pipeline_plan import StepPlan
from recovery import stage as rs
from recovery.rebuild import NeighbourState, StageLost, StageRebuild

log = logging.getLogger(__name__)


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 over named arrays (sorted by name; dtype, shape and bytes)."""
    h = hashlib.sha256()
    for n in sorted(weights):
        a = np.ascontiguousarray(weights[n])
        h.update(f"{n}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class Host(Protocol):
    """What a rebuild needs from the pipeline (``peer.train.pipeline.Pipeline``)."""
    swarm: Any
    S: int
    stages: list[torch.nn.Module]
    rule: Optional[StageRebuild]
    edges: Edges
    norms: np.ndarray
    meta: np.ndarray
    committed: int
    op_timeout: float
    rebuilt_digest: str
    rebuilds: list[dict[str, Any]]

    def _take_stage(self, s: int) -> None: ...
    def _swap_partner(self, s: int) -> int: ...


def rebuild_stage(pipe: Host, comm: Any, plan: StepPlan, s: int) -> tuple[str, dict[str, Any]]:
    """Rebuild lost stage ``s`` on its assigned members; returns (how, details for the recovery note)."""
    me = pipe.swarm.id
    if pipe.rule is None:
        raise StageLost(s, "no surviving replica and no rebuild rule configured")
    t0 = time.monotonic()
    receivers = plan.replicas[s]
    partner = pipe._swap_partner(s)
    wanted = sorted({j for j in (s - 1, s + 1, partner) if 0 <= j < pipe.S and j != s and j not in plan.lost})
    scratch: dict[int, np.ndarray] = {}
    extras: dict[int, tuple[dict[str, Any], np.ndarray]] = {}
    received = 0
    for j in wanted:
        cp = rs.NeighbourCopy(j, plan.sources[j], receivers)
        source = me in cp.sources
        if source or me in cp.receivers:
            norms = pipe.norms if source else scratch.setdefault(j, np.full(rs.NORM_WORDS, np.nan))
            arrays, revs = pipe.edges.extra_for(j, source)
            extras[j] = (arrays, revs)
            served = {**arrays, "rev": revs} if arrays else None
            res = rs.fetch_neighbour(comm, cp, pipe.stages[j], norms, pipe.op_timeout, extra=served)
            received += res.bytes_received
    if me not in receivers:
        return "rebuild (elsewhere)", {}
    neighbours = {j: rs.neighbour_state(j, pipe.stages[j], scratch.get(j, pipe.norms), j == partner,
                                        extra=extras[j][0]) for j in wanted}
    res_rule = rs.rebuild_from_neighbours(pipe.rule, s, pipe.S, pipe.stages[s], neighbours)
    pipe._take_stage(s)   # a fresh optimizer state
    pipe.meta[0] = res_rule.lr_scale
    pipe.norms[:] = (np.nan, np.nan, 1.0)
    pipe.committed = plan.committed
    loaded = {n: p.detach().cpu().numpy() for n, p in pipe.stages[s].named_parameters()}
    pipe.rebuilt_digest = weights_digest(loaded)
    copy_revs = {LAYER[e.attr]: int(extras[j][1][i]) for j in wanted
            for i, e in enumerate(pipe.edges.held_by(j)) if np.isfinite(extras[j][1][i])}
    how = f"rebuild:{res_rule.how}" + (" (degraded)" if res_rule.degraded else "")
    info = {"rule": res_rule.how, "degraded": res_rule.degraded, "note": res_rule.note, "from": wanted,
            "rebuilt_digest": pipe.rebuilt_digest, "copy_revs": copy_revs, "bytes": received,
            "seconds": time.monotonic() - t0,
            "inputs": {str(j): summary(st) for j, st in neighbours.items()}}
    pipe.rebuilds.append({"stage": s, "step": plan.committed, "how": how, "rebuilt_digest": pipe.rebuilt_digest,
                          "copy_revs": copy_revs, "neighbours": neighbours})
    log.warning("%s: rebuilt stage %d from stages %s (%s%s)%s", me, s, wanted, res_rule.how,
                ", degraded" if res_rule.degraded else "", f", copies at steps {copy_revs}" if copy_revs else "")
    return how, info


def summary(st: NeighbourState) -> dict[str, Any]:
    """A neighbour input as digests and norms (plain JSON)."""
    return {"weights": weights_digest(st.weights), "extra": weights_digest(st.extra) if st.extra else "",
            "norms": [st.grad_norm, st.grad_norm_clipped], "rebuilt": st.rebuilt}


__all__ = ["rebuild_stage", "summary", "weights_digest"]
