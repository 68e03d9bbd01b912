"""The Python API: join a swarm and run collectives from an ordinary training loop.

    from peer import Swarm, with_retry
    swarm = Swarm.join(["coordhost:7000"], peer_id="alice")        # or Swarm.bootstrap(peer_id=...)
    swarm.wait_admitted(timeout=60)
    while training:
        if swarm.peers_pending:                     # identical on every member: safe to branch on
            swarm.update_topology()                 # admit joiners (a collective: all members call it)
        with_retry(swarm, lambda: swarm.comm.all_reduce(grad, op="avg"))
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np

from collectives import codecs, tensors
from collectives.errors import (DeadlineExceeded, LocalError, OpAborted, StaleError, TooFewPeers)
from peer.config import PeerConfig
from peer.handle import Handle
from peer.node import Node
from peer.core.ops import OpSpec
from peer.core.states import NodeState

T = TypeVar("T")
DEFAULT_TIMEOUT = 300.0


class Communicator:
    """Collectives over all members of the current epoch, or over a fixed sub-group."""

    def __init__(self, node: Node, group: Optional[tuple[str, ...]] = None, epoch: Optional[int] = None,
                 staging: Optional[dict[str, Any]] = None) -> None:
        self._node = node
        self._group = group
        self._epoch = epoch
        # CUDA tensors are staged through pinned host buffers (``peer.staging``); one pool, made on first
        # use (torch is imported only then), shared by every communicator derived from this one
        self._staging: dict[str, Any] = staging if staging is not None else {}

    def group(self, members: Sequence[str]) -> "Communicator":
        """A communicator over a subset of members (ring in epoch order). Every listed member must call
        the same ops on it in the same order."""
        return Communicator(self._node, tuple(members), self._epoch, self._staging)

    def pinned(self, epoch: int) -> "Communicator":
        """A communicator whose ops fail with ``PeerLost`` unless the swarm is still in ``epoch``: a protocol
        made of several ops then either runs entirely in one epoch or is restarted by every member."""
        return Communicator(self._node, self._group, epoch, self._staging)

    def _stage(self, ts: Sequence[Any], copy_in: bool = True) -> Any:
        """Host stand-ins for device (CUDA) tensors, from the reused pinned pool; None when all are on
        the host. The op runs on the stand-ins; ``_wrap`` copies the result back at commit."""
        if not any(type(t).__module__.startswith("torch") and t.device.type != "cpu" for t in ts):
            return None
        from peer.staging import StagingPool, stage

        if "pool" not in self._staging:
            self._staging["pool"] = StagingPool()
        return stage(self._staging["pool"], ts, copy_in=copy_in)

    @staticmethod
    def _wrap(handle: Handle, staged: Any, copy_out: bool = True) -> Handle:
        if staged is None:
            return handle
        from peer.staging import StagedHandle

        return StagedHandle(handle, staged, copy_out)

    # ------------------------------------------------------------------ async core
    def _submit(self, spec: OpSpec) -> Handle:
        node = self._node
        spec.epoch = self._epoch
        handle = Handle(spec.kind, on_timeout=self._abort, grace=node.t.verdict_timeout)
        node.call(node.submit_op, spec, handle)
        return handle

    def _abort(self, handle: Handle) -> None:
        node = self._node
        node.call(node.abort_op, handle, "caller deadline")

    @staticmethod
    def _views(ts: Sequence[Any]) -> tuple[list[np.ndarray], str]:
        views, names = zip(*(tensors.flat_view(t) for t in ts))
        if len(set(names)) != 1:
            raise LocalError("all tensors of one op must share a dtype")
        return list(views), names[0]

    def all_reduce_async(self, tensor: Any, op: str = "sum", codec: Optional[str] = None) -> Handle:
        return self.all_reduce_multiple_async([tensor], op, codec)

    def all_reduce_multiple_async(self, tensors_: Sequence[Any], op: str = "sum",
                                  codec: Optional[str] = None) -> Handle:
        if op not in tensors.REDUCE_OPS:
            raise LocalError(f"op must be one of {tensors.REDUCE_OPS}")
        views, dtype = self._views(tensors_)  # dtype checks first: nothing is staged for a refused op
        if codecs.get(codec) is not None and (dtype != "float32" or op not in ("sum", "avg")):
            raise LocalError("compressed all-reduce supports float32 sum/avg only")
        st = self._stage(tensors_)
        if st is not None:
            views, dtype = self._views(st.host)
        return self._wrap(self._submit(OpSpec("all_reduce", views, dtype, op, self._group, codec=codec)), st)

    def broadcast_async(self, tensor: Any, root: str) -> Handle:
        st = self._stage([tensor])
        views, dtype = self._views(st.host if st is not None else [tensor])
        return self._wrap(self._submit(OpSpec("broadcast", views, dtype, group=self._group, root=root)), st)

    def all_gather_async(self, tensor: Any) -> Handle:
        st = self._stage([tensor])
        views, dtype = self._views(st.host if st is not None else [tensor])
        return self._wrap(self._submit(OpSpec("all_gather", views, dtype, group=self._group)), st,
                          copy_out=False)

    def barrier_async(self) -> Handle:
        return self._submit(OpSpec("barrier", [np.zeros(0, np.float32)], "float32", group=self._group))

    def send_async(self, tensor: Any, to: str) -> Handle:
        st = self._stage([tensor])
        views, dtype = self._views(st.host if st is not None else [tensor])
        return self._wrap(self._submit(OpSpec("send", views, dtype, peer=to)), st, copy_out=False)

    def recv_async(self, tensor: Any, src: str) -> Handle:
        st = self._stage([tensor], copy_in=False)
        views, dtype = self._views(st.host if st is not None else [tensor])
        return self._wrap(self._submit(OpSpec("recv", views, dtype, peer=src)), st)

    # ------------------------------------------------------------------ blocking forms
    def all_reduce(self, tensor: Any, op: str = "sum", timeout: float = DEFAULT_TIMEOUT,
                   codec: Optional[str] = None) -> dict[str, Any]:
        """In place. Returns the op's metrics. Raises OpAborted (buffer untouched) or DeadlineExceeded.
        ``codec`` (fp16, bf16, int8) compresses the wire traffic; results stay bit-identical on every peer."""
        h = self.all_reduce_async(tensor, op, codec)
        h.wait(timeout)
        return h.metrics

    def all_reduce_multiple(self, tensors_: Sequence[Any], op: str = "sum",
                            timeout: float = DEFAULT_TIMEOUT, codec: Optional[str] = None) -> dict[str, Any]:
        """All-reduce many same-dtype tensors as one bucketed op (one verdict for all of them)."""
        h = self.all_reduce_multiple_async(tensors_, op, codec)
        h.wait(timeout)
        return h.metrics

    def broadcast(self, tensor: Any, root: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        h = self.broadcast_async(tensor, root)
        h.wait(timeout)
        return h.metrics

    @property
    def me(self) -> str:
        return self._node.id

    def all_gather(self, tensor: Any, timeout: float = DEFAULT_TIMEOUT) -> list[Any]:
        """Returns one array (or tensor, if given a tensor) per member, in ring order."""
        return self.all_gather_members(tensor, timeout)[0]

    def all_gather_members(self, tensor: Any, timeout: float = DEFAULT_TIMEOUT
                           ) -> tuple[list[Any], list[str], int]:
        """Like ``all_gather``, also returning the members (ring order) the blocks came from and the epoch."""
        h = self.all_gather_async(tensor)
        flat, members = h.wait(timeout)
        return self._blocks(tensor, flat, members), list(members), int(h.metrics["epoch"])

    @staticmethod
    def _blocks(tensor: Any, flat: np.ndarray, members: Sequence[str]) -> list[Any]:
        blocks = np.split(flat, len(members))
        if type(tensor).__module__.startswith("torch"):
            import torch

            if str(tensor.dtype) == "torch.bfloat16":
                out = [torch.from_numpy(b.view(np.int16)).view(torch.bfloat16).reshape(tensor.shape)
                       for b in blocks]
            else:
                out = [torch.from_numpy(b).reshape(tensor.shape) for b in blocks]
            return [b.to(tensor.device) for b in out] if tensor.device.type != "cpu" else out
        return [b.reshape(np.shape(tensor)) for b in blocks]

    def barrier(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.barrier_async().wait(timeout)

    def send(self, tensor: Any, to: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.send_async(tensor, to).wait(timeout)

    def recv(self, tensor: Any, src: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Receive into ``tensor`` (same shape and dtype as the sender's)."""
        self.recv_async(tensor, src).wait(timeout)


class Swarm:
    """One peer's membership in a swarm, and its communicator."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.node = Node(config).start()
        self.comm = Communicator(self.node)

    @classmethod
    def join(cls, addrs: Sequence[str], peer_id: Optional[str] = None, **kw: Any) -> "Swarm":
        return cls(PeerConfig(peer_id=peer_id or new_peer_id(), join=tuple(addrs), **kw))

    @classmethod
    def bootstrap(cls, peer_id: Optional[str] = None, **kw: Any) -> "Swarm":
        """Start a swarm: this peer also runs the coordinator role."""
        return cls(PeerConfig(peer_id=peer_id or new_peer_id(), coordinator=True, **kw))

    # ------------------------------------------------------------------ state (read from any thread)
    @property
    def id(self) -> str:
        return self.node.id

    @property
    def addr(self) -> str:
        return self.node.addr

    @property
    def epoch(self) -> int:
        return self.node.epoch

    @property
    def members(self) -> list[str]:
        return list(self.node.members)

    @property
    def state(self) -> str:
        """joining, pending, member, reforming, stale, coordinator, redirector or left (``peer.core.states``)."""
        return self.node.state.value

    @property
    def is_coordinator(self) -> bool:
        return self.node.coord is not None

    @property
    def peers_pending(self) -> int:
        """Joiners waiting, as carried by the last committed op's verdict: the same number on every member,
        so a loop may branch on it before calling ``update_topology``."""
        return int(self.node.engine.pending)

    @property
    def stats(self) -> dict[str, Any]:
        c = self.node.transport.counters
        return {"committed": self.node.engine.committed, "aborted": self.node.engine.aborted,
                "bytes_sent": c.bytes_sent, "bytes_received": c.bytes_received, "epoch": self.epoch,
                "members": self.members, "state": self.state}

    # ------------------------------------------------------------------ membership calls
    def wait_admitted(self, timeout: float = 60.0) -> None:
        """Block until this peer is a member of an epoch."""
        deadline = time.monotonic() + timeout
        with self.node.admitted:
            while self.node.state is not NodeState.MEMBER:
                if self.node.state is NodeState.STALE or self.node.error is not None:
                    raise StaleError(f"{self.id} could not join (state {self.node.state})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"not admitted within {timeout:.1f}s (state {self.node.state})")
                self.node.admitted.wait(min(left, 0.1))

    def wait_epoch_change(self, old_epoch: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.node.admitted:
            while self.node.epoch == old_epoch or self.node.state is not NodeState.MEMBER:
                if self.node.state is NodeState.STALE:
                    raise StaleError(f"{self.id} is stale")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"epoch did not change within {timeout:.1f}s")
                self.node.admitted.wait(min(left, 0.1))
        return self.node.epoch

    def wait_for_members(self, expect: int, timeout: float) -> None:
        """Collective loop: barriers (which carry the pending count) and topology updates until ``expect``
        members are in. Every member takes the same branches, so no one waits on a vote alone."""
        deadline = time.monotonic() + timeout
        while len(self.members) < expect:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"only {len(self.members)} of {expect} peers joined")
            try:
                if self.peers_pending:
                    self.update_topology(timeout=timeout)
                else:
                    self.comm.barrier(timeout=timeout)
            except TooFewPeers as exc:
                self.wait_for_partner(deadline, since=exc.epoch)  # alone: until someone joins (or the deadline)

    def wait_for_partner(self, deadline: float, since: int = -1) -> bool:
        """After ``TooFewPeers`` (alone, or a coordinator failover in progress): wait until the membership
        changes or ``deadline`` (a ``time.monotonic()`` value) passes. True: try the op again (the epoch
        changed, or this peer went stale and the next op raises ``StaleError``); False: the deadline passed
        and the caller gives up (e.g. discards its step). Local work stays valid while it waits.

        ``since``: the epoch the failed op saw (``TooFewPeers.epoch``). Pass it: the membership may change
        between the failure and this call, and a wait from the epoch read *now* would miss that change and
        sleep to its deadline (a lone first member whose partner was admitted in that gap, while the partner
        waits in a barrier for it)."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            self.wait_epoch_change(since if since >= 0 else self.epoch, left)
        except DeadlineExceeded:
            return False
        except StaleError:
            pass  # the next op says so, and the caller rejoins there
        return True

    def update_topology(self, timeout: float = 60.0) -> int:
        """Collective: every member calls it between steps; pending joiners are admitted. Returns the epoch."""
        h = Handle("update_topology")
        self.node.call(self.node.submit_topology, h)
        return int(h.wait(timeout))

    def rejoin(self, timeout: float = 60.0) -> None:
        """After a StaleError: ask to be admitted again (then resync any shared state)."""
        started = Handle("rejoin")
        self.node.call(self.node.submit_rejoin, started)
        started.wait(timeout)
        self.wait_admitted(timeout)

    def leave(self, timeout: float = 5.0) -> None:
        h = Handle("leave")
        self.node.call(self.node.submit_leave, h)
        h.wait(timeout)

    def close(self) -> None:
        if self.node.state in (NodeState.MEMBER, NodeState.PENDING):
            try:
                self.leave()
            except DeadlineExceeded:
                pass  # closing anyway; the coordinator will notice the link drop
        self.node.close()

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def with_retry(swarm: Swarm, fn: Callable[[], T], attempts: int = 5, epoch_wait: float = 30.0) -> T:
    """Run a collective; when it is aborted (a member was lost), wait for the new epoch and rerun it on
    the survivors. ``TooFewPeers`` and ``StaleError`` are not retried: the caller must decide."""
    last: Optional[OpAborted] = None
    for _ in range(attempts):
        epoch = swarm.epoch
        try:
            return fn()
        except TooFewPeers:
            raise
        except OpAborted as exc:
            last = exc
            if swarm.epoch == epoch:
                try:
                    swarm.wait_epoch_change(epoch, min(epoch_wait, swarm.config.timeouts.new_epoch_wait))
                except DeadlineExceeded:
                    pass  # same members (e.g. an op timed out): retry on the same epoch
    assert last is not None
    raise last


def new_peer_id() -> str:
    return "p-" + uuid.uuid4().hex[:10]
