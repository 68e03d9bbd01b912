"""DiLoCo: train one model across the swarm with infrequent, fault-tolerant syncs.

Keep the training loop; wrap the optimizer (usage: docs/diloco.md)::

    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), 1e-3), swarm, inner_steps=50)
    ... opt.step(samples=len(x)); opt.zero_grad() ...; opt.finish()   # finish: every member, at the end

Every ``inner_steps`` steps the peers average their pseudo-gradients (outer weights − local weights, weighted
by the samples each peer processed since its last sync) and apply an outer SGD step (Nesterov by default) to
the outer weights, which then replace the model's weights. Outer weights and outer momentum are flat float32
numpy buffers on the CPU, bit-identical on every peer: all-reduce results are bit-identical on every member,
and the outer step is a fixed sequence of elementwise numpy operations (no FMA contraction, no reductions).

One sync point (``_round``), the same on every member::

    finish the in-flight round (eager mode)      -> commit its outer step, or discard
    if peers_pending: update_topology()           (identical on every member: carried by op verdicts)
    _exchange():                                  <- a peer admitted by that update starts here (``_enter``)
        _sync_state()    shared-state sync of (outer weights, momentum, revision): hashes, then only what
                         differs; a member whose state was replaced contributes nothing this round
        all-reduce [w]                      exact: the total weight W (0: nothing to average, skip)
        all-reduce (w / W) * pseudo-gradient with the chosen codec: the weighted average
        outer step on the committed average; load the outer weights into the model

Faults: an aborted all-reduce leaves its buffer untouched and the pair is retried on the survivors
(``with_retry``); the outer step runs only on a committed result. When no commit is possible (alone:
``TooFewPeers``, retries exhausted, a deadline) the local steps are discarded and the model is reset to the
last outer weights — never a half-applied update. A ``StaleError`` (evicted after a stall) rejoins and
enters like a joiner.

Modes:
- ``sync``: the above.
- ``eager``: the all-reduce of round t runs in the background during the inner steps of round t+1
  ("Eager Updates For Overlapped Communication and Computation in DiLoCo", Kale, Douillard, Donchev 2025).
  The shared outer state advances by the committed average one round late; meanwhile each peer starts its
  next inner phase from a *tentative* outer step (never committed) whose pseudo-gradient is its own share
  of its fresh one plus the others' part of the last committed average:
  ``proxy_t = s * Δ_t(me) + (avg_{t-1} − s_{t-1} * Δ_{t-1}(me))``, s = my weight share.
- ``streaming``: the parameters are split into ``fragments`` contiguous groups; a sync point comes every
  ``inner_steps / fragments`` steps and syncs one fragment (revision mod fragments), so each fragment is
  synced every ``inner_steps`` steps and the bytes per sync drop by the number of fragments
  (Streaming DiLoCo, Douillard et al. 2025, without its overlap).

Codecs for the pseudo-gradient all-reduce: none, fp16, bf16, int8 (``collectives.codecs``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from collectives import codecs
from collectives.errors import DeadlineExceeded, LocalError, OpAborted
from peer.handle import Handle
from peer.logs import peer_log
from peer.swarm import Swarm, with_retry
from peer.train.rounds import admit_then, guarded, sync_agreed
from peer.train.outer import flatten_params, fragment_bounds, load_params, outer_sgd, state_digest, weight_scale
from recovery.shared_state import SharedState
from recovery.snapshot import Snapshot
from recovery.snapshot_writer import Snapshotter, load_outer, outer_specs

MODES = ("sync", "eager", "streaming")


# ============================================================================ records

@dataclass
class RoundRecord:
    """One sync point as this peer saw it. ``committed``: an outer step was applied to the shared state."""
    kind: str                        # sync | eager | streaming | entry (a joiner's first sync)
    revision: int                    # the shared state's revision after this round
    committed: bool = False
    digest: str = ""                 # hex digest of (outer weights, momentum) after this round
    members: list[str] = field(default_factory=list)  # ring order of the average that committed
    samples: float = 0.0             # total weight W of the committed average
    my_samples: float = 0.0          # my weight in it (0: I had just taken the state, or discarded)
    fragment: int = 0
    adopted: bool = False            # my state differed from the swarm's and was replaced
    retried: bool = False            # a member was lost mid-sync; the survivors averaged without it
    reason: str = ""                 # why nothing was committed
    bytes_sent: int = 0              # bytes this peer's transport sent during the round
    seconds: float = 0.0
    t: float = 0.0


@dataclass(frozen=True)
class DiLoCoConfig:
    """DiLoCo's options (``DiLoCo(model, inner, swarm, DiLoCoConfig(...))`` or the same names as keywords)."""
    inner_steps: int = 100            # H: local steps between syncs
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    codec: Optional[str] = None       # pseudo-gradient all-reduce: None/"none", fp16, bf16, int8
    mode: str = "sync"                # sync | eager | streaming
    fragments: int = 1                # streaming: parameter fragments (>= 2, dividing inner_steps)
    op_timeout: float = 600.0         # deadline of one collective of a sync
    join_timeout: float = 600.0       # admission, and a joiner's first sync (waiting for a partner)
    alone_wait: float = 10.0          # alone at a sync: wait this long for a partner, then discard

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise LocalError(f"mode must be one of {MODES}, not {self.mode!r}")
        codecs.get(self.codec)  # raises LocalError for an unknown codec
        if self.inner_steps < 1:
            raise LocalError("inner_steps must be at least 1")
        if self.mode == "streaming":
            if self.fragments < 2 or self.inner_steps % self.fragments:
                raise LocalError("streaming needs fragments >= 2 that divide inner_steps")
        elif self.fragments != 1:
            raise LocalError("fragments > 1 needs mode='streaming'")
        if min(self.op_timeout, self.join_timeout) <= 0 or self.alone_wait < 0:
            raise LocalError("op_timeout and join_timeout must be positive, alone_wait not negative")


@dataclass
class _InFlight:
    """The eager mode's background all-reduce of one round."""
    handle: Handle
    buf: np.ndarray        # (n,) (w / W) * my pseudo-gradient, reduced in place
    mine: np.ndarray       # (n,) my pseudo-gradient
    w: float
    total: float
    rec: RoundRecord
    t0: float
    bytes0: int
    members: list[str]


# ============================================================================ the optimizer wrapper

class DiLoCo:
    """Wrap ``inner_optimizer`` (any torch optimizer over ``model``'s parameters) with DiLoCo outer steps.

    Construction blocks until this peer holds the swarm's outer state (a joiner catches up here, before its
    first inner step). LR schedulers attach to the inner optimizer as usual. Model buffers (e.g. batch-norm
    statistics) stay local; only parameters are synchronized."""

    def __init__(self, model: torch.nn.Module, inner_optimizer: torch.optim.Optimizer, swarm: Swarm,
                 config: Optional[DiLoCoConfig] = None, *,
                 on_round: Optional[Callable[[RoundRecord], None]] = None,
                 snapshots: Optional[Snapshotter] = None, resume: Optional[Snapshot] = None,
                 **options: Any) -> None:
        """``config`` holds the options (``DiLoCoConfig``); each may also be given as a keyword
        (``inner_steps=50, mode="eager"``), which overrides the config's value.

        ``snapshots``: after every committed outer step, offer the outer weights and momentum (per
        parameter name) to this background writer (``docs/snapshots.md``). ``resume``: start from this
        snapshot's outer state and revision (verified; the shared-state sync keeps a newer live state)."""
        unknown = set(options) - {f.name for f in dataclasses.fields(DiLoCoConfig)}
        if unknown:
            raise LocalError(f"DiLoCo got unknown option(s) {sorted(unknown)}")
        cfg = dataclasses.replace(config or DiLoCoConfig(), **options)
        self.params = list(model.parameters())
        if not self.params:
            raise LocalError("the model has no parameters")
        self.config = cfg
        self.model, self.inner, self.swarm = model, inner_optimizer, swarm
        self.log = peer_log(__name__, swarm.id)
        self.H, self.mode, self.codec = cfg.inner_steps, cfg.mode, None if cfg.codec in (None, "none") else cfg.codec
        self.lr, self.mu, self.nesterov = cfg.outer_lr, cfg.outer_momentum, cfg.nesterov
        self.op_timeout, self.join_timeout, self.alone_wait = cfg.op_timeout, cfg.join_timeout, cfg.alone_wait
        self.on_round = on_round
        self.frags = fragment_bounds([p.numel() for p in self.params], cfg.fragments)
        self.interval = cfg.inner_steps // cfg.fragments
        # the shared state: never rebound (the shared-state sync writes into these arrays)
        self.theta = flatten_params(self.params)                    # (N,) outer weights
        self.mom = np.zeros_like(self.theta)                        # (N,) outer momentum
        self.state = SharedState({"theta": self.theta, "mom": self.mom})
        self.revision = 0
        self.has_state = False                                      # until the first sync
        self.digest = state_digest(self.theta, self.mom)
        # local progress
        self.start = self.theta                                     # where this inner phase began
        self.samples = np.zeros(len(self.frags), np.float64)        # per fragment, since its last sync
        self.steps_since = 0
        self.inner_step_count = 0
        self.history: list[RoundRecord] = []
        self.faults = 0                                             # syncs that lost a member, or discarded
        # eager mode
        self.inflight: Optional[_InFlight] = None
        self.prev_avg: Optional[np.ndarray] = None                  # last committed average
        self.prev_mine: Optional[np.ndarray] = None                 # my part of it (share * my pseudo-grad)
        self.share = 0.0
        # snapshots (docs/snapshots.md)
        self.snapshots = snapshots
        self.param_names = [n for n, _ in model.named_parameters()]
        self.param_shapes = [tuple(p.shape) for p in self.params]
        if resume is not None:
            self._resume(resume)
        self._enter()

    def _resume(self, snap: Snapshot) -> None:
        """Hold the snapshot's state before the entry sync: it votes with its revision (highest legal
        revision wins), so it becomes the swarm's state unless a live state is newer."""
        theta, mom, revision = load_outer(snap, self.param_names, self.param_shapes)
        self.theta[...], self.mom[...] = theta, mom
        self.revision, self.has_state = revision, True
        self.digest = state_digest(self.theta, self.mom)
        load_params(self.params, self.theta)
        self.log.info("resuming from snapshot %s (revision %d)", snap.path, revision)

    # ------------------------------------------------------------------ the optimizer interface
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], Any]] = None, *, samples: float = 1.0) -> Any:
        """One inner step; every ``inner_steps`` (streaming: ``inner_steps / fragments``) steps a sync.
        ``samples``: how much this step counts in the weighted average (e.g. the batch size)."""
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self.inner_step_count += 1
        self.steps_since += 1
        self.samples += samples
        if self.steps_since >= self.interval:
            self._round()
        return loss

    def finish(self) -> None:
        """End of training, called by every member: commit (or discard) the eager mode's in-flight round,
        then load the outer weights into the model (local steps since the last sync are dropped)."""
        if self.inflight is not None:
            self._guarded(self._finish_inflight)
        self._reset_all()

    # ------------------------------------------------------------------ checkpoints
    STATE_VERSION = 1

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs: the outer weights and outer momentum (copies, as CPU float32 tensors), the
        shared revision, the inner optimizer's ``state_dict()`` and this peer's inner step count. Local steps
        since the last sync (and an eager round still in flight) are not part of it: a restored peer resumes
        from the outer weights, as after ``finish()``. Only tensors, numbers and strings, so
        ``torch.save(opt.state_dict(), f)`` and torch's weights-only loader work."""
        return {"version": self.STATE_VERSION,
                "theta": torch.from_numpy(self.theta.copy()),        # (N,) outer weights
                "momentum": torch.from_numpy(self.mom.copy()),       # (N,) outer momentum
                "revision": self.revision, "digest": self.digest.hex(),
                "inner": self.inner.state_dict(), "inner_step_count": self.inner_step_count,
                "mode": self.mode, "inner_steps": self.H, "fragments": len(self.frags)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``: outer weights, momentum, revision and the inner optimizer; the model
        takes the outer weights. Everything is checked (version, sizes, the digest of weights and momentum)
        before anything changes; a bad checkpoint raises ``LocalError`` and leaves this optimizer as it was.

        In a swarm the loaded state is this peer's, not yet the swarm's: at the next sync a peer that loaded
        a checkpoint into a running swarm takes the swarm's state (it does not vote, like a joiner), while a
        swarm whose members all loaded the same checkpoint (a restart) agrees on it. An eager round in
        flight is finished first (the other members are in it too)."""
        if state.get("version") != self.STATE_VERSION:
            raise LocalError(f"DiLoCo state version {state.get('version')!r}, expected {self.STATE_VERSION}")
        theta, mom = (np.ascontiguousarray(torch.as_tensor(state[k]).detach().cpu().numpy(), np.float32)
                      .reshape(-1) for k in ("theta", "momentum"))
        if theta.size != self.theta.size or mom.size != self.mom.size:
            raise LocalError(f"checkpoint holds {theta.size} weights and {mom.size} momenta, the model has "
                             f"{self.theta.size} parameters")
        if int(state.get("fragments", 1)) != len(self.frags):
            raise LocalError(f"checkpoint made with {state.get('fragments')} fragments, this optimizer has "
                             f"{len(self.frags)}")
        if state_digest(theta, mom).hex() != state.get("digest"):
            raise LocalError("checkpoint weights and momentum do not match its digest (corrupt or edited)")
        revision, steps = int(state["revision"]), int(state.get("inner_step_count", 0))
        if revision < 0 or steps < 0:
            raise LocalError(f"negative revision {revision} or step count {steps} in the checkpoint")
        if self.inflight is not None:
            self._guarded(self._finish_inflight)
        self.inner.load_state_dict(state["inner"])    # raises (ValueError) before ours changes on a mismatch
        np.copyto(self.theta, theta)                   # in place: the shared state owns these arrays
        np.copyto(self.mom, mom)
        self.revision = self.state.revision = revision
        self.inner_step_count = steps
        self.digest = state_digest(self.theta, self.mom)
        self.has_state = False                         # receive-only at the next sync (see above)
        self.prev_avg = self.prev_mine = None
        self._reset_all()

    # ------------------------------------------------------------------ sync points
    def _enter(self) -> None:
        """Before the first inner step: wait for admission, then do what members do right after
        ``update_topology()`` returns (``_exchange``). A joiner's state differs, so it takes the swarm's."""
        self.swarm.wait_admitted(self.join_timeout)
        self._guarded(lambda: self._exchange(entry=True), entry=True)

    def _round(self) -> None:
        self.steps_since = 0
        if self.inflight is not None:
            self._guarded(self._finish_inflight)
        self._guarded(self._topology_and_exchange)

    def _topology_and_exchange(self) -> None:
        admit_then(self.swarm, self.op_timeout, self._exchange)

    def _guarded(self, fn: Callable[[], None], entry: bool = False) -> None:
        """``peer.train.rounds.guarded``: nothing is half-applied on any path."""
        guarded(self.swarm, fn, entry=entry, enter=lambda: self._exchange(entry=True), discard=self._discard,
                join_timeout=self.join_timeout, alone_wait=self.alone_wait)

    # ------------------------------------------------------------------ the exchange
    def _exchange(self, entry: bool = False) -> None:
        t0, bytes0 = time.monotonic(), self._bytes()
        adopted = with_retry(self.swarm, self._sync_state)
        frag = self.revision % len(self.frags)
        lo, hi = self.frags[frag]
        w = 0.0 if adopted else float(self.samples[frag])
        rec = RoundRecord(kind="entry" if entry else self.mode, revision=self.revision, fragment=frag,
                          adopted=adopted, my_samples=w)
        mine = np.zeros(hi - lo, np.float32)                         # (n,) start - local
        if w > 0:
            np.subtract(self.start[lo:hi], flatten_params(self.params)[lo:hi], out=mine)
        members = self.swarm.members
        if self.mode == "eager":
            self._launch(mine, w, rec, t0, bytes0, members)
            return
        total, avg, metrics = with_retry(self.swarm, lambda: self._average(mine, w))
        self._apply(total, avg, lo, hi, rec, metrics, members)
        self._reset_local(lo, hi, frag)
        self._record(rec, t0, bytes0)

    def _sync_state(self) -> bool:
        """Make every member hold the agreed outer state (weights, momentum, revision) with the shared-state
        sync (``recovery.shared_state``: hashes first, then only differing tensors, verified, from several
        sources). Returns whether this peer's state changed; then its local steps were not made from the
        agreed state, so they are dropped and it contributes nothing this round.

        Who votes, and how a brand-new swarm agrees: ``peer.train.rounds.sync_agreed``."""
        before = self.digest
        self.revision = sync_agreed(self.swarm, self.state, self.revision, self.has_state, self.op_timeout)
        self.has_state = True
        self.digest = state_digest(self.theta, self.mom)
        if self.digest == before:
            return False
        self.prev_avg = self.prev_mine = None
        self._reset_all()
        self.log.info("took the swarm's outer state (revision %d)", self.revision)
        return True

    def _average(self, mine: np.ndarray, w: float, background: bool = False) -> tuple[float, Any, Any]:
        """Two all-reduces in one epoch: the total weight W (exact, float32 sum of sample counts), then my
        pseudo-gradient scaled by w / W (with the codec), whose sum is the weighted average. Returns (W,
        average, metrics) — or (W, buffer, handle) in the background. W == 0 (no one has local steps):
        nothing to average, on every member alike. The second op is pinned to the first one's epoch, so if
        a member is lost in between, every survivor reruns the pair (``with_retry``)."""
        wb = np.array([w], np.float32)
        epoch = self.swarm.comm.all_reduce(wb, op="sum", timeout=self.op_timeout)["epoch"]
        if wb[0] <= 0:
            return 0.0, None, {}
        buf = np.multiply(mine, weight_scale(w, wb[0]))
        comm = self.swarm.comm.pinned(epoch)
        if background:
            return float(wb[0]), buf, comm.all_reduce_async(buf, op="sum", codec=self.codec)
        metrics = comm.all_reduce(buf, op="sum", timeout=self.op_timeout, codec=self.codec)
        return float(wb[0]), buf, metrics

    def _apply(self, total: float, avg: Optional[np.ndarray], lo: int, hi: int, rec: RoundRecord,
               metrics: dict[str, Any], members_before: list[str]) -> None:
        """The outer step on a committed average (fragment [lo, hi))."""
        rec.samples = total
        if avg is None:
            rec.reason = "nothing to average (no member had local steps)"
            return
        rec.members = list(metrics.get("members", []))
        if rec.members != members_before:
            rec.retried = True   # a member was lost mid-sync; the survivors committed without it
            self.faults += 1
        outer_sgd(self.theta[lo:hi], self.mom[lo:hi], avg, self.lr, self.mu, self.nesterov,
                  np.empty_like(avg))
        self.revision += 1
        self.digest = state_digest(self.theta, self.mom)
        rec.committed = True

    # ------------------------------------------------------------------ eager mode
    def _launch(self, mine: np.ndarray, w: float, rec: RoundRecord, t0: float, bytes0: int,
                members: list[str]) -> None:
        """Start this round's average in the background, and begin the next inner phase from a tentative
        outer step: my share of my fresh pseudo-gradient plus the others' part of the last average."""
        total, buf, handle = with_retry(self.swarm, lambda: self._average(mine, w, background=True))
        if buf is None:
            rec.reason = "nothing to average (no member had local steps)"
            self._reset_all()
            self._record(rec, t0, bytes0)
            return
        self.inflight = _InFlight(handle, buf, mine, w, total, rec, t0, bytes0, members)
        proxy = np.multiply(mine, weight_scale(w, np.float32(total)))
        if self.prev_avg is not None and self.prev_mine is not None:
            np.add(proxy, self.prev_avg, out=proxy)
            np.subtract(proxy, self.prev_mine, out=proxy)
        theta, mom = self.theta.copy(), self.mom.copy()
        outer_sgd(theta, mom, proxy, self.lr, self.mu, self.nesterov, np.empty_like(theta))
        load_params(self.params, theta)
        self.start = theta
        self.samples[:] = 0

    def _finish_inflight(self) -> None:
        """Wait for the background average (rerun it on the survivors if a member was lost) and commit the
        outer step; if it cannot commit, discard and go back to the outer weights."""
        fl = self.inflight
        if fl is None:
            return
        self.inflight = None
        total, avg = fl.total, fl.buf
        try:
            try:
                fl.handle.wait(self.op_timeout)
                metrics = fl.handle.metrics
            except OpAborted:  # every survivor got the same verdict and reruns the average here
                total, avg, metrics = with_retry(self.swarm, lambda: self._average(fl.mine, fl.w))
        except (OpAborted, DeadlineExceeded) as exc:
            self._discard(f"in-flight round: {type(exc).__name__}: {exc}")
            return
        self._apply(total, avg, 0, self.theta.size, fl.rec, metrics, fl.members)
        if fl.rec.committed:
            self.share = float(weight_scale(fl.w, np.float32(total)))
            self.prev_avg = avg
            self.prev_mine = np.multiply(fl.mine, np.float32(self.share))
        else:
            self.prev_avg = self.prev_mine = None
        self._record(fl.rec, fl.t0, fl.bytes0)

    # ------------------------------------------------------------------ local state
    def _discard(self, reason: str) -> None:
        """No commit was possible: drop the local steps, go back to the last outer weights."""
        self.faults += 1
        self.log.warning("sync failed (%s); discarding local steps, back to revision %d",
                    reason, self.revision)
        self.inflight = None
        self.prev_avg = self.prev_mine = None
        self._reset_all()
        self._record(RoundRecord(kind=self.mode, revision=self.revision, reason=reason), time.monotonic(),
                     self._bytes())

    def _reset_all(self) -> None:
        load_params(self.params, self.theta)
        self.start = self.theta
        self.samples[:] = 0

    def _reset_local(self, lo: int, hi: int, frag: int) -> None:
        """After a round: the synced part of the model takes the outer weights again."""
        if self.mode == "streaming":
            load_params(self.params, self.theta, lo, hi)
            self.samples[frag] = 0
        else:
            self._reset_all()

    def _bytes(self) -> int:
        return int(self.swarm.stats["bytes_sent"])

    def _record(self, rec: RoundRecord, t0: float, bytes0: int) -> None:
        rec.revision, rec.digest = self.revision, self.digest.hex()
        rec.bytes_sent, rec.seconds, rec.t = self._bytes() - bytes0, time.monotonic() - t0, time.time()
        self.history.append(rec)
        if self.snapshots is not None and rec.committed:  # a copy now; the disk write runs in a thread
            self.snapshots.capture(self.revision, outer_specs(self.param_names, self.param_shapes, self.theta,
                                                              self.mom), meta={"peer": self.swarm.id})
        if self.on_round is not None:
            self.on_round(rec)
