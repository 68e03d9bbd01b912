"""One attempt of one pipeline step on one peer: its micro-batches forward, then backward (GPipe order), with
activations and gradients over the swarm's point-to-point send/recv.

Lockstep rule: every peer issues exactly the point-to-point ops that the routes give it, in the same order,
whether or not the attempt has already failed (after a failure it sends zeros and skips the compute), so
that the per-pair op sequences of the epoch never drift apart; a membership change makes every later op of
the attempt (all pinned to its epoch) fail at once. Per micro-batch, the first-position peer sends the
targets to the last-position peer first, then its activation.

Received tensors land in buffers of the declared shape and dtype (inferred from the stages on an example
micro-batch); a peer that sends another size or dtype breaks the op's wire check: the receiver gets
``ActivationError`` and the swarm evicts the sender (a protocol fault).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from collectives.errors import DeadlineExceeded, LocalError, OpAborted, RemoteError

log = logging.getLogger(__name__)

GetBatch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]   # (step, micro-batch) -> (inputs, targets)
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ActivationError(RemoteError):
    """A peer sent an activation or gradient that is not the declared shape/dtype (the peer is dropped)."""

    def __init__(self, peer: str, what: str) -> None:
        super().__init__(f"bad {what} from {peer}")
        self.peer = peer


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def empty(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype)

    def check(self, t: torch.Tensor, what: str) -> None:
        if tuple(t.shape) != self.shape or t.dtype != self.dtype:
            raise LocalError(f"{what} is {tuple(t.shape)} {t.dtype}, declared {self.shape} {self.dtype}")


@dataclass
class Outcome:
    """What one peer saw in one attempt."""
    errors: list[str] = field(default_factory=list)    # "<Type>: message" of every failure (empty: fine)
    bad_peers: list[str] = field(default_factory=list)  # peers that sent wrong-shaped data
    loss_sum: float = 0.0
    losses: int = 0                                     # micro-batches whose loss this peer computed
    mine: int = 0                                       # micro-batches this peer processed
    compute_s: float = 0.0
    wait_s: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(self.errors)


@dataclass
class _Ctx:
    pos: int
    route: Sequence[str]
    x: torch.Tensor
    out: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None


def module_device(module: torch.nn.Module) -> torch.device:
    """Where the module's parameters live (CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class Executor:
    """Runs the micro-batches of one attempt for the peer ``me`` serving stage ``stage``."""

    def __init__(self, comm: Any, me: str, module: torch.nn.Module, stage: int,
                 specs: Callable[[int], list[Spec]], target_spec: Spec, order: Callable[[int], Sequence[int]],
                 loss_fn: LossFn, micro_batches: int, timeout: float,
                 outgoing: Callable[[torch.Tensor, str], torch.Tensor],
                 forward: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None) -> None:
        self.comm, self.me, self.module, self.stage = comm, me, module, stage
        # (position, input) -> output: the stage run at a position (edge layers go by position)
        self.forward: Callable[[int, torch.Tensor], torch.Tensor] = forward or (lambda _p, x: module(x))
        self.specs, self.target_spec, self.order = specs, target_spec, order
        self.loss_fn, self.M, self.timeout, self.outgoing = loss_fn, micro_batches, timeout, outgoing
        self.out = Outcome()
        self._sends: list[tuple[Any, torch.Tensor, str]] = []
        self.device = module_device(module)   # inputs and targets go here; the wire carries host tensors

    # ------------------------------------------------------------------ wire
    def _fail(self, exc: BaseException) -> None:
        self.out.errors.append(f"{type(exc).__name__}: {exc}")

    def _send(self, t: torch.Tensor, to: str, what: str) -> None:
        t = self.outgoing(t.detach().to("cpu").contiguous(), what)
        try:
            self._sends.append((self.comm.send_async(t, to), t, to))
        except (OpAborted, LocalError) as exc:
            self._fail(exc)

    def _recv(self, spec: Spec, src: str, what: str) -> torch.Tensor:
        buf = spec.empty()
        t0 = time.perf_counter()
        try:
            h = self.comm.recv_async(buf, src)
            h.wait(self.timeout)
        except OpAborted as exc:
            if "bad data from" in str(exc):
                err = ActivationError(src, f"{what} ({exc.reason or exc})")
                self.out.bad_peers.append(src)
                self._fail(err)
            else:
                self._fail(exc)
        except (DeadlineExceeded, LocalError) as exc:
            self._fail(exc)
        self.out.wait_s += time.perf_counter() - t0
        return buf

    def finish_sends(self) -> None:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        for h, _t, _to in self._sends:
            try:
                h.wait(max(0.1, deadline - time.monotonic()))
            except (OpAborted, DeadlineExceeded) as exc:
                self._fail(exc)
        self._sends = []
        self.out.wait_s += time.perf_counter() - t0

    # ------------------------------------------------------------------ the schedule
    def run(self, routes: Sequence[Sequence[str]], get_batch: Optional[GetBatch], step: int,
            train: bool) -> Outcome:
        ctxs: dict[int, _Ctx] = {}
        for m, r in enumerate(routes):
            if self.me in r:
                ctxs[m] = self._forward(m, r, get_batch, step, train)
        if train:
            for m in sorted(ctxs):
                self._backward(m, ctxs[m])
        self.finish_sends()
        self.out.mine = len(ctxs)
        return self.out

    def _forward(self, m: int, r: Sequence[str], get_batch: Optional[GetBatch], step: int,
                 train: bool) -> _Ctx:
        p = r.index(self.me)
        last = p == len(r) - 1
        specs = self.specs(m)
        y: Optional[torch.Tensor] = None
        if p == 0:
            if get_batch is None:
                raise LocalError("the first stage's peers need get_batch")
            x, y = get_batch(step, m)
            specs[0].check(x, "get_batch inputs")
            self.target_spec.check(y, "get_batch targets")
            if not last and r[-1] != self.me:
                self._send(y, r[-1], "targets")
        else:
            if last:
                y = self._recv(self.target_spec, r[0], "targets")
            x = self._recv(specs[p], r[p - 1], "activation")
        x = x.to(self.device)
        if y is not None:
            y = y.to(self.device)
        if p > 0 and train and x.is_floating_point():
            x.requires_grad_(True)
        ctx = _Ctx(p, r, x)
        t0 = time.perf_counter()
        if not self.out.failed:
            with torch.set_grad_enabled(train):
                out = self.forward(p, x)
                if last:
                    assert y is not None
                    ctx.loss = self.loss_fn(out, y)
                    if torch.isfinite(ctx.loss):
                        self.out.loss_sum += float(ctx.loss.detach())
                        self.out.losses += 1
                    else:
                        self._fail(LocalError(f"micro-batch {m}: loss is {float(ctx.loss)}"))
                else:
                    ctx.out = out
                    specs[p + 1].check(out, f"stage {self.stage} output")
        self.out.compute_s += time.perf_counter() - t0
        if not last:
            self._send(ctx.out if ctx.out is not None else specs[p + 1].empty(), r[p + 1], "activation")
        return ctx

    def _backward(self, m: int, ctx: _Ctx) -> None:
        p, r = ctx.pos, ctx.route
        last = p == len(r) - 1
        specs = self.specs(m)
        grad: Optional[torch.Tensor] = None
        if not last:
            grad = self._recv(specs[p + 1], r[p + 1], "gradient")
        t0 = time.perf_counter()
        if not self.out.failed:
            if last:
                assert ctx.loss is not None
                (ctx.loss / self.M).backward()
            else:
                assert ctx.out is not None and grad is not None
                ctx.out.backward(grad.to(self.device))
        self.out.compute_s += time.perf_counter() - t0
        if p > 0:
            g = ctx.x.grad if (ctx.x.grad is not None and not self.out.failed) else specs[p].empty()
            self._send(g, r[p - 1], "gradient")
        ctx.out = ctx.loss = None   # free the graph
