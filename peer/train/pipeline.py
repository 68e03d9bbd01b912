"""Pipeline stages over peers: a model split into S stages, each served by one or more peers (replicas).

    stages = [make_stage(i) for i in range(S)]     # nn.Modules; the last one's output goes to loss_fn
    swarm = Swarm.join([...]); swarm.wait_admitted()
    pipe = Pipeline(swarm, stages, optimizer=lambda ps: torch.optim.AdamW(ps, 3e-4), micro_batches=8,
                    example=get_batch(0, 0))        # one micro-batch (inputs, targets): declares the shapes
    while pipe.committed < N:
        loss = pipe.step(get_batch)                 # every member calls it; returns the step's mean loss

``get_batch(step, m)`` returns micro-batch ``m`` of step ``step`` as (inputs, targets); it is called on the
peer that runs micro-batch m's first stage, and again with the same arguments when a step is retried, so it
should be a function of its arguments (e.g. seeded by them). The loss comes back on **every** peer: the
commit vote carries the loss sums, so each member returns the same mean over the step's micro-batches.

Every peer builds all S stages (the shapes, and the copies it needs to take a stage over or rebuild one) but
trains only its own. One step, the same on every member::

    boundary   admit pending joiners (update_topology); all-gather (held stage, requested stage, committed
               steps); plan = assignment + who needs which stage's state (peer.train.pipeline_plan);
               recovery (recovery.stage): replica copy through the shared-state sync, else a StageRebuild
               from the neighbours (peer.train.pipeline_rebuild), else StageLost; then the edge-layer
               copies are refreshed when due (peer.train.pipeline_copies); every later op is pinned to this epoch
    micro      route each micro-batch through one replica per stage; forward all, then backward (GPipe);
               activations and gradients by point-to-point send/recv (peer.train.pipeline_exec)
    reduce     per stage: sum of the replicas' gradients (each micro-batch's loss is scaled by 1/M, so the
               sum is the average weighted by micro-batches processed); L2 norm before/after clipping
    vote       all-reduce over ALL members of (failures, loss sum, losses, per-stage norms): commit only if
               nobody failed and every micro-batch's loss arrived; then, and only then, optimizer.step()

A failed attempt changes no weights or optimizer state anywhere; the step is retried on the new membership.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from collectives.errors import (DeadlineExceeded, LocalError, OpAborted, StaleError, SwarmError, TooFewPeers)
from peer.swarm import Swarm
from peer.train.pipeline_copies import Edges
from peer.train.pipeline_exec import ActivationError, Executor, GetBatch, LossFn, Outcome, Spec, module_device
from peer.train.pipeline_plan import (NONE, MemberRecord, NotEnoughPeers, Order, StepPlan, identity_order,
                                      make_plan, route)
from peer.train.pipeline_rebuild import rebuild_stage, weights_digest
from recovery import stage as rs
from recovery.rebuild import StageLost, StageRebuild

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def default_loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (logits (..., V), integer targets (...))."""
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))


@dataclass
class StepRecord:
    """One attempt of one step as this peer saw it."""
    step: int                     # the committed-step index this attempt tried to make
    committed: bool
    epoch: int
    stage: int
    members: list[str]
    loss: Optional[float] = None
    reason: str = ""
    micro_batches: int = 0        # processed here
    norms: list[tuple[float, float]] = field(default_factory=list)  # per stage (pre-clip, post-clip)
    recoveries: list[dict[str, Any]] = field(default_factory=list)  # done at this attempt's boundary
    bad_peers: list[str] = field(default_factory=list)
    plan_s: float = 0.0
    compute_s: float = 0.0
    wait_s: float = 0.0
    reduce_s: float = 0.0
    vote_s: float = 0.0
    seconds: float = 0.0
    bytes_sent: int = 0
    t: float = 0.0


class Pipeline:
    """Train ``stages`` (one ``nn.Module`` per stage) across the swarm; see the module docstring.

    ``example``: one micro-batch (inputs, targets) from which the activation shapes at every stage boundary
    are inferred (received tensors must match them exactly). ``stage``: ask to serve this stage.
    ``order(m)``: the stage order of micro-batch m (a permutation; identity by default; CheckFree+ swaps).
    ``max_grad_norm``: clip each stage's averaged gradient to this L2 norm. ``rebuild``: what restores a stage
    that lost every replica (``recovery.rebuild.StageRebuild``); without it that raises ``StageLost``.
    ``admit_every``: admit pending joiners at every this many committed steps (and whenever a stage lacks
    a member with its state). ``copy_every``: stage modules with edge layers (``edge_in``/``edge_out`` and
    ``body``, ``peer.train.pipeline_copies``) keep copies of them on the neighbouring stage, refreshed every
    this many committed steps (None: 1 when the order runs another stage at an edge position, else no
    copies; 0: none)."""

    def __init__(self, swarm: Swarm, stages: Sequence[torch.nn.Module], optimizer: OptimizerFactory, *,
                 micro_batches: int, example: tuple[torch.Tensor, torch.Tensor],
                 loss_fn: LossFn = default_loss, stage: Optional[int] = None, order: Optional[Order] = None,
                 max_grad_norm: Optional[float] = None, rebuild: Optional[StageRebuild] = None,
                 op_timeout: float = 60.0, join_timeout: float = 120.0, attempts: int = 20, admit_every: int = 1,
                 copy_every: Optional[int] = None, on_step: Optional[Callable[[StepRecord], None]] = None) -> None:
        if len(stages) < 1 or micro_batches < 1:
            raise LocalError("a pipeline needs at least one stage and one micro-batch")
        if stage is not None and not 0 <= stage < len(stages):
            raise LocalError(f"stage {stage} does not exist (0..{len(stages) - 1})")
        self.swarm, self.stages, self.make_opt = swarm, list(stages), optimizer
        self.S, self.M, self.loss_fn = len(stages), micro_batches, loss_fn
        self.request = NONE if stage is None else stage
        self.order: Order = order or identity_order(self.S)
        self.max_grad_norm, self.rule = max_grad_norm, rebuild
        self.op_timeout, self.join_timeout, self.attempts, self.on_step = op_timeout, join_timeout, attempts, on_step
        self.example = example
        self.admit_every = max(1, admit_every)
        self._specs: dict[tuple[int, ...], list[Spec]] = {}
        self.target_spec = Spec(tuple(example[1].shape), example[1].dtype)
        self.edges = Edges(self.stages, self.order, micro_batches, copy_every)
        for m in range(2):
            self.specs(m)
        self.stage = NONE                     # the stage this peer serves (NONE until its first boundary)
        self.committed = NONE                 # committed steps this peer's stage state reflects
        self.opt: Optional[torch.optim.Optimizer] = None
        self.meta = np.ones(1, np.float64)   # [lr scale] of my stage (part of its shared state)
        self.norms = np.full(rs.NORM_WORDS, np.nan, np.float64)   # my stage's last (pre, post, rebuilt)
        self.base_lr: list[float] = []
        self.history: list[StepRecord] = []
        self.recoveries: list[dict[str, Any]] = []
        self.last_norms: list[tuple[float, float]] = []
        self.steps_aborted = 0
        self.bytes_sent = 0
        self.rebuilt_digest = ""              # SHA-256 of the weights of the last stage rebuilt here
        self.rebuilds: list[dict[str, Any]] = []   # what each rebuild here used (neighbour arrays, norms)
        self.outgoing: Callable[[torch.Tensor, str], torch.Tensor] = lambda t, what: t  # tests corrupt this
        self.make_opt(list(self.stages[0].parameters()))   # torch's lazy imports now, not under op deadlines
        swarm.wait_admitted(join_timeout)

    # ------------------------------------------------------------------ shapes
    def specs(self, m: int) -> list[Spec]:
        """The (shape, dtype) entering each position of micro-batch m (index S: the last stage's output)."""
        order = tuple(self.order(m))
        if order not in self._specs:
            x = self.example[0]
            out = [Spec(tuple(x.shape), x.dtype)]
            with torch.no_grad():
                for pos, s in enumerate(order):
                    x = self.edges.forward(s, pos, x.to(module_device(self.stages[s])))
                    out.append(Spec(tuple(x.shape), x.dtype))
            self._specs[order] = out
        return self._specs[order]

    # ------------------------------------------------------------------ the step
    def step(self, get_batch: Optional[GetBatch]) -> float:
        """One committed step (retried until it commits, at most ``attempts`` times). Returns its mean loss."""
        last: Optional[BaseException] = None
        for _ in range(self.attempts):
            epoch = self.swarm.epoch
            try:
                rec = self._attempt(get_batch)
            except (StageLost, LocalError):
                raise
            except NotEnoughPeers as exc:
                log.warning("%s: %s; waiting for peers", self.swarm.id, exc)
                self._wait_for_peers()
                last = exc
                continue
            except StaleError as exc:
                log.warning("%s: %s; rejoining", self.swarm.id, exc)
                self.swarm.rejoin(self.join_timeout)
                last = exc
                continue
            except (OpAborted, DeadlineExceeded) as exc:   # at the boundary: someone was lost mid-plan
                log.warning("%s: step boundary failed: %s: %s", self.swarm.id, type(exc).__name__, exc)
                self._aborted_at_boundary(epoch, exc)
                self._wait_change(epoch, exc)
                last = exc
                continue
            if rec.committed:
                assert rec.loss is not None
                return rec.loss
            last = SwarmError(rec.reason)
            self._wait_change(rec.epoch, last)
        raise DeadlineExceeded(f"step {self.committed} did not commit in {self.attempts} attempts: {last}")

    def _aborted_at_boundary(self, epoch: int, exc: BaseException) -> None:
        """A member was lost during the step boundary (gather, recovery): an aborted attempt like any other."""
        self.steps_aborted += 1
        rec = StepRecord(step=max(self.committed, 0), committed=False, epoch=epoch, stage=self.stage,
                         members=self.swarm.members, reason=f"boundary: {type(exc).__name__}: {exc}", t=time.time())
        self.history.append(rec)
        if self.on_step is not None:
            self.on_step(rec)

    def _wait_for_peers(self) -> None:
        """Fewer members than stages (every member sees the same): topology updates (a collective; alone
        it completes at once) admit whoever waits, until enough members are in or ``join_timeout`` passes."""
        need = max(2, self.S)
        deadline = time.monotonic() + self.join_timeout
        while len(self.swarm.members) < need:
            if time.monotonic() > deadline:
                raise NotEnoughPeers(f"only {len(self.swarm.members)} members for {self.S} stages after "
                                     f"{self.join_timeout:.0f}s")
            epoch = self.swarm.update_topology(self.op_timeout)
            if len(self.swarm.members) < need:
                try:
                    self.swarm.wait_epoch_change(epoch, 0.5)
                except DeadlineExceeded:
                    pass  # nobody joined yet; vote again

    def _wait_change(self, epoch: int, exc: BaseException) -> None:
        """After a failed attempt: give the swarm time to evict the peer that caused it (bounded)."""
        if isinstance(exc, TooFewPeers) or self.swarm.epoch != epoch:
            return
        try:
            self.swarm.wait_epoch_change(epoch, 2 * self.swarm.config.timeouts.heartbeat_timeout)
        except DeadlineExceeded:
            pass  # same members (a transient fault): retry in this epoch

    def _attempt(self, get_batch: Optional[GetBatch]) -> StepRecord:
        t0, bytes0 = time.monotonic(), self._bytes()
        plan, recoveries = self._boundary()
        comm = self.swarm.comm.pinned(plan.epoch)
        me = self.swarm.id
        rec = StepRecord(step=max(plan.committed, 0), committed=False, epoch=plan.epoch, stage=self.stage,
                         members=plan.members, recoveries=recoveries, plan_s=time.monotonic() - t0)
        routes = route(plan, rec.step, self.M, self.order)
        module = self.stages[self.stage]
        module.train()
        self.edges.train(True)
        for p in module.parameters():
            p.grad = None
        self.edges.zero_grad()
        ex = Executor(comm, me, module, self.stage, self.specs, self.target_spec, self.order, self.loss_fn,
                      self.M, self.op_timeout, self.outgoing, self._forward)
        out = ex.run(routes, get_batch, rec.step, train=True)
        rec.compute_s, rec.wait_s, rec.micro_batches, rec.bad_peers = out.compute_s, out.wait_s, out.mine, \
            out.bad_peers
        t1 = time.monotonic()
        pre, post = self._reduce(comm, plan, out)
        rec.reduce_s = time.monotonic() - t1
        t2 = time.monotonic()
        vote = self._vote(comm, plan, out, pre, post)
        rec.vote_s = time.monotonic() - t2
        if vote is not None and vote[0] == 0 and int(vote[2]) == self.M:
            self._apply(plan, vote)
            rec.committed, rec.loss = True, float(vote[1] / self.M)
            rec.norms = list(self.last_norms)
        else:
            rec.reason = "; ".join(out.errors) or ("vote aborted" if vote is None else
                                                   f"{int(vote[0])} member(s) failed")
            self.steps_aborted += 1
            log.warning("%s: step %d attempt failed (epoch %d): %s", me, rec.step, plan.epoch, rec.reason[:300])
        for p in module.parameters():
            p.grad = None
        self.edges.zero_grad()
        rec.seconds, rec.bytes_sent, rec.t = time.monotonic() - t0, self._bytes() - bytes0, time.time()
        if rec.committed:
            for r in self.recoveries:
                if r.get("to_commit_s") is None:
                    r["to_commit_s"] = time.time() - r["t"]
        self.history.append(rec)
        if self.on_step is not None:
            self.on_step(rec)
        return rec

    def _reduce(self, comm: Any, plan: StepPlan, out: Outcome) -> tuple[float, float]:
        """Sum the stage's gradients over its replicas (always issued: lockstep), then norms and clipping."""
        params = list(self.stages[self.stage].parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        reps = plan.replicas[self.stage]
        summed = self.edges.summed(self.stage)    # edge layers: summed with their copies' gradients instead
        own = [p.grad for p in params if id(p) not in summed]
        if len(reps) > 1 and own:
            try:
                comm.group(reps).all_reduce_multiple(own, op="sum", timeout=self.op_timeout)
            except (OpAborted, DeadlineExceeded, LocalError) as exc:
                out.errors.append(f"{type(exc).__name__}: gradient all-reduce: {exc}")
        self.edges.reduce_grads(comm, plan, self.swarm.id, self.op_timeout, out.errors, self._bytes)
        if out.failed:
            return float("nan"), float("nan")
        pre = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        post = pre
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            post = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
        return pre, post

    def _vote(self, comm: Any, plan: StepPlan, out: Outcome, pre: float, post: float) -> Optional[np.ndarray]:
        """All members: (failures, loss sum, losses, per stage pre/post norm from its first replica)."""
        vec = np.zeros(3 + 2 * self.S, np.float64)
        vec[0] = 1.0 if out.failed else 0.0
        vec[1], vec[2] = out.loss_sum, out.losses
        if plan.leader(self.stage) == self.swarm.id and not out.failed:
            vec[3 + 2 * self.stage], vec[4 + 2 * self.stage] = pre, post
        try:
            comm.all_reduce(vec, op="sum", timeout=self.op_timeout)
        except (OpAborted, DeadlineExceeded, LocalError) as exc:
            out.errors.append(f"{type(exc).__name__}: commit vote: {exc}")
            return None
        return vec

    def _apply(self, plan: StepPlan, vote: np.ndarray) -> None:
        assert self.opt is not None
        for g, lr in zip(self.opt.param_groups, self.base_lr):
            g["lr"] = lr * float(self.meta[0])
        self.opt.step()
        self.committed = max(self.committed, 0) + 1
        self.last_norms = [(float(vote[3 + 2 * s]), float(vote[4 + 2 * s])) for s in range(self.S)]
        self.norms[:] = (*self.last_norms[self.stage], 0.0)

    # ------------------------------------------------------------------ the step boundary
    def _record(self) -> MemberRecord:
        return MemberRecord(self.stage, self.request, self.committed, self.edges.flags(self.stage))

    def _boundary(self, admit: bool = True) -> tuple[StepPlan, list[dict[str, Any]]]:
        """Gather, plan, recover. Pending joiners are admitted only at a training step's boundary
        (``admit``; a joiner's first call is ``step``, which must meet the members' ``step``, never an
        ``evaluate``), and there every ``admit_every`` committed steps, or at once when a stage needs a
        member's state (a lost stage takes a pending joiner before any replica moves). The decision is
        made from the gathered records and the op verdict's pending count: the same on every member."""
        sw = self.swarm
        while True:
            if len(sw.members) < max(2, self.S):
                raise NotEnoughPeers(f"{len(sw.members)} members for {self.S} stages")
            words, members, epoch = sw.comm.all_gather_members(self._record().encode(), self.op_timeout)
            records = {m: MemberRecord.decode(w, self.S) for m, w in zip(members, words)}
            plan = make_plan(epoch, members, records, self.S)
            if admit and sw.peers_pending and (plan.fresh or plan.needy or plan.committed % self.admit_every == 0):
                sw.update_topology(self.op_timeout)
                continue
            return plan, self._recover(plan)

    def _take_stage(self, s: int) -> None:
        """Serve stage ``s`` from now on: a fresh optimizer (its lazy state made now; zeros)."""
        params = list(self.stages[s].parameters())
        self.opt = self.make_opt(params)
        rs.materialize_optimizer(params, self.opt)
        self.base_lr = [float(g["lr"]) for g in self.opt.param_groups]
        self.stage, self.meta[:] = s, 1.0
        self.norms[:] = np.nan

    def start_at(self, stage: int, committed: int) -> None:
        """Before the first step: serve ``stage`` as of ``committed`` steps (a resume from snapshots: the
        caller loads the weights and optimizer state next, ``peer.train.pipeline_snapshots``)."""
        self._take_stage(stage)
        self.committed = committed

    def _recover(self, plan: StepPlan) -> list[dict[str, Any]]:
        """Give every member the state of the stage it is assigned, in the recovery order; the same
        sequence of sub-group ops on every member (each runs the ones it belongs to)."""
        me = self.swarm.id
        comm = self.swarm.comm.pinned(plan.epoch)
        mine = plan.assignment[me]
        if mine != self.stage:
            old = self.stage
            self._take_stage(mine)
            self.committed = NONE if not plan.fresh else self.committed
            log.info("%s: serving stage %d (was %s)", me, mine, old)
        done: list[dict[str, Any]] = []
        if plan.fresh:
            for s in range(self.S):
                if me in plan.replicas[s] and len(plan.replicas[s]) > 1:
                    rs.agree_initial(comm.group(plan.replicas[s]), self._state(), self.op_timeout)
            self.committed = 0
            return done + self.edges.refresh(comm, plan, me, self.op_timeout, self._bytes)
        for s in plan.lost:
            how, info = rebuild_stage(self, comm, plan, s)
            done.append(self._note(plan, s, how, **info))
        for s, needy in sorted(plan.needy.items()):
            if s in plan.lost or me not in plan.replicas[s]:
                continue
            t0 = time.monotonic()
            res = rs.copy_from_replicas(comm.group(plan.replicas[s]), self._state(), me in plan.sources[s],
                                        plan.committed, self.op_timeout)
            self.committed = plan.committed
            moved = [m for m, _a, b in plan.moves if b == s]
            how = "moved peer + replica copy" if moved else "replica copy"
            done.append(self._note(plan, s, how, needy=needy, seconds=time.monotonic() - t0,
                                   fetched=len(res.fetched), bytes=res.bytes_received))
        return done + self.edges.refresh(comm, plan, me, self.op_timeout, self._bytes)

    def _note(self, plan: StepPlan, s: int, how: str, **kw: Any) -> dict[str, Any]:
        joiners = [m for m in plan.needy.get(s, []) if m not in {mv for mv, _a, _b in plan.moves}]
        entry = {"stage": s, "how": how, "step": plan.committed, "epoch": plan.epoch, "t": time.time(),
                 "members": plan.replicas[s], "joiners": joiners,
                 "moved": [m for m, _a, b in plan.moves if b == s], "to_commit_s": None, **kw}
        if s == self.stage:
            self.recoveries.append(entry)
        return entry

    def _forward(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        """My stage at position ``pos`` (edge layers by position: ``peer.train.pipeline_copies``)."""
        return self.edges.forward(self.stage, pos, x)

    def _swap_partner(self, s: int) -> int:
        """The stage that runs in ``s``'s position on the swapped micro-batches (``s`` itself if none)."""
        a, b = list(self.order(0)), list(self.order(1))
        return b[a.index(s)] if a != b else s

    def evaluate(self, get_batch: GetBatch, micro_batches: int) -> Optional[float]:
        """Collective, forward only: the mean loss over ``micro_batches`` micro-batches ``get_batch(-1, m)``,
        on every member; None when the attempt failed (a member was lost: call again after the next step)."""
        try:
            plan, _ = self._boundary(admit=False)
            comm = self.swarm.comm.pinned(plan.epoch)
            routes = route(plan, 0, micro_batches, self.order)
            module = self.stages[self.stage]
            module.eval()
            self.edges.train(False)
            ex = Executor(comm, self.swarm.id, module, self.stage, self.specs, self.target_spec, self.order,
                          self.loss_fn, micro_batches, self.op_timeout, self.outgoing, self._forward)
            out = ex.run(routes, lambda _s, m: get_batch(-1, m), -1, train=False)
            module.train()
            self.edges.train(True)
            vec = np.array([1.0 if out.failed else 0.0, out.loss_sum, out.losses], np.float64)
            comm.all_reduce(vec, op="sum", timeout=self.op_timeout)
        except (OpAborted, DeadlineExceeded, NotEnoughPeers) as exc:
            log.warning("%s: evaluation failed: %s", self.swarm.id, exc)
            return None
        if vec[0] != 0 or int(vec[2]) != micro_batches:
            return None
        return float(vec[1] / micro_batches)

    # ------------------------------------------------------------------ state and stats
    def _state(self) -> Any:
        return rs.stage_state(self.stages[self.stage], self.opt, self.meta, max(self.committed, 0))

    def digest(self) -> str:
        """SHA-256 over my stage's weights and optimizer state (replicas of a stage must agree)."""
        h = hashlib.sha256(str(self.stage).encode())
        for hsh in self._state().hashes():
            h.update(hsh)
        return h.hexdigest()

    def _bytes(self) -> int:
        return int(self.swarm.stats["bytes_sent"])

    def copy_stats(self) -> dict[str, Any]:
        """The (de)embedding copies' extra memory and bytes at this peer (``Edges.stats``)."""
        return self.edges.stats(self.stage)

    @property
    def steps_committed(self) -> int:
        return max(self.committed, 0)


__all__ = ["ActivationError", "Pipeline", "StageLost", "StepRecord", "default_loss", "weights_digest"]
