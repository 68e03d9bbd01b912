"""Host staging for device (CUDA) tensors in swarm collectives: pinned buffers reused across ops.

The swarm's collectives run on host memory (the ring, the codecs and the wire are CPU code over numpy
views). A CUDA tensor is *staged*: before the op its bytes are copied into a page-locked host buffer
(fast DMA), the op runs on that buffer, and only when the op commits is the result copied back into the
CUDA tensor — an aborted op leaves the device tensor exactly as it was (I2), like a host tensor.

Buffers come from a ``StagingPool`` keyed by (dtype, number of elements) and go back to it after the op,
so a training loop that syncs the same tensors every round allocates pinned memory once, not per op
(``pool.stats`` counts allocations and reuses). A buffer whose op's fate is unknown (the caller's wait
timed out: the op may still commit into it later) is never reused; it is dropped from the pool.

    pool = StagingPool()                          # pinned when CUDA is available
    staged = stage(pool, [grad_cuda])             # copy-in; staged.host: CPU tensors of the same shapes
    handle = comm.all_reduce_multiple_async(staged.host)
    StagedHandle(handle, staged).wait(60)         # on commit: copy-out into grad_cuda, buffers back

``peer.swarm.Communicator`` does this for every CUDA tensor given to it (the integration patch).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from collectives.errors import DeadlineExceeded, LocalError
from peer.handle import Handle

log = logging.getLogger(__name__)

DEFAULT_MAX_IDLE_BYTES = 4 << 30


class StagingPool:
    """Reusable host buffers (1-D CPU tensors), pinned when ``pin`` (default: CUDA is available).
    ``max_idle_bytes`` bounds what idle buffers may hold; beyond it a released buffer is freed."""

    def __init__(self, pin: Optional[bool] = None, max_idle_bytes: int = DEFAULT_MAX_IDLE_BYTES) -> None:
        self.pin = torch.cuda.is_available() if pin is None else pin
        if self.pin and not torch.cuda.is_available():
            raise LocalError("pinned host memory needs CUDA")
        self.max_idle_bytes = max_idle_bytes
        self._idle: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self._idle_bytes = 0
        self._lock = threading.Lock()
        self.stats = {"allocations": 0, "reuses": 0, "dropped": 0}

    def acquire(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        key = (dtype, numel)
        with self._lock:
            free = self._idle.get(key)
            if free:
                buf = free.pop()
                self._idle_bytes -= _nbytes(buf)
                self.stats["reuses"] += 1
                return buf
            self.stats["allocations"] += 1
        return torch.empty(numel, dtype=dtype, pin_memory=self.pin)

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            if self._idle_bytes + _nbytes(buf) > self.max_idle_bytes:
                return  # freed by the garbage collector
            self._idle.setdefault((buf.dtype, buf.numel()), []).append(buf)
            self._idle_bytes += _nbytes(buf)

    def drop(self, buf: torch.Tensor) -> None:
        """A buffer that must not be reused (an op may still write into it): not kept in the pool."""
        with self._lock:
            self.stats["dropped"] += 1

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def needs_staging(tensors: Sequence[Any]) -> bool:
    """Whether any of these is a torch tensor outside host memory. Mixing host and device tensors in one
    op is allowed; only the device ones are staged."""
    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tensors)


@dataclass
class Staged:
    """The host side of one op over ``device`` tensors: ``host[i]`` stands in for ``device[i]``."""
    pool: StagingPool
    device: list[Any]
    host: list[Any]
    buffers: list[Optional[torch.Tensor]] = field(default_factory=list)   # None: not staged (host tensor)
    finished: bool = False

    def copy_out(self) -> None:
        """After commit: the results into the device tensors (then the buffers may be reused)."""
        streams = set()
        for dev, host, buf in zip(self.device, self.host, self.buffers):
            if buf is not None:
                dev.copy_(host, non_blocking=self.pool.pin)
                if dev.device.type == "cuda":
                    streams.add(dev.device)
        for d in streams:  # the buffers go back to the pool only after their DMA finished
            torch.cuda.current_stream(d).synchronize()

    def release(self, reusable: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        for buf in self.buffers:
            if buf is not None:
                (self.pool.release if reusable else self.pool.drop)(buf)


def stage(pool: StagingPool, tensors: Sequence[Any], copy_in: bool = True, always: bool = False) -> Staged:
    """Host stand-ins for ``tensors``: device tensors get a pool buffer (filled with their bytes when
    ``copy_in``; a recv needs none); host tensors and arrays stand for themselves. ``always`` stages host
    tensors too (tests of the pool on machines without CUDA)."""
    st = Staged(pool, list(tensors), [])
    streams = set()
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.device.type != "cpu" or always):
            if not t.is_contiguous():
                raise LocalError("tensor must be contiguous")
            buf = pool.acquire(t.numel(), t.dtype)
            if copy_in:
                buf.copy_(t.detach().reshape(-1), non_blocking=pool.pin)
                if t.device.type == "cuda":
                    streams.add(t.device)
            st.buffers.append(buf)
            st.host.append(buf.view(t.shape))
        else:
            st.buffers.append(None)
            st.host.append(t)
    for d in streams:  # the op's I/O thread reads the buffers: the copies must have landed
        torch.cuda.current_stream(d).synchronize()
    return st


class StagedHandle(Handle):
    """An op's handle over staged tensors: ``wait`` copies the committed result out to the device tensors
    (``copy_out=False`` for ops that do not write their input: send, all-gather) and gives the buffers
    back. An abort gives them back untouched; a timeout drops them (the op's fate is unknown).
    A ``Handle`` itself, so callers that keep handles (DiLoCo's eager mode) need no change."""

    def __init__(self, handle: Any, staged: Staged, copy_out: bool = True) -> None:
        self.handle, self.staged, self.copy_out = handle, staged, copy_out
        super().__init__(getattr(handle, "kind", "op"))

    @property  # type: ignore[override]
    def metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = self.handle.metrics
        return m

    @metrics.setter
    def metrics(self, value: dict[str, Any]) -> None:
        pass  # the inner handle's metrics are the op's (``Handle.__init__`` sets an empty dict)

    def done(self) -> bool:
        return bool(self.handle.done())

    def wait(self, timeout: float) -> Any:
        try:
            value = self.handle.wait(timeout)
        except DeadlineExceeded:
            log.warning("%s: wait timed out; its staging buffers are not reused", self.kind)
            self.staged.release(reusable=False)
            raise
        except Exception:  # aborted (or failed) for good: nothing was written; the buffers are free
            self.staged.release()
            raise
        if not self.staged.finished:
            if self.copy_out:
                self.staged.copy_out()
            self.staged.release()
        return value
