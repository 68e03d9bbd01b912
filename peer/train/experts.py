"""Sparse expert sync (SPES) for mixture-of-experts models: each peer trains the shared parameters and only
the experts it owns, peer-to-peer, fault-tolerant, bit-identical on every member.

    model = MoELM(cfg)
    opt = ExpertSync(model, lambda ps: torch.optim.AdamW(ps, 3e-4), swarm, experts=expert_map(model),
                     sync_steps=50, owners_per_expert=2)
    for x, y in loader:
        model.loss(x, y).backward(); opt.step(samples=len(x)); opt.zero_grad()
    opt.finish()

Ownership (``peer.train.experts_own``): a deterministic function of the members of the last committed sync,
``r = owners_per_expert`` owners per expert, balanced, rendezvous-hashed (few experts move on churn).
Experts a peer does not own are frozen there (``requires_grad`` False, not in the inner optimizer, so no
gradient, no optimizer state, no weight decay or momentum) but run in the forward pass. The inner optimizer
is rebuilt by ``make_optimizer(params)`` when the owned set changes: a kept parameter keeps its state, a newly
owned expert starts fresh.

Every ``sync_steps`` steps, one protocol pinned to one epoch (all or nothing, like DiLoCo's round)::

    if peers_pending: update_topology()
    shared-state sync of (weights, outer momentum, revision): hashes, then only what differs (a joiner or a
        stale peer takes the swarm's state here and contributes nothing this round)
    all-gather of a header per member: its sample weight w and a bitmap of the experts it trained
    all-reduce (world) of w/W * (start - local) over the shared parameters        W = sum of w
    per distinct set S of an expert's contributors (|S| >= 2; concurrent ops on sub-groups):
        all-reduce over S of w/W_S * (start - local) of those experts                W_S = sum over S
    all-gather (world): each member contributes the averaged deltas of the experts it is the designated
        sender for (one contributor per expert, bytes balanced) -> every member holds every expert's average
    only now, on every member alike: shared -= average (or a DiLoCo outer step), expert -= its average,
        the optional merge warm-up; the model loads the new weights; ownership from this sync's members

An expert's bytes leave its owners once per sync (the sub-group reduce among its owners, then one block of
the ring all-gather), never once per receiver through one node. An expert nobody trained (all its owners
left) keeps its last synced weights, which every member holds; its new owners start with fresh optimizer
state; with r >= 2 the surviving co-owner's progress is averaged in alone.

Faults: an op aborted by a lost member aborts on every member (pinned epoch); nothing was applied, and the
whole protocol reruns on the survivors (``with_retry``). Alone, after retries, or on a deadline: the local
steps are discarded and the model goes back to the last synced weights. A ``StaleError`` rejoins and enters
like a joiner (the shared-state sync gives it the current model).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from collectives.errors import DeadlineExceeded, LocalError, OpAborted, StaleError, TooFewPeers
from peer.swarm import Swarm, with_retry
from peer.train.rounds import admit_then, guarded, sync_agreed
from peer.train.experts_layout import ExpertLayout, expert_map
from peer.train.experts_merge import MergeWarmup, merge_layer
from peer.train.experts_own import Expert, moved, owned_by, owners, senders
from peer.train.outer import flatten_params, load_params, outer_sgd, state_digest, weight_scale
from recovery.shared_state import SharedState

log = logging.getLogger(__name__)

__all__ = ["ExpertLayout", "ExpertSync", "MergeWarmup", "SyncRecord", "expert_map"]

@dataclass
class SyncRecord:
    """One sync point as this peer saw it."""
    kind: str                         # sync | entry (a joiner's or a rejoiner's first sync)
    revision: int                     # the shared state's revision after it
    committed: bool = False           # an average was applied (revision advanced)
    digest: str = ""                  # hex digest of (weights, outer momentum) after it
    members: list[str] = field(default_factory=list)   # ring order of the sync that completed
    samples: float = 0.0              # W: total sample weight
    my_samples: float = 0.0
    trained: list[Expert] = field(default_factory=list)   # experts I contributed this sync
    owned: list[Expert] = field(default_factory=list)     # experts I own after it
    gained: int = 0                   # experts newly owned after it (fresh optimizer state)
    moved: int = 0                    # experts (all layers) that gained an owner in the swarm's table
    orphans: int = 0                  # experts nobody contributed (kept their last synced weights)
    merged: bool = False
    adopted: bool = False             # my state differed from the swarm's and was replaced
    retried: bool = False             # a member was lost mid-sync; it reran on the survivors
    reason: str = ""
    bytes_sent: int = 0               # this peer's transport counters over the sync
    bytes_received: int = 0
    seconds: float = 0.0
    t: float = 0.0


@dataclass
class _Outcome:
    ring: list[str]
    total: float = 0.0
    shared: Optional[np.ndarray] = None              # (S,) averaged shared delta
    experts: dict[Expert, np.ndarray] = field(default_factory=dict)   # averaged expert deltas
    orphans: int = 0


class ExpertSync:
    """Wrap a model whose ``experts`` parameters are trained only by their owners. See the module doc."""

    def __init__(self, model: torch.nn.Module, make_optimizer: Callable[[list[torch.nn.Parameter]],
                                                                      torch.optim.Optimizer],
                 swarm: Swarm, *, experts: Optional[Mapping[str, Expert]] = None, sync_steps: int = 50,
                 owners_per_expert: int = 2, outer_lr: Optional[float] = None, outer_momentum: float = 0.9,
                 nesterov: bool = True, merge: Optional[MergeWarmup] = None, op_timeout: float = 600.0,
                 join_timeout: float = 600.0, alone_wait: float = 10.0,
                 on_sync: Optional[Callable[[SyncRecord], None]] = None,
                 resume: Optional[Callable[["ExpertSync"], None]] = None) -> None:
        """``resume``: called once admitted, before the entry sync (``experts_snapshots.resume_hook``)."""
        if sync_steps < 1 or owners_per_expert < 1:
            raise LocalError("sync_steps and owners_per_expert must be at least 1")
        lay = ExpertLayout(model, expert_map(model) if experts is None else experts)
        self.layout = lay
        self.layers, self.n_experts = lay.layers, lay.n_experts
        self.model, self.make_optimizer, self.swarm = model, make_optimizer, swarm
        self.H, self.r, self.merge = sync_steps, owners_per_expert, merge
        self.outer_lr, self.mu, self.nesterov = outer_lr, outer_momentum, nesterov
        self.op_timeout, self.join_timeout, self.alone_wait = op_timeout, join_timeout, alone_wait
        self.on_sync = on_sync
        self.shared_params, self.expert_params = lay.shared_params, lay.expert_params
        self.order, self.n_shared, self.bounds = lay.order, lay.n_shared, lay.bounds
        # the shared state: never rebound (the shared-state sync writes into these arrays)
        self.theta = flatten_params(self.order)        # (N,) shared params, then experts by (layer, expert)
        self.mom = np.zeros(self.n_shared, np.float32)  # (S,) outer momentum of the shared part
        self.state = SharedState({"theta": self.theta, "mom": self.mom})
        self.revision, self.has_state = 0, False
        self.digest = state_digest(self.theta, self.mom)
        self.table: dict[Expert, tuple[str, ...]] = {}
        self.owned: set[Expert] = set()
        self.inner: Optional[torch.optim.Optimizer] = None
        self.samples, self.steps_since, self.inner_step_count, self.syncs = 0.0, 0, 0, 0
        self.history: list[SyncRecord] = []
        self.faults = 0
        self._own({})                                   # until the first sync: only the shared part trains
        self._enter(resume)

    # ------------------------------------------------------------------ the optimizer interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        assert self.inner is not None
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        assert self.inner is not None
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None, *, samples: float = 1.0) -> Any:
        """One inner step (shared parameters and owned experts); every ``sync_steps`` steps a sync."""
        assert self.inner is not None
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self.inner_step_count += 1
        self.steps_since += 1
        self.samples += samples
        if self.steps_since >= self.H:
            self.steps_since = 0
            self._guarded(self._topology_and_exchange)
        return loss

    def finish(self) -> None:
        """End of training, every member: the model takes the last synced weights (steps since are dropped)."""
        self._reset()

    def state_dict(self) -> dict[str, Any]:
        assert self.inner is not None
        return {"theta": torch.from_numpy(self.theta.copy()), "mom": torch.from_numpy(self.mom.copy()),
                "revision": self.revision, "owned": sorted(self.owned), "inner": self.inner.state_dict()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Local resume: weights, momentum and revision (the next sync checks them against the swarm's);
        the inner state is loaded only if it was saved for the experts this peer owns now."""
        theta, mom = np.asarray(sd["theta"], np.float32), np.asarray(sd["mom"], np.float32)
        if theta.shape != self.theta.shape or mom.shape != self.mom.shape:
            raise LocalError("state_dict shapes do not match this model")
        self.theta[...], self.mom[...] = theta, mom
        self.revision, self.has_state = int(sd["revision"]), True
        self.digest = state_digest(self.theta, self.mom)
        if self.inner is not None and sorted(self.owned) == [tuple(x) for x in sd["owned"]]:
            self.inner.load_state_dict(sd["inner"])
        self._reset()

    def trainable(self) -> list[torch.nn.Parameter]:
        return self.shared_params + [p for x in sorted(self.owned) for p in self.expert_params[x]]

    # ------------------------------------------------------------------ ownership and the inner optimizer
    def _own(self, table: dict[Expert, tuple[str, ...]]) -> int:
        """Adopt an ownership table: freeze what is not mine, rebuild the inner optimizer when my set
        changed (kept parameters keep their state). Returns how many experts I newly own."""
        new = owned_by(table, self.swarm.id)
        self.table = table
        if new == self.owned and self.inner is not None:
            return 0
        gained = len(new - self.owned)
        kept = set(self.shared_params) | {p for x in new & self.owned for p in self.expert_params[x]}
        old = self.inner
        self.owned = new
        self.inner = self.make_optimizer(self.layout.freeze(new))
        if old is not None:
            if len(old.param_groups) == len(self.inner.param_groups):  # keep scheduled hyperparameters
                for g_old, g_new in zip(old.param_groups, self.inner.param_groups):
                    g_new.update({k: v for k, v in g_old.items() if k != "params"})
            for p in self.trainable():
                if p in kept and p in old.state:
                    self.inner.state[p] = old.state[p]
        log.info("%s: owns %d experts (%d new)", self.swarm.id, len(new), gained)
        return gained

    # ------------------------------------------------------------------ sync points
    def _enter(self, resume: Optional[Callable[["ExpertSync"], None]] = None) -> None:
        self.swarm.wait_admitted(self.join_timeout)
        if resume is not None:
            resume(self)                                # snapshots: the state to enter with
        self._guarded(lambda: self._exchange(entry=True), entry=True)

    def _topology_and_exchange(self) -> None:
        admit_then(self.swarm, self.op_timeout, self._exchange)

    def _guarded(self, fn: Callable[[], None], entry: bool = False) -> None:
        """``peer.train.rounds.guarded``: nothing is half-applied on any path."""
        guarded(self.swarm, fn, entry=entry, enter=lambda: self._exchange(entry=True), discard=self._discard,
                join_timeout=self.join_timeout, alone_wait=self.alone_wait)

    def _exchange(self, entry: bool = False) -> None:
        t0, sent0, recv0 = time.monotonic(), *self._bytes()
        members_before = self.swarm.members
        adopted = with_retry(self.swarm, self._sync_state)
        w = 0.0 if adopted else float(self.samples)
        trained = sorted(self.owned) if w > 0 else []
        rec = SyncRecord(kind="entry" if entry else "sync", revision=self.revision, adopted=adopted,
                         my_samples=w, trained=trained)
        delta = np.subtract(self.theta, flatten_params(self.order))            # (N,) start - local
        out = with_retry(self.swarm, lambda: self._average(delta, w, trained))
        rec.members, rec.samples, rec.orphans = out.ring, out.total, out.orphans
        rec.retried = sorted(out.ring) != sorted(members_before)
        if out.shared is not None:
            self._apply(out, rec)
        else:
            rec.reason = "nothing to average (no member had local steps)"
        table = owners(out.ring, self.layers, self.n_experts, self.r)
        rec.moved = sum(moved(self.table, table, lay) for lay in range(self.layers)) if self.table else 0
        rec.gained = self._own(table)
        rec.owned = sorted(self.owned)
        if rec.retried:
            self.faults += 1
        self._reset()
        self._record(rec, t0, sent0, recv0)

    def _sync_state(self) -> bool:
        """As ``DiLoCo._sync_state``: every member holds the agreed (weights, momentum, revision); returns
        whether mine was replaced (then my local steps were not made from it and count for nothing)."""
        before = self.digest
        self.revision = sync_agreed(self.swarm, self.state, self.revision, self.has_state, self.op_timeout)
        self.has_state = True
        self.digest = state_digest(self.theta, self.mom)
        if self.digest == before:
            return False
        self._reset()
        log.info("%s: took the swarm's state (revision %d)", self.swarm.id, self.revision)
        return True

    def _average(self, delta: np.ndarray, w: float, trained: Sequence[Expert]) -> _Outcome:
        """The collective part of a sync (every op pinned to the first one's epoch). Pure of side effects
        on the model and the shared state: the caller applies the outcome once everything committed."""
        me, L, E = self.swarm.id, self.layers, self.n_experts
        header = np.zeros(1 + L * E, np.float32)          # (1 + L*E,) w, then a bitmap of trained experts
        header[0] = w
        for lay, e in trained:
            header[1 + lay * E + e] = 1
        blocks, ring, epoch = self.swarm.comm.all_gather_members(header, self.op_timeout)
        comm = self.swarm.comm.pinned(epoch)
        ws = {m: np.float32(b[0]) for m, b in zip(ring, blocks)}
        for m, b in zip(ring, blocks):  # a malformed header counts as no contribution, on every member alike
            if not np.isfinite(ws[m]) or ws[m] < 0 or not np.isin(b[1:], (0, 1)).all():
                log.warning("%s: %s sent an invalid sync header; its contribution is ignored", me, m)
                ws[m] = np.float32(0)
        w = float(ws[me])                               # my weight as every member sees it
        total = _sum32([ws[m] for m in ring])
        out = _Outcome(ring=list(ring), total=float(total))
        if total <= 0:
            return out
        contrib = {(lay, e): [m for m, b in zip(ring, blocks) if ws[m] > 0 and b[1 + lay * E + e] == 1]
                   for lay in range(L) for e in range(E)}
        out.orphans = sum(1 for c in contrib.values() if not c)
        handles: list[tuple[Any, Callable[[], None]]] = []
        shared = np.multiply(delta[:self.n_shared], weight_scale(w, total)) if w > 0 else \
            np.zeros(self.n_shared, np.float32)
        handles.append((comm.all_reduce_async(shared, op="sum"), lambda: None))
        avgs: dict[Expert, np.ndarray] = {}
        groups: dict[tuple[str, ...], list[Expert]] = {}
        for x, cs in contrib.items():
            if me in cs:
                if len(cs) == 1:
                    lo, hi = self.bounds[x]
                    avgs[x] = delta[lo:hi].copy()          # w / w == 1: my delta is the average
                else:
                    groups.setdefault(tuple(cs), []).append(x)
        for g in sorted(groups):
            xs = groups[g]
            scale = weight_scale(w, _sum32([ws[m] for m in g]))
            buf = np.concatenate([delta[slice(*self.bounds[x])] for x in xs])
            np.multiply(buf, scale, out=buf)
            handles.append((comm.group(list(g)).all_reduce_async(buf, op="sum"),
                            functools.partial(self._split, buf, xs, avgs)))
        _wait_all(handles, self.op_timeout)
        out.shared = shared
        sizes = {x: self.bounds[x][1] - self.bounds[x][0] for x in contrib}
        send = senders({x: c for x, c in contrib.items() if c}, sizes, ring)
        per = {m: [x for x in sorted(send) if send[x] == m] for m in ring}
        width = max(sum(sizes[x] for x in xs) for xs in per.values())
        if width == 0:
            return out
        block = np.zeros(width, np.float32)
        mine = [avgs[x] for x in per[me]]
        if mine:
            flat = np.concatenate(mine)
            block[:flat.size] = flat
        gathered, gring, _ = comm.all_gather_members(block, self.op_timeout)
        if list(gring) != list(ring):
            raise OpAborted("all-gather ring differs from the header's", epoch=epoch, reason="ring changed")
        for m, b in zip(gring, gathered):
            off = 0
            for x in per[m]:
                n = sizes[x]
                out.experts[x] = b[off:off + n] if m != me else avgs[x]
                off += n
        return out

    def _split(self, buf: np.ndarray, xs: Sequence[Expert], avgs: dict[Expert, np.ndarray]) -> None:
        off = 0
        for x in xs:
            n = self.bounds[x][1] - self.bounds[x][0]
            avgs[x] = buf[off:off + n]
            off += n

    def _apply(self, out: _Outcome, rec: SyncRecord) -> None:
        """Everything committed: the same elementwise float32 updates on every member."""
        assert out.shared is not None
        s = self.theta[:self.n_shared]
        if self.outer_lr is None:
            np.subtract(s, out.shared, out=s)             # plain (sample-weighted) averaging
        else:
            outer_sgd(s, self.mom, out.shared, self.outer_lr, self.mu, self.nesterov, np.empty_like(s))
        for x, d in out.experts.items():
            lo, hi = self.bounds[x]
            np.subtract(self.theta[lo:hi], d, out=self.theta[lo:hi])
        self.revision += 1
        self.syncs += 1
        step = self.revision * self.H
        if self.merge is not None and self.merge.due(self.revision, step):
            for lay in range(self.layers):
                merge_layer([self.theta[slice(*self.bounds[(lay, e)])] for e in range(self.n_experts)],
                            self.merge.alpha(step), self.merge.k)
            rec.merged = True
        self.digest = state_digest(self.theta, self.mom)
        rec.committed = True

    # ------------------------------------------------------------------ local state
    def _discard(self, reason: str) -> None:
        self.faults += 1
        log.warning("%s: sync failed (%s); discarding local steps, back to revision %d", self.swarm.id,
                    reason, self.revision)
        self._reset()
        now = time.monotonic()
        self._record(SyncRecord(kind="sync", revision=self.revision, reason=reason), now, *self._bytes())

    def _reset(self) -> None:
        load_params(self.order, self.theta)
        self.samples = 0.0

    def _bytes(self) -> tuple[int, int]:
        st = self.swarm.stats
        return int(st["bytes_sent"]), int(st["bytes_received"])

    def _record(self, rec: SyncRecord, t0: float, sent0: int, recv0: int) -> None:
        sent, recv = self._bytes()
        rec.revision, rec.digest = self.revision, self.digest.hex()
        rec.bytes_sent, rec.bytes_received = sent - sent0, recv - recv0
        rec.seconds, rec.t = time.monotonic() - t0, time.time()
        self.history.append(rec)
        if self.on_sync is not None:
            self.on_sync(rec)


def _sum32(values: Sequence[np.float32]) -> np.float32:
    """A float32 sum in the given order (the same bits on every member)."""
    acc = np.float32(0)
    for v in values:
        acc = np.float32(acc + np.float32(v))
    return acc


def _wait_all(handles: Sequence[tuple[Any, Callable[[], None]]], timeout: float) -> None:
    """Wait for every op (so none is left running on our buffers), then raise the first failure."""
    deadline = time.monotonic() + timeout
    first: Optional[Exception] = None
    for h, done in handles:
        try:
            h.wait(max(0.1, deadline - time.monotonic()))
            done()
        except (OpAborted, DeadlineExceeded, TooFewPeers, StaleError) as exc:
            first = first or exc
    if first is not None:
        raise first
