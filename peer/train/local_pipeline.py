"""Pipeline stages on a peer that is a whole machine: K local processes, one swarm member (local rank 0).

The machine serves one stage of ``peer.train.pipeline`` as one member of the swarm; inside it, every
micro-batch that reaches the stage is split along its batch dimension across the K local ranks (data
parallel within the stage), so the stage's compute runs on K devices::

    group = LocalGroup.from_env(timeout=1800)             # RANK / WORLD_SIZE / MASTER_* from torchrun
    stages = make_stages(...)                              # all S stages, the same on every rank
    swarm = Swarm.join([...]) if group.is_leader else None
    with close_on_error(group, swarm):
        pipe = LocalPipeline(group, swarm, stages, make_optimizer, micro_batches=8, example=get_batch(0, 0))
        while pipe.committed < N:                          # the same on every rank
            loss = pipe.step(get_batch)                    # get_batch is called on rank 0 only
        pipe.finish()

Rank 0 runs the swarm's ``Pipeline`` unchanged (the boundary with its recovery and rebuilds, the
point-to-point activations, the replica gradient reduce, the commit vote, the optimizer step); the other
ranks follow its commands, broadcast by rank 0 over the machine's process group::

    SYNC     after every committed step, and at a step boundary after a recovery or a failed attempt: the
             stage rank 0 now serves and its weights (a broadcast: every rank holds them bit for bit);
             every rank drops its gradients and saved rows
    FWD      a micro-batch's input at one position: scattered (B/K rows per rank); each rank runs the stage
             on its rows (keeping the graph when training); the outputs gathered on rank 0, concatenated
    BWD      the gradient of that output: scattered; each rank backpropagates its rows (the stage's weight
             gradients accumulate on every rank); the input gradients gathered on rank 0 (float inputs)
    REDUCE   before the replica all-reduce: the stage's weight gradients summed over the ranks onto rank 0
    DONE     the step's result (committed steps, the mean loss) to every rank
    FAILED   rank 0's step raised: every other rank stops with ``LocalGroupFailed``

On rank 0 the split is one ``torch.autograd.Function`` around the stage's forward, so the Executor, the loss
and the backward schedule are the swarm pipeline's own. Every loss is computed on rank 0 over the whole
micro-batch, so the scattered output gradients are exact and the ranks' weight gradients **sum** to the
micro-batch's gradient (REDUCE sums; a DDP mean would be wrong here). Only rank 0 holds an optimizer; the
other ranks receive the stepped weights in the SYNC that ends each committed step, so when ``step`` returns
every rank holds the same committed weights.

Requirements, checked on every rank: the micro-batch size divides by K; the stages treat rows independently
(no batch norm); no CheckFree+ edge-layer copies (``copy_every`` > 0 with a swapped order: those copies and
their gradients would need their own local protocol; not built). The identity order with edge layers works.

Failure: a local rank that dies breaks rank 0's next scatter, gather or reduce (Gloo/NCCL raise on a closed
connection, at the latest at the group's timeout); the error leaves ``pipe.step`` and ``close_on_error`` makes
rank 0 leave the swarm: the swarm sees one peer leave and its step is retried on the new membership. If
rank 0's step raises for any other reason it broadcasts FAILED first, so the other ranks stop at once (if
it raised in the middle of a micro-batch's compute, while they wait in that command's gather, they fail when
rank 0's process exits and its connections close, at the latest at the group's timeout). The
group's timeout must exceed the longest wait of the other ranks: a whole step of rank 0, including its
waits for peers (``join_timeout``) and retries.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from collectives.errors import LocalError
from peer.swarm import Swarm
from peer.train.local_group import LocalGroup, LocalGroupFailed
from peer.train.pipeline import OptimizerFactory, Pipeline
from peer.train.pipeline_copies import Edges
from peer.train.pipeline_exec import GetBatch
from peer.train.pipeline_plan import NONE, identity_order

log = logging.getLogger(__name__)

SYNC, FWD, BWD, REDUCE, DONE, FAILED = 1, 2, 3, 4, 5, 6
HEAD = 16                                   # int64 words of a command header
MAX_DIMS = HEAD - 6
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32]


class LocalPipeline:
    """``Pipeline`` for a machine of ``group.size`` local ranks; the same call on every rank (``swarm`` and
    ``pipeline_kw`` matter on rank 0 only; the other ranks pass ``swarm=None``). ``pipeline_kw``: Pipeline's
    keyword arguments (``loss_fn``, ``stage``, ``order``, ``max_grad_norm``, ``rebuild``, timeouts, ...)."""

    def __init__(self, group: LocalGroup, swarm: Optional[Swarm], stages: Sequence[torch.nn.Module],
                 optimizer: OptimizerFactory, *, micro_batches: int, example: tuple[torch.Tensor, torch.Tensor],
                 **pipeline_kw: Any) -> None:
        if group.is_leader != (swarm is not None):
            raise LocalError("local rank 0 (and only rank 0) passes the swarm")
        rows = int(example[0].shape[0])
        if rows % group.size:
            raise LocalError(f"a micro-batch of {rows} rows does not split over {group.size} local ranks")
        self.group, self.stages, self.K = group, list(stages), group.size
        self.edges = Edges(self.stages, pipeline_kw.get("order") or identity_order(len(self.stages)),
                           micro_batches, pipeline_kw.get("copy_every"))
        if self.edges.edges:
            raise LocalError("CheckFree+ edge-layer copies are not supported on a local group "
                             "(pass copy_every=0, or the identity order)")
        self.stage, self.committed, self.loss = NONE, NONE, float("nan")
        self.syncs = 0                              # SYNC commands seen (every rank)
        self.rows = 0                               # micro-batch rows this rank ran forward while training
        self.fresh = False                          # rank 0: the ranks hold my weights, no grads, no rows
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # id -> (my input rows, my output)
        self._next = 0
        self._broken = False                        # a collective of the machine failed: no FAILED broadcast
        self.pipe: Optional[Pipeline] = None
        if swarm is not None:
            self.pipe = _LeadPipeline(self, swarm, self.stages, optimizer, micro_batches=micro_batches,
                                      example=example, **pipeline_kw)

    # ------------------------------------------------------------------ the loop, on every rank
    def step(self, get_batch: Optional[GetBatch]) -> float:
        """One committed step of the swarm's pipeline (rank 0 runs it; the others serve its commands until
        it is done). Returns the step's mean loss on every rank."""
        if self.pipe is None:
            return self._serve()
        pipe = self.pipe
        return self._lead(lambda: pipe.step(get_batch), sync_after=True)

    def evaluate(self, get_batch: GetBatch, micro_batches: int) -> Optional[float]:
        """``Pipeline.evaluate`` on rank 0 (forward only, split the same way); its result on every rank."""
        if self.pipe is None:
            loss = self._serve()
            return None if np.isnan(loss) else loss
        pipe = self.pipe
        out = self._lead(lambda: pipe.evaluate(get_batch, micro_batches), sync_after=False)
        return None if np.isnan(out) else out

    def finish(self) -> None:
        """Every rank: rank 0's current stage weights to every rank (the last committed step's)."""
        if self.pipe is None:
            self._serve()
        else:
            self._lead(lambda: None, sync_after=True)

    def _lead(self, fn: Callable[[], Optional[float]], sync_after: bool) -> float:
        """Rank 0: ``fn``, then (``sync_after``) its stage weights to every rank, then DONE; FAILED first
        when ``fn`` raises (unless the machine's group itself broke)."""
        try:
            loss = fn()
            if sync_after:
                self._sync()
        except Exception:
            if not self._broken:
                self._command(FAILED)
            raise
        value = float("nan") if loss is None else float(loss)
        assert self.pipe is not None
        self.loss = value
        self._command(DONE, self.committed, int(np.float64(value).view(np.int64)))
        return value

    def _serve(self) -> float:
        """The other ranks: run rank 0's commands until DONE (returns its loss) or FAILED (raises)."""
        while True:
            head = self._head()
            cmd = int(head[0])
            if cmd == SYNC:
                self._load(int(head[1]), int(head[2]))
            elif cmd == FWD:
                self._forward_rows(head)
            elif cmd == BWD:
                self._backward_rows(int(head[1]), bool(head[2]), None)
            elif cmd == REDUCE:
                self._reduce_grads()
            elif cmd == DONE:
                self.committed, self.loss = int(head[1]), float(np.int64(head[2]).view(np.float64))
                return self.loss
            elif cmd == FAILED:
                raise LocalGroupFailed(f"local rank 0 failed; local rank {self.group.rank} stops")
            else:
                raise LocalError(f"unknown local pipeline command {cmd}")

    # ------------------------------------------------------------------ machine collectives
    def _collective(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except Exception:
            self._broken = True
            raise

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.group.device) if self.group.backend == "nccl" else t

    def _command(self, cmd: int, *words: int) -> None:
        head = np.zeros(HEAD, np.int64)
        head[0], head[1:1 + len(words)] = cmd, words
        self._collective(self.group.broadcast_, head)

    def _head(self) -> np.ndarray:
        head = np.zeros(HEAD, np.int64)
        self._collective(self.group.broadcast_, head)
        return head

    def _params(self) -> list[torch.nn.Parameter]:
        return list(self.stages[self.stage].parameters()) if self.stage != NONE else []

    def _flat_by_dtype(self, tensors: list[torch.Tensor], fn: Callable[[torch.Tensor], None],
                       write_back: bool) -> None:
        """``fn`` on one flat buffer per dtype (insertion order: the same on every rank); copied back."""
        buckets: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault(t.dtype, []).append(t)
        for ts in buckets.values():
            flat = self._dev(torch.cat([t.detach().reshape(-1) for t in ts]))
            self._collective(fn, flat)
            if write_back:
                off = 0
                with torch.no_grad():
                    for t in ts:
                        t.copy_(flat[off:off + t.numel()].view_as(t))
                        off += t.numel()

    # ------------------------------------------------------------------ SYNC
    def _sync(self) -> None:
        """Rank 0: its stage and weights to every rank; every rank drops gradients and saved rows."""
        assert self.pipe is not None
        self.stage, self.committed = self.pipe.stage, self.pipe.committed
        self._command(SYNC, self.stage, self.committed)
        self._load(self.stage, self.committed)
        self.fresh = True

    def _load(self, stage: int, committed: int) -> None:
        self.stage, self.committed = stage, committed
        self._saved.clear()
        self.syncs += 1
        params = self._params()
        self._flat_by_dtype([p.data for p in params], lambda t: dist.broadcast(t, src=0),
                            write_back=not self.group.is_leader)   # rank 0 sent its own bytes
        for p in params:
            p.grad = None

    # ------------------------------------------------------------------ FWD / BWD / REDUCE
    def split_forward(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        """Rank 0: the stage at ``pos`` on ``x``, its rows computed across the machine (autograd-aware)."""
        if x.dim() > MAX_DIMS or x.dtype not in DTYPES:
            raise LocalError(f"an activation of {x.dim()} dims / {x.dtype} cannot cross the local group")
        if x.shape[0] % self.K:
            raise LocalError(f"a micro-batch of {x.shape[0]} rows does not split over {self.K} local ranks")
        train = torch.is_grad_enabled()
        self.fresh = False
        ident = self._next
        self._next += 1
        self._command(FWD, ident, pos, int(train), x.dim(), DTYPES.index(x.dtype), *x.shape)
        if not train:
            return self._forward_mine(ident, pos, False, x)
        dummy = torch.zeros(0, requires_grad=True)   # the graph reaches the Function even for integer inputs
        out: torch.Tensor = _Split.apply(self, ident, pos, x, dummy)
        return out

    def _forward_mine(self, ident: int, pos: int, train: bool, x: Optional[torch.Tensor],
                      shape: Optional[tuple[int, ...]] = None, dtype: Optional[torch.dtype] = None
                      ) -> torch.Tensor:
        """Every rank: receive my rows of the input (rank 0 scatters ``x``), run the stage, gather."""
        leader = x is not None
        if leader:
            assert x is not None
            parts = [self._dev(c.contiguous()) for c in x.detach().chunk(self.K)]
            mine = torch.empty_like(parts[0])
        else:
            assert shape is not None and dtype is not None
            mine = self._dev(torch.empty((shape[0] // self.K, *shape[1:]), dtype=dtype))
            parts = None
        self._collective(dist.scatter, mine, parts, src=0)
        module = self.stages[self.stage]
        module.train(train)
        with torch.set_grad_enabled(train):
            if train and mine.is_floating_point():
                mine.requires_grad_(True)
            out = self.edges.forward(self.stage, pos, mine)
        if train:
            self._saved[ident] = (mine, out)
            self.rows += int(mine.shape[0])
        rows = out.detach().contiguous()
        gathered = [torch.empty_like(rows) for _ in range(self.K)] if leader else None
        self._collective(dist.gather, rows, gathered, dst=0)
        if not leader:
            return rows
        assert gathered is not None and x is not None
        return torch.cat(gathered).to(x.device)

    def _forward_rows(self, head: np.ndarray) -> None:
        ident, pos, train, ndim, code = (int(v) for v in head[1:6])
        if not 0 <= code < len(DTYPES) or not 0 < ndim <= MAX_DIMS:
            raise LocalError(f"bad FWD command {head.tolist()}")
        shape = tuple(int(v) for v in head[6:6 + ndim])
        self._forward_mine(ident, pos, bool(train), None, shape, DTYPES[code])

    def _backward_rows(self, ident: int, want_input: bool, grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Every rank: my rows of the output gradient (rank 0 scatters ``grad``), backward, gather the input
        gradient rows onto rank 0 when the input is floating point."""
        x, out = self._saved.pop(ident)
        leader = grad is not None
        parts = [self._dev(c.contiguous()) for c in grad.chunk(self.K)] if grad is not None else None
        g = torch.empty_like(out)
        self._collective(dist.scatter, g, parts, src=0)
        torch.autograd.backward(out, g)
        if not want_input:
            return None
        gx = (x.grad if x.grad is not None else torch.zeros_like(x)).contiguous()
        gathered = [torch.empty_like(gx) for _ in range(self.K)] if leader else None
        self._collective(dist.gather, gx, gathered, dst=0)
        return torch.cat(gathered) if gathered is not None else None

    def _reduce_grads(self) -> None:
        """Every rank: the stage's weight gradients summed onto rank 0 (zeros for a rank without one)."""
        params = self._params()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._flat_by_dtype([p.grad for p in params if p.grad is not None],
                            lambda t: dist.reduce(t, dst=0, op=dist.ReduceOp.SUM), write_back=self.group.is_leader)


class _Split(torch.autograd.Function):
    """Rank 0's view of a stage run across the machine: forward = FWD, backward = BWD."""

    @staticmethod
    def forward(ctx: Any, lp: LocalPipeline, ident: int, pos: int, x: torch.Tensor,  # type: ignore[override]
                dummy: torch.Tensor) -> torch.Tensor:
        ctx.lp, ctx.ident, ctx.device = lp, ident, x.device
        return lp._forward_mine(ident, pos, True, x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        lp: LocalPipeline = ctx.lp
        want = bool(ctx.needs_input_grad[3])
        lp._command(BWD, ctx.ident, int(want))
        gx = lp._backward_rows(ctx.ident, want, grad.contiguous())
        return None, None, None, (gx.to(ctx.device) if gx is not None else None), None


class _LeadPipeline(Pipeline):
    """Rank 0's Pipeline: the stage's forward split across the machine, the machine's gradients summed
    before the replica all-reduce, the stage's weights to every rank at each step boundary."""

    def __init__(self, lp: LocalPipeline, *args: Any, **kw: Any) -> None:
        self.lp = lp
        super().__init__(*args, **kw)

    def _boundary(self, admit: bool = True) -> Any:
        plan, recoveries = super()._boundary(admit)
        lp = self.lp
        if recoveries or not lp.fresh or (self.stage, self.committed) != (lp.stage, lp.committed):
            lp._sync()
        return plan, recoveries

    def _forward(self, pos: int, x: torch.Tensor) -> torch.Tensor:
        return self.lp.split_forward(pos, x)

    def _reduce(self, comm: Any, plan: Any, out: Any) -> tuple[float, float]:
        self.lp.fresh = False
        self.lp._command(REDUCE)
        self.lp._reduce_grads()
        return super()._reduce(comm, plan, out)
