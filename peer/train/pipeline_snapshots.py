"""Pipeline snapshots: each peer writes its stage's weights and optimizer state in the background, under
stage-independent global parameter names, so that a swarm of S stages can resume as S' stages from the
union of the surviving peers' snapshot directories (Universal Checkpointing's idea; ``docs/snapshots.md``).

    layout = StageLayout.numbered(stages)          # blocks.<i> renumbered across the stages: global names
    union = open_union(["snaps-a", "snaps-b"], layout) if resuming else None   # before joining: refused
                                                   # here when no revision holds every stage's parameters
    pipe = Pipeline(swarm, stages, ...)            # every initial peer of the swarm, then:
    snaps = resume_and_snapshot(pipe, layout, union, "snaps-c", every=10)     # collective when resuming
    while pipe.committed < N: pipe.step(get_batch)
    snaps.close()                                  # waits for the last snapshot

What a snapshot of committed step ``n`` holds (revision ``n``; one per peer, a replica writes the same bytes):

    stage/<global name>             kind "stage": the parameter (meta: stage)
    other/<global name>#<key>       kind "other": its optimizer state tensor ``key`` (Adam: step, exp_avg, ...)
    manifest meta                   {"pipeline": "stage", "stage": s, "stages": S, "lr_scale": x, "peer": id}

Resuming (``resume_pipeline``, a collective of every member before the first step): the members all-gather
(revision, digest of the union's manifests, requested stage); every resuming member must hold the same
union; the stages are assigned among them as the pipeline would assign newcomers
(``peer.train.pipeline_plan.assign_stages``); each member reads its new stage's tensors from the union
(SHA-256 verified) and all vote; only if every member loaded its stage does any member take it, at
committed step ``n`` (``Pipeline.start_at``). The first step then is step ``n`` on every member; joiners
without snapshots catch up from the replicas as usual. A member that resumes nothing (``union=None``) takes
part and gets no stage: it is a newcomer at the first step.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from collectives.errors import LocalError
from peer.swarm import Swarm
from peer.train.pipeline import Pipeline, StepRecord
from peer.train.pipeline_plan import NONE, NotEnoughPeers, assign_stages
from recovery.snapshot import (MANIFEST, PathLike, Snapshot, SnapshotConflict, SnapshotError, SnapshotNotFound,
                               TensorEntry, TensorSpec, check_not_older, list_snapshots, merge, open_snapshot,
                               read_tensor)
from recovery.snapshot_writer import Snapshotter

log = logging.getLogger(__name__)

MAGIC = 0x53575253        # "SWRS": a resume record (never a pipeline step record: those have 4 words)
RECORD_WORDS = 6          # magic, revision (-1: none), union digest, requested stage, committed, 0


# ============================================================================ global names

class StageLayout:
    """Stage-local parameter names <-> global names, and every parameter's shape, for one stage count.
    ``names[s]``: ``{local name: global name}`` of stage ``s`` (in ``named_parameters()`` order)."""

    def __init__(self, names: Sequence[Mapping[str, str]], shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.names = [dict(n) for n in names]
        self.shapes = dict(shapes)
        seen: dict[str, int] = {}
        for s, m in enumerate(self.names):
            for g in m.values():
                if g in seen:
                    raise LocalError(f"global parameter name {g!r} is used by stages {seen[g]} and {s}")
                seen[g] = s
        self.stage_of = seen

    @classmethod
    def numbered(cls, stages: Sequence[torch.nn.Module], prefix: str = "blocks") -> "StageLayout":
        """``<prefix>.<i>.<rest>`` of stage s becomes ``<prefix>.<offset_s + i>.<rest>``, offset_s being the
        number of such blocks in the stages before s; other names stay as they are (and must be unique)."""
        pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
        names, shapes, offset = [], {}, 0
        for module in stages:
            local, count = {}, 0
            for n, p in module.named_parameters():
                m = pat.match(n)
                g = f"{prefix}.{offset + int(m.group(1))}.{m.group(2)}" if m else n
                count = max(count, int(m.group(1)) + 1) if m else count
                local[n] = g
                shapes[g] = tuple(p.shape)
            names.append(local)
            offset += count
        return cls(names, shapes)

    @classmethod
    def per_stage(cls, stages: Sequence[torch.nn.Module]) -> "StageLayout":
        """``<stage>.<local name>``: for stages whose modules repeat names (such snapshots resume only into the
        same stage count)."""
        names = [{n: f"{s}.{n}" for n, _ in m.named_parameters()} for s, m in enumerate(stages)]
        shapes = {f"{s}.{n}": tuple(p.shape) for s, m in enumerate(stages) for n, p in m.named_parameters()}
        return cls(names, shapes)

    @property
    def num_stages(self) -> int:
        return len(self.names)

    def all_names(self) -> list[str]:
        return [g for m in self.names for g in m.values()]


def stage_specs(pipe: Pipeline, layout: StageLayout) -> list[TensorSpec]:
    """My stage's parameters and their optimizer state under global names (views; ``capture`` copies)."""
    s = pipe.stage
    state = pipe.opt.state if pipe.opt is not None else {}
    specs = []
    for local, p in pipe.stages[s].named_parameters():
        g = layout.names[s][local]
        specs.append(TensorSpec("stage", g, p.detach().cpu().numpy(), {"stage": s}))
        for key, v in sorted(state.get(p, {}).items()):
            if isinstance(v, torch.Tensor):
                specs.append(TensorSpec("other", f"{g}#{key}", v.detach().cpu().numpy(),
                                        {"stage": s, "optimizer": key}))
    return specs


def attach_snapshots(pipe: Pipeline, snapshots: Snapshotter, layout: StageLayout) -> None:
    """After every committed step, offer my stage to ``snapshots`` (a copy now, the write in its thread).
    Chains the pipeline's ``on_step`` callback (it runs after the step's optimizer step)."""
    user = pipe.on_step

    def on_step(rec: StepRecord) -> None:
        if rec.committed:
            snapshots.capture(pipe.committed, stage_specs(pipe, layout),
                              meta={"pipeline": "stage", "stage": pipe.stage, "stages": pipe.S,
                                    "lr_scale": float(pipe.meta[0]), "peer": pipe.swarm.id})
        if user is not None:
            user(rec)

    pipe.on_step = on_step


# ============================================================================ the union of the survivors

@dataclass
class SnapshotUnion:
    """The snapshots of one revision from several directories that together hold every tensor a layout
    needs. ``held``: tensor name -> (snapshot, entry); ``digest``: of the manifests' (name, SHA-256)."""
    revision: int
    snapshots: list[Snapshot]
    held: dict[str, tuple[Snapshot, TensorEntry]] = field(default_factory=dict)
    digest: int = 0

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name``, its size and SHA-256 checked (``SnapshotCorrupt`` names a bad file)."""
        snap, entry = self.held[name]
        return read_tensor(snap.path, entry)


@dataclass
class PipelineUnion(SnapshotUnion):
    """A union holding every stage parameter of a pipeline layout."""

    def stage_arrays(self, layout: StageLayout, s: int) -> tuple[dict[str, np.ndarray], dict[str, dict[str,
                                                                                                  np.ndarray]]]:
        """Stage ``s``'s weights by global name, and the optimizer state found for them (global name ->
        key -> array); every tensor read is verified (``SnapshotCorrupt`` names a bad file)."""
        weights, optim = {}, {}
        for g in layout.names[s].values():
            weights[g] = self.read(f"stage/{g}")
            optim[g] = {name.split("#", 1)[1]: read_tensor(sn.path, e) for name, (sn, e) in self.held.items()
                        if e.kind == "other" and e.param.startswith(f"{g}#")}
        return weights, optim

    def lr_scale(self, layout: StageLayout, s: int) -> float:
        """The learning-rate scale of stage ``s``: the smallest among the old stages it takes parameters
        from (1.0 unless one was rebuilt by CheckFree; per stage, so a regrouped stage takes the cautious one)."""
        held = {id(self.held[f"stage/{g}"][0]): self.held[f"stage/{g}"][0] for g in layout.names[s].values()}
        scales = [float(sn.meta.get("lr_scale", 1.0)) for sn in held.values()]
        return min(scales, default=1.0)


def _revisions(path: Path) -> list[tuple[int, Path]]:
    if (path / MANIFEST).is_file():   # one rev-N directory
        return [(open_snapshot(path).revision, path)]
    return list_snapshots(path)


def find_union(paths: Sequence[PathLike], wanted: Mapping[str, tuple[int, ...]],
               explain: Callable[[int, list[str]], str]) -> SnapshotUnion:
    """The newest revision at which the snapshots in ``paths`` (roots or ``rev-N`` directories) together
    hold every tensor named in ``wanted`` (tensor name -> the shape expected). Manifests are validated (a
    corrupt one is refused); tensors are verified when read. When no revision is complete, raises
    ``SnapshotNotFound`` with ``explain(newest revision, names the newest lacks)``."""
    if not paths:
        raise LocalError("no snapshot directory given")
    found: dict[int, list[Path]] = {}
    for p in paths:
        for rev, d in _revisions(Path(p)):
            found.setdefault(rev, []).append(d)
    if not found:
        raise SnapshotNotFound(f"no complete snapshot in any of {[str(p) for p in paths]}")
    newest_missing: list[str] = []
    for rev in sorted(found, reverse=True):
        snaps = [open_snapshot(d) for d in found[rev]]
        held = merge(snaps)            # a tensor held twice must have the same bytes (SnapshotConflict)
        missing = [n for n in wanted if n not in held]
        if missing:
            newest_missing = newest_missing or missing
            log.warning("snapshot revision %d lacks %d tensor(s) (%s...): trying an older one",
                        rev, len(missing), missing[0])
            continue
        for n, shape in wanted.items():
            entry = held[n][1]
            if entry.shape != tuple(shape):
                raise SnapshotConflict(f"{held[n][0].path}: {n} has shape {entry.shape}, this run's is "
                                       f"{tuple(shape)} (another model?)")
        h = hashlib.sha256()
        for name in sorted(held):
            h.update(f"{name}|{held[name][1].sha256}|".encode())
        return SnapshotUnion(rev, snaps, held, int.from_bytes(h.digest()[:8], "little", signed=True))
    raise SnapshotNotFound(f"the snapshots in {[str(p) for p in paths]} {explain(max(found), newest_missing)}")


def open_union(paths: Sequence[PathLike], layout: StageLayout) -> PipelineUnion:
    """The newest revision at which the snapshots in ``paths`` together hold every stage parameter of
    ``layout``, with the shapes it expects (``find_union``). Raises ``SnapshotNotFound`` naming the missing
    parameters when no revision is complete (a stage's snapshot directory is missing)."""
    def explain(newest: int, missing: list[str]) -> str:
        names = [n.split("/", 1)[1] for n in missing]
        stages = sorted({layout.stage_of[g] for g in names})
        return (f"hold no revision with every parameter of this {layout.num_stages}-stage pipeline: the newest, "
                f"revision {newest}, lacks {len(names)} parameter(s) of its stage(s) {stages} "
                f"({', '.join(names[:12])}{', ...' if len(names) > 12 else ''}); is a stage's snapshot "
                "directory missing?")

    u = find_union(paths, {f"stage/{g}": layout.shapes[g] for g in layout.all_names()}, explain)
    return PipelineUnion(u.revision, u.snapshots, u.held, u.digest)


def gather_records(swarm: Swarm, mine: np.ndarray, timeout: float, rule: str
                   ) -> tuple[dict[str, list[int]], list[str], int]:
    """All-gather every member's resume record (int64 words, the first a magic number): member -> words,
    the members (ring order) and the epoch. A member that sent another record is refused by name on every
    member (``SnapshotConflict``: "every member of the swarm's first <rule>")."""
    words, members, epoch = swarm.comm.all_gather_members(mine, timeout)
    recs = {m: [int(x) for x in w] for m, w in zip(members, words)}
    strangers = [m for m, r in recs.items() if r[0] != int(mine[0])]
    if strangers:
        raise SnapshotConflict(f"members {strangers} are not resuming (every member of the swarm's first "
                               f"{rule})")
    return recs, members, epoch


def vote_loaded(swarm: Swarm, epoch: int, failure: Optional[SnapshotError], timeout: float, what: str) -> None:
    """Every member says whether it read its part of a union; raises on every member alike when one could
    not (the one that failed raises its own error, naming the file; the others ``SnapshotError``)."""
    vote = np.array([1.0 if failure is not None else 0.0], np.float64)
    swarm.comm.pinned(epoch).all_reduce(vote, op="sum", timeout=timeout)
    if failure is not None:
        raise failure
    if vote[0]:
        raise SnapshotError(f"{int(vote[0])} member(s) could not read {what}: nothing resumed")


# ============================================================================ resuming, live

@dataclass
class ResumeReport:
    revision: int
    stage: int                       # NONE: this member resumed nothing (it catches up at the first step)
    members: list[str]
    assignment: dict[str, int]
    optimizer: str = "restored"      # or "fresh": the snapshot has no (matching) optimizer state


def resume_pipeline(pipe: Pipeline, union: Optional[PipelineUnion], layout: StageLayout) -> ResumeReport:
    """Collective of every member, before the pipeline's first step: take the stages of the union (see the
    module docstring). Raises on every member alike (``SnapshotConflict``: members hold other snapshots;
    ``NotEnoughPeers``: fewer resuming members than stages; ``SnapshotStale``: a member holds a newer
    live state; ``SnapshotError``: a member could not read its stage); nothing is taken then."""
    if layout.num_stages != pipe.S:
        raise LocalError(f"the layout has {layout.num_stages} stages, the pipeline {pipe.S}")
    sw, me = pipe.swarm, pipe.swarm.id
    mine = np.array([MAGIC, union.revision if union else -1, union.digest if union else 0, pipe.request,
                     pipe.committed, 0], np.int64)
    recs, members, epoch = gather_records(sw, mine, pipe.op_timeout, "step must call resume_pipeline")
    resumers = [m for m in members if recs[m][1] >= 0]
    kinds = {(recs[m][1], recs[m][2]) for m in resumers}
    if len(kinds) > 1:
        raise SnapshotConflict(f"members resume from different snapshots (revision, digest): "
                               f"{ {m: tuple(recs[m][1:3]) for m in resumers} }")
    if not resumers:
        raise SnapshotNotFound("no member has a snapshot to resume from")
    revision = recs[resumers[0]][1]
    live = max(recs[m][4] for m in members)
    if live != NONE:
        check_not_older(revision, live)   # SnapshotStale
        raise LocalError(f"a member already holds pipeline state (committed step {live}): resume_pipeline "
                         "starts a swarm, before its first step")
    if len(resumers) < pipe.S:
        raise NotEnoughPeers(f"{len(resumers)} member(s) resumed from snapshots for {pipe.S} stages")
    requests = {m: recs[m][3] if 0 <= recs[m][3] < pipe.S else NONE for m in resumers}
    assignment = assign_stages(resumers, {}, requests, pipe.S)
    s = assignment.get(me, NONE)
    failure: Optional[SnapshotError] = None
    loaded = None
    if s != NONE and union is not None:
        try:
            loaded = union.stage_arrays(layout, s)
        except SnapshotError as exc:   # everyone hears of it through the vote below, then it is raised
            failure = exc
    vote_loaded(sw, epoch, failure, pipe.op_timeout, f"their stage from the snapshots of revision {revision}")
    report = ResumeReport(revision, s, list(members), assignment)
    if loaded is not None and union is not None:
        report.optimizer = _take(pipe, layout, s, revision, loaded, union.lr_scale(layout, s))
        log.info("%s: resumed stage %d of %d at committed step %d from %s", me, s, pipe.S, revision,
                 sorted({str(sn.path) for sn in union.snapshots}))
    return report


def _take(pipe: Pipeline, layout: StageLayout, s: int, revision: int,
          loaded: tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]], lr_scale: float) -> str:
    """Serve stage ``s`` at ``revision`` with the loaded weights and (when it matches) optimizer state."""
    weights, optim = loaded
    pipe.start_at(s, revision)          # a fresh optimizer with its lazy state made (zeros)
    params = list(pipe.stages[s].named_parameters())
    assert pipe.opt is not None
    state = pipe.opt.state
    match = all(set(optim[layout.names[s][n]]) == {k for k, v in state.get(p, {}).items()
                                                   if isinstance(v, torch.Tensor)}
                and all(tuple(a.shape) == tuple(state[p][k].shape) for k, a in optim[layout.names[s][n]].items())
                for n, p in params)
    with torch.no_grad():
        for n, p in params:
            p.copy_(torch.from_numpy(weights[layout.names[s][n]]))
            if match:
                for k, a in optim[layout.names[s][n]].items():
                    state[p][k].copy_(torch.from_numpy(a))
    pipe.meta[0] = lr_scale
    for e in pipe.edges.edges:   # CheckFree+ copies are not in snapshots: the COPY_STALE flag of a holder
        if e.holder == s:        # makes the first step's boundary refresh them from their resumed owners
            e.stale = True
    if not match:
        log.warning("%s: the snapshot's optimizer state does not match stage %d's optimizer: it starts fresh",
                    pipe.swarm.id, s)
    return "restored" if match else "fresh"


def resume_and_snapshot(pipe: Pipeline, layout: StageLayout, union: Optional[PipelineUnion] = None,
                        snapshot_dir: PathLike = "", every: int = 1, keep: int = 2) -> Optional[Snapshotter]:
    """What a pipeline peer does after building its ``Pipeline``: resume from ``union`` (a collective, see
    ``resume_pipeline``) when given, then snapshot its stage every ``every`` committed steps into
    ``snapshot_dir`` (when given). Returns the writer (``close()`` it at the end) or None."""
    if union is not None:
        resume_pipeline(pipe, union, layout)
    if not snapshot_dir:
        return None
    snaps = Snapshotter(snapshot_dir, every=every, keep=keep, meta={"peer": pipe.swarm.id})
    attach_snapshots(pipe, snaps, layout)
    return snaps


__all__ = ["PipelineUnion", "ResumeReport", "SnapshotUnion", "StageLayout", "attach_snapshots", "find_union",
           "gather_records", "open_union", "resume_and_snapshot", "resume_pipeline", "stage_specs", "vote_loaded"]
