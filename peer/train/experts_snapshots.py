"""Expert-sync (SPES) snapshots: each peer writes, in the background at its committed syncs, the shared layers'
state and the experts it owns, under owner-independent parameter names, so that a swarm restarted after
losing every peer resumes from the union of the survivors' snapshot directories with another expert
ownership layout (another number of peers or owners per expert). ``docs/snapshots.md`` is the reference.

    snaps = Snapshotter("snaps-a", every=10, meta={"peer": swarm.id})
    opt = ExpertSync(model, make_opt, swarm, ...)                 # a fresh swarm, or
    union = open_expert_union(["snaps-a", "snaps-b"], model)      # before joining: refused here when no
                                                                  # revision holds every expert
    opt = ExpertSync(model, make_opt, swarm, ..., resume=resume_hook(union))   # every initial member
    attach_snapshots(opt, snaps)
    ... train ...; opt.finish(); snaps.close()

What a snapshot of revision ``n`` (the shared state's revision after a committed sync) holds:

    outer/<name>              kind "outer": a shared (dense) parameter, as synced
    momentum/<name>           kind "momentum": its outer momentum (zeros under plain averaging)
    expert/<name>             kind "expert": a parameter of an expert this peer owns (meta: layer, expert)
    manifest meta             {"experts": "spes", "layers": L, "experts_per_layer": E, "owners": r,
                               "step": inner steps so far, "peer": id}

``<name>`` is the parameter's name in ``model.named_parameters()``: every SPES peer holds the whole model,
so the names do not depend on who owns what. Every owner of an expert writes the same bytes (synced). The
inner optimizer state is not written: it is local to a peer, not shared state (no other peer holds it),
and the runtime already starts a newly owned expert with a fresh one.

Resuming (``resume_experts``, run by ``ExpertSync`` before its entry sync through ``resume=``; a collective
of every member): the members all-gather (revision, digest of the union's manifests); all must hold the
same union; the ownership table of the new members is computed as the runtime does
(``peer.train.experts_own.owners``); each member reads the shared layers (weights, momentum) and the
experts it now owns from the union, SHA-256 verified, and all vote; only if every member read its part,
one all-gather delivers every expert from one of its new owners to everyone (a SPES member runs every
expert in the forward pass). Each member then holds the snapshot's state at its revision; the entry sync
finds it identical everywhere and the next committed sync is revision + 1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from collectives.errors import LocalError
from peer.train.experts import ExpertSync, SyncRecord
from peer.train.experts_layout import expert_map
from peer.train.experts_own import Expert, owned_by, owners, senders
from peer.train.outer import state_digest
from peer.train.pipeline_snapshots import SnapshotUnion, find_union, gather_records, vote_loaded
from recovery.snapshot import PathLike, SnapshotConflict, SnapshotError, TensorSpec, split_flat
from recovery.snapshot_writer import Snapshotter

log = logging.getLogger(__name__)

MAGIC = 0x53575245        # "SWRE": an expert resume record
RECORD_WORDS = 4          # magic, revision, union digest, 0


# ============================================================================ names

@dataclass
class ExpertNames:
    """A model's parameter names split as ``ExpertLayout`` orders them: the shared ones, then each expert's."""
    shared: list[str]
    experts: dict[Expert, list[str]]
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, opt: ExpertSync) -> "ExpertNames":
        named = {id(p): n for n, p in opt.model.named_parameters()}
        shapes = {n: tuple(p.shape) for n, p in opt.model.named_parameters()}
        return cls([named[id(p)] for p in opt.layout.shared_params],
                   {x: [named[id(p)] for p in ps] for x, ps in opt.layout.expert_params.items()}, shapes)

    def wanted(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a resume needs: tensor name -> shape."""
        out = {}
        for n in self.shared:
            out[f"outer/{n}"] = out[f"momentum/{n}"] = self.shapes[n]
        for ns in self.experts.values():
            out.update({f"expert/{n}": self.shapes[n] for n in ns})
        return out

    def expert_of(self, tensor: str) -> Optional[Expert]:
        name = tensor.split("/", 1)[1]
        return next((x for x, ns in self.experts.items() if name in ns), None)


def expert_specs(opt: ExpertSync, names: Optional[ExpertNames] = None) -> list[TensorSpec]:
    """The shared layers' synced weights and momentum and the experts I own (views of the shared state;
    ``Snapshotter.capture`` copies them)."""
    nm = names or ExpertNames.of(opt)
    S = opt.n_shared
    specs = [TensorSpec("outer", n, a) for n, a in
             split_flat(opt.theta[:S], nm.shared, [nm.shapes[n] for n in nm.shared]).items()]
    specs += [TensorSpec("momentum", n, a) for n, a in
              split_flat(opt.mom, nm.shared, [nm.shapes[n] for n in nm.shared]).items()]
    for x in sorted(opt.owned):
        lo, hi = opt.bounds[x]
        views = split_flat(opt.theta[lo:hi], nm.experts[x], [nm.shapes[n] for n in nm.experts[x]])
        specs += [TensorSpec("expert", n, a, {"layer": x[0], "expert": x[1]}) for n, a in views.items()]
    return specs


def attach_snapshots(opt: ExpertSync, snapshots: Snapshotter) -> None:
    """After every committed sync, offer the shared state I hold to ``snapshots`` (a copy now, the write in
    its thread). Chains ``opt.on_sync`` (it runs once the sync has been applied and ownership recomputed)."""
    user, names = opt.on_sync, ExpertNames.of(opt)

    def on_sync(rec: SyncRecord) -> None:
        if rec.committed:
            snapshots.capture(opt.revision, expert_specs(opt, names),
                              meta={"experts": "spes", "layers": opt.layers, "experts_per_layer": opt.n_experts,
                                    "owners": opt.r, "step": opt.inner_step_count, "peer": opt.swarm.id})
        if user is not None:
            user(rec)

    opt.on_sync = on_sync


# ============================================================================ the union of the survivors

def open_expert_union(paths: Sequence[PathLike], names: ExpertNames) -> SnapshotUnion:
    """The newest revision at which the snapshots in ``paths`` together hold the shared layers (weights,
    momentum) and every expert of this model, with its shapes. Raises ``SnapshotNotFound`` naming the
    missing experts (layer, expert) and parameters when no revision is complete. ``names``: ``model_names``
    (before the ``ExpertSync`` exists) or ``ExpertNames.of(opt)``."""
    def explain(newest: int, missing: list[str]) -> str:
        experts = sorted({x for x in (names.expert_of(t) for t in missing) if x is not None})
        shared = [t for t in missing if names.expert_of(t) is None]
        what = []
        if experts:
            what.append(f"{len(experts)} expert(s) (layer, expert) {experts[:16]}{' ...' if len(experts) > 16 else ''}")
        if shared:
            what.append(f"{len(shared)} shared tensor(s)")
        return (f"hold no revision with every expert and shared layer of this model: the newest, revision "
                f"{newest}, lacks {' and '.join(what)} ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''})"
                "; is an owner's snapshot directory missing?")

    return find_union(paths, names.wanted(), explain)


def model_names(model: torch.nn.Module, experts: Optional[Mapping[str, Expert]] = None) -> ExpertNames:
    """``ExpertNames`` without an ``ExpertSync`` (to check a union before joining); ``experts`` as for
    ``ExpertSync`` (default ``expert_map(model)``)."""
    experts = expert_map(model) if experts is None else experts
    grid = sorted(set(experts.values()))
    named = list(model.named_parameters())
    return ExpertNames([n for n, _ in named if n not in experts],
                       {x: [n for n, _ in named if experts.get(n) == x] for x in grid},
                       {n: tuple(p.shape) for n, p in named})


# ============================================================================ resuming, live

@dataclass
class ExpertResumeReport:
    revision: int
    step: int
    members: list[str]
    owned: list[Expert]
    read: int                        # tensors this member read (and verified) from the union


def resume_experts(opt: ExpertSync, union: SnapshotUnion) -> ExpertResumeReport:
    """Collective of every member before the entry sync (see the module docstring). Raises on every member
    alike (``SnapshotConflict``: members hold other snapshots or are not resuming; ``SnapshotError``: a
    member could not read its part, which that member names as ``SnapshotCorrupt``); nothing is taken then."""
    if opt.has_state:
        raise LocalError("resume_experts starts a swarm: this peer already holds a synced state")
    sw, me, names = opt.swarm, opt.swarm.id, ExpertNames.of(opt)
    mine = np.array([MAGIC, union.revision, union.digest, 0], np.int64)
    recs, members, epoch = gather_records(sw, mine, opt.op_timeout, "sync must resume from the same snapshots")
    if len({(r[1], r[2]) for r in recs.values()}) > 1:
        raise SnapshotConflict(f"members resume from different snapshots (revision, digest): "
                               f"{ {m: tuple(r[1:3]) for m, r in recs.items()} }")
    table = owners(members, opt.layers, opt.n_experts, opt.r)
    owned = sorted(owned_by(table, me))
    S = opt.n_shared
    theta, mom = np.zeros_like(opt.theta), np.zeros_like(opt.mom)
    failure: Optional[SnapshotError] = None
    read = 0
    try:
        theta[:S] = _join(union, "outer", names.shared)
        mom[:] = _join(union, "momentum", names.shared)
        for x in owned:
            lo, hi = opt.bounds[x]
            theta[lo:hi] = _join(union, "expert", names.experts[x])
        read = 2 * len(names.shared) + sum(len(names.experts[x]) for x in owned)
    except SnapshotError as exc:    # everyone hears of it through the vote, then it is raised
        failure = exc
    vote_loaded(sw, epoch, failure, opt.op_timeout, f"their experts from the snapshots of revision "
                                                   f"{union.revision}")
    # every expert from one of its new owners to everyone (bytes balanced as in a sync's all-gather)
    sizes = {x: hi - lo for x, (lo, hi) in opt.bounds.items()}
    send = senders({x: [m for m in members if m in table[x]] for x in table}, sizes, members)
    per = {m: [x for x in sorted(send) if send[x] == m] for m in members}
    width = max(sum(sizes[x] for x in xs) for xs in per.values())
    block = np.zeros(width, np.float32)
    off = 0
    for x in per[me]:
        block[off:off + sizes[x]] = theta[slice(*opt.bounds[x])]
        off += sizes[x]
    gathered, ring, _ = sw.comm.pinned(epoch).all_gather_members(block, opt.op_timeout)
    if list(ring) != list(members):
        raise SnapshotError("the members changed during the resume: nothing resumed")
    for m, b in zip(ring, gathered):
        off = 0
        for x in per[m]:
            if m != me:
                theta[slice(*opt.bounds[x])] = b[off:off + sizes[x]]
            off += sizes[x]
    step = _step(union)
    _take(opt, theta, mom, union.revision, step)
    log.info("%s: resumed revision %d (step %d) owning %d experts, from %s", me, union.revision, step,
             len(owned), sorted({str(s.path) for s in union.snapshots}))
    return ExpertResumeReport(union.revision, step, list(members), owned, read)


def _join(union: SnapshotUnion, kind: str, params: Sequence[str]) -> np.ndarray:
    """The tensors ``kind/<p>`` for ``p`` in ``params``, verified, concatenated flat (float32)."""
    if not params:
        return np.zeros(0, np.float32)
    return np.concatenate([union.read(f"{kind}/{p}").astype(np.float32, copy=False).reshape(-1) for p in params])


def _step(union: SnapshotUnion) -> int:
    steps = {int(s.meta["step"]) for s in union.snapshots if isinstance(s.meta.get("step"), int)}
    return min(steps) if steps else 0


def _take(opt: ExpertSync, theta: np.ndarray, mom: np.ndarray, revision: int, step: int) -> None:
    """Hold the resumed state (the arrays of the shared state are written in place, never rebound)."""
    opt.theta[...], opt.mom[...] = theta, mom
    opt.revision, opt.has_state = revision, True
    opt.inner_step_count = step
    opt.digest = state_digest(opt.theta, opt.mom)
    opt._reset()                     # the model takes the resumed weights


def resume_hook(union: Optional[SnapshotUnion], reports: Optional[list[ExpertResumeReport]] = None
                ) -> Optional[Callable[[ExpertSync], Any]]:
    """``ExpertSync(..., resume=resume_hook(union))``: resume from ``union`` before the entry sync (None when
    there is nothing to resume). ``reports`` collects the ``ExpertResumeReport``."""
    if union is None:
        return None
    u = union

    def hook(opt: ExpertSync) -> None:
        rep = resume_experts(opt, u)
        if reports is not None:
            reports.append(rep)

    return hook


__all__ = ["ExpertNames", "ExpertResumeReport", "attach_snapshots", "expert_specs", "model_names",
           "open_expert_union", "resume_experts", "resume_hook"]
