"""Collective ops inside a peer: issue, feed chunks, ask for the verdict, apply on commit.

The engine lives in the node's I/O thread and owns no sockets. Every entry point returns the actions it wants
done (``peer.core.actions``: ``Data`` to a peer, ``ToCoordinator``, ``Suspect``), and the node applies them in
one place, then calls ``flush()``: the parity checksums of the slices just forwarded are computed after the
sends went out, while the bytes are warm. So one all-reduce reads top to bottom: ``issue`` (the first sends)
-> ``on_chunk`` per received slice (reduce, forward) -> ``OpDone`` to the coordinator -> ``on_verdict``
(commit: the one write into the caller's buffer). Results are computed into private buffers; the caller's
buffers are written only when the verdict is *commit* (I2: an aborted op leaves them untouched).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from collectives import codecs, ring, wire
from collectives.errors import (LocalError, OpAborted, OpTimeout, PeerLost, ProtocolError, RemoteError,
                                TooFewPeers, WireError)
from peer.core.actions import Action, Data, Suspect, ToCoordinator
from peer.handle import Handle

log = logging.getLogger(__name__)

WORLD = "w"
MAX_EARLY_ABORTS = 256
RESEND_S = 1.0        # an OpDone / OpFail without a verdict after this long is sent again
EARLY_OVERHEAD = 512  # bytes charged per early chunk held (beyond its payload) against max_early_bytes


@dataclass
class OpSpec:
    """What the user asked for (built in the user thread, run in the I/O thread)."""
    kind: str                   # all_reduce | all_gather | broadcast | barrier | send | recv
    views: list[np.ndarray]     # flat numpy views of the caller's buffers (one per tensor)
    dtype: str = "float32"
    reduce_op: str = "sum"
    group: Optional[tuple[str, ...]] = None  # None: every member of the epoch
    root: str = ""
    peer: str = ""
    codec: Optional[str] = None  # all_reduce only: fp16 | bf16 | int8 (lossy, still bit-identical everywhere)
    epoch: Optional[int] = None  # run only in this epoch (a multi-op protocol must not straddle epochs)


@dataclass
class OpRecord:
    spec: OpSpec
    core: Any                   # a collectives.ring op, or None for barrier
    handle: Handle
    key: tuple[int, str, int]
    members: tuple[str, ...]
    work: np.ndarray
    started: float
    last_progress: float
    state: str = "running"      # running -> awaiting (verdict) -> done; or failing -> done
    request: Optional[wire.Message] = None  # the OpDone / OpFail sent for it (re-sent until a verdict)
    asked: float = 0.0
    completed: bool = False     # failing, but our part had finished (a commit verdict is still valid)
    metrics: dict[str, Any] = field(default_factory=dict)


class BufferPool:
    """Reuses scratch arrays across ops: fresh large allocations cost page faults on every op."""

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.free: dict[tuple[str, int], list[np.ndarray]] = {}
        self.bytes = 0
        self.max_bytes = max_bytes

    def take(self, n: int, dtype: Any) -> np.ndarray:
        dt = np.dtype(dtype)
        bufs = self.free.get((dt.str, n))
        if bufs:
            buf = bufs.pop()
            self.bytes -= buf.nbytes
            return buf
        return np.empty(n, dt)

    def give(self, buf: np.ndarray) -> None:
        if self.bytes + buf.nbytes <= self.max_bytes:
            self.free.setdefault((buf.dtype.str, buf.size), []).append(buf)
            self.bytes += buf.nbytes


class OpEngine:
    def __init__(self, me: str, slice_bytes: int, parity_digest: bool, max_early_bytes: int,
                 clock: Optional[Callable[[], float]] = None, owns_payloads: bool = False) -> None:
        self.me = me
        # The driver's promise that every chunk payload it hands over is a buffer nobody else references
        # (``Transport.private_payloads``): an all-reduce then sums into it in place (``ring.RingOp``).
        self.owns_payloads = owns_payloads
        self._clock = clock  # the driver's clock, read only for metrics (None: the op's last progress time)
        self.slice_bytes = slice_bytes
        self.parity_digest = parity_digest
        self.max_early_bytes = max_early_bytes
        self._out: list[Action] = []      # what the current entry point asks the driver to do
        self._unflushed: list[Any] = []   # ring cores with slices to checksum once their sends went out
        self.ops: dict[tuple[int, str, int], OpRecord] = {}
        self.early: dict[tuple[int, str, int], list[tuple[str, wire.Chunk, Any]]] = {}
        self.early_bytes = 0
        # abort verdicts for ops we have not issued yet (the others failed them first): issuing one fails at
        # once, so we stay in step with the others instead of waiting out a deadline on a dead op
        self.early_aborts: collections.OrderedDict[tuple[int, str, int], str] = collections.OrderedDict()
        self.seq: dict[str, int] = {}
        self.last_kind = ""  # of the last op issued here (the driver's read-holding rule looks at it)
        self.epoch = 0
        self.term = 0
        self.members: list[str] = []
        self.pending = 0            # joiners waiting, as of the last committed verdict (same on all members)
        self.recent_committed: collections.deque[str] = collections.deque(maxlen=256)
        self.history: collections.deque[dict[str, Any]] = collections.deque(maxlen=10000)
        self.committed = 0
        self.aborted = 0
        self.pool = BufferPool()

    # ------------------------------------------------------------------ membership changes
    def _take(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _send(self, to: str, msg: wire.Message, payload: Any) -> None:
        self._out.append(Data(to, msg, payload))

    def _to_coord(self, msg: wire.Message) -> None:
        self._out.append(ToCoordinator(msg))

    def _suspect(self, peer: str, reason: str) -> None:
        self._out.append(Suspect(peer, reason))

    def flush(self) -> None:
        """Checksum the slices forwarded by the actions just applied (call after applying them)."""
        cores, self._unflushed = self._unflushed, []
        for core in cores:
            core.flush()

    def new_epoch(self, term: int, epoch: int, members: list[str], reason: str) -> list[Action]:
        self.term, self.epoch, self.members = term, epoch, list(members)
        self.seq.clear()
        self.early_aborts.clear()
        self.pending = 0  # every member of the new epoch starts from the same count
        for key, rec in list(self.ops.items()):
            if key[0] < epoch:
                self._finish(rec, PeerLost(f"op {wire.op_key(*key)} aborted: {reason}", epoch=key[0],
                                           reason=reason, key=wire.op_key(*key)))
        for key in [k for k in self.early if k[0] < epoch]:
            self._drop_early(key)
        return self._take()

    def fail_all(self, error_factory: Callable[[], BaseException]) -> list[Action]:
        for rec in list(self.ops.values()):
            self._finish(rec, error_factory())
        return self._take()

    @property
    def running(self) -> bool:
        """Whether an op here still moves data (the driver reads sealed data only then)."""
        return any(r.state == "running" for r in self.ops.values())

    def awaiting_keys(self) -> list[str]:
        return [wire.op_key(*k) for k, r in self.ops.items()
                if r.state == "awaiting" or (r.state == "failing" and r.completed)]  # may have committed

    # ------------------------------------------------------------------ issuing
    def issue(self, spec: OpSpec, handle: Handle, now: float) -> list[Action]:
        try:
            self._issue(spec, handle, now)
        except (LocalError, OpAborted) as exc:
            handle.fail(exc)
        return self._take()

    def _issue(self, spec: OpSpec, handle: Handle, now: float) -> None:
        if spec.epoch is not None and spec.epoch != self.epoch:
            raise PeerLost(f"{spec.kind} pinned to epoch {spec.epoch}, but the swarm is in epoch {self.epoch}",
                           epoch=spec.epoch, reason="membership changed")
        if spec.kind in ("send", "recv"):
            if spec.peer not in self.members or spec.peer == self.me:
                raise LocalError(f"{spec.peer!r} is not another member of epoch {self.epoch}")
            src, dst = (self.me, spec.peer) if spec.kind == "send" else (spec.peer, self.me)
            members: tuple[str, ...] = (src, dst)
            gid = ring.group_id(members, "p")
        else:
            if spec.group is None:
                members, gid = tuple(self.members), WORLD
            else:
                missing = [m for m in spec.group if m not in self.members]
                if missing or self.me not in spec.group:
                    raise LocalError(f"group members {missing or [self.me]} are not in epoch {self.epoch}")
                members = tuple(m for m in self.members if m in spec.group)
                gid = ring.group_id(members)
            if len(members) < 2:
                raise TooFewPeers(f"{spec.kind} needs at least 2 members, epoch {self.epoch} has "
                                  f"{len(members)}", epoch=self.epoch, reason="too few peers")
        seq = self.seq.get(gid, 0)
        self.seq[gid] = seq + 1
        self.last_kind = spec.kind
        key = (self.epoch, gid, seq)
        if key in self.early_aborts:
            reason = self.early_aborts.pop(key)
            self._drop_early(key)
            raise OpAborted(f"op {wire.op_key(*key)} aborted before it started here: {reason}",
                            epoch=self.epoch, reason=reason, key=wire.op_key(*key))
        opid = ring.OpId(*key)
        work = spec.views[0] if len(spec.views) == 1 else np.concatenate(spec.views)
        core: Any
        in_place = spec.kind == "all_reduce" and len(spec.views) == 1
        small = ring.direct(work.nbytes, len(members), spec.reduce_op, spec.dtype)
        if spec.kind == "all_reduce" and codecs.get(spec.codec) is None and small:
            core = ring.DirectAllReduce(opid, list(members), self.me, work, spec.dtype, spec.reduce_op,
                                        self.slice_bytes)
        elif spec.kind == "all_reduce":
            core = ring.AllReduce(opid, list(members), self.me, work, spec.dtype, spec.reduce_op,
                                  self.slice_bytes, out=work if in_place else None, codec=codecs.get(spec.codec))
        elif spec.kind == "all_gather":
            core = ring.AllGather(opid, list(members), self.me, work, spec.dtype, self.slice_bytes)
        elif spec.kind == "broadcast":
            if spec.root not in members:
                raise LocalError(f"broadcast root {spec.root!r} is not a member")
            core = ring.Broadcast(opid, list(members), self.me, spec.root, work, spec.dtype, self.slice_bytes)
        elif spec.kind in ("send", "recv"):
            core = ring.PointToPoint(opid, self.me, members[0], members[1], work, spec.dtype, self.slice_bytes)
        elif spec.kind == "barrier":
            core = None
        else:
            raise LocalError(f"unknown op kind {spec.kind}")
        rec = OpRecord(spec, core, handle, key, members, work, now, now)
        self.ops[key] = rec
        if core is not None:
            core.alloc = self.pool.take
            core.checksum = self.parity_digest
            core.owns_payloads = self.owns_payloads
            for s in core.start():
                self._send(s.to, s.msg, s.payload)
            self._unflushed.append(core)
        for sender, msg, payload in self._take_early(key):
            if key not in self.ops:
                break
            self._feed(rec, sender, msg, payload, now)
        self._check_done(rec, now)

    # ------------------------------------------------------------------ data
    def landing(self, sender: str, msg: wire.Chunk) -> Optional[np.ndarray]:
        """Where the plaintext of this (authentic, not yet delivered) chunk may be decrypted: a slice of its
        running op's scratch that no data occupies yet, or None (a fresh buffer; early data, other ops)."""
        rec = self.ops.get((msg.epoch, msg.group, msg.seq))
        land = getattr(rec.core, "landing", None) if rec is not None else None
        return land(sender, msg) if land is not None else None

    def on_chunk(self, sender: str, msg: wire.Chunk, payload: Any, now: float) -> list[Action]:
        self._on_chunk(sender, msg, payload, now)
        return self._take()

    def _on_chunk(self, sender: str, msg: wire.Chunk, payload: Any, now: float) -> None:
        key = (msg.epoch, msg.group, msg.seq)
        rec = self.ops.get(key)
        if rec is not None:
            self._feed(rec, sender, msg, payload, now)
            self._check_done(rec, now)
            return
        if msg.epoch < self.epoch or (msg.epoch == self.epoch and msg.seq < self.seq.get(msg.group, 0)):
            return  # stale: never applied
        # Far ahead is a fault only for a peer that has an epoch: a joiner (epoch 0) can be sent data of the
        # epoch that admits it before that EpochUpdate arrives on the control connection. Either way the
        # early-data budget bounds what is held.
        if (self.epoch and msg.epoch > self.epoch + 16) or \
                (msg.epoch == self.epoch and msg.seq > self.seq.get(msg.group, 0) + 64):
            self._suspect(sender, f"protocol: chunk for op {wire.op_key(*key)} far ahead")
            return
        size = (len(payload) if payload is not None else 0) + EARLY_OVERHEAD  # empty chunks count too
        if self.early_bytes + size > self.max_early_bytes:
            self._suspect(sender, "protocol: too much early data")
            return
        self.early_bytes += size
        self.early.setdefault(key, []).append((sender, msg, payload))

    def on_ack(self, sender: str, msg: wire.P2PAck, now: float) -> list[Action]:
        self._on_ack(sender, msg, now)
        return self._take()

    def _on_ack(self, sender: str, msg: wire.P2PAck, now: float) -> None:
        rec = self.ops.get((msg.epoch, msg.group, msg.seq))
        if rec is None or not isinstance(rec.core, ring.PointToPoint):
            return
        try:
            rec.core.on_ack(sender)
        except ProtocolError as exc:
            self._suspect(sender, f"protocol: {exc}")
            return
        self._check_done(rec, now)

    def _feed(self, rec: OpRecord, sender: str, msg: wire.Chunk, payload: Any, now: float) -> None:
        if rec.state != "running":
            return
        if sender not in rec.members:  # not the op's fault: an outsider must not be able to abort it
            self._suspect(sender, f"protocol: data for op {wire.op_key(*rec.key)}, of which it is no member")
            return
        try:
            if rec.core is None:
                raise ProtocolError(f"data for {rec.spec.kind} op {wire.op_key(*rec.key)}, which carries none")
            sends = rec.core.on_chunk(sender, msg, payload)
        except (ProtocolError, WireError) as exc:
            self._suspect(sender, f"protocol: {exc}")
            self._request_abort(rec, f"bad data from {sender}: {exc}", now)
            return
        rec.last_progress = now
        for s in sends:
            self._send(s.to, s.msg, s.payload)
        self._unflushed.append(rec.core)

    def _check_done(self, rec: OpRecord, now: float) -> None:
        if rec.state != "running" or (rec.core is not None and not rec.core.done):
            return
        if isinstance(rec.core, ring.PointToPoint):
            if not rec.core.sending:
                self._send(rec.core.peer, wire.P2PAck(*rec.key), None)
            self._commit(rec, now)
            return
        rec.state = "awaiting"
        rec.metrics["local_done_s"] = now - rec.started
        if rec.core is not None:
            rec.core.flush()  # its last slices' checksums, for the digest below
        dig = rec.core.digest() if (self.parity_digest and rec.core is not None) else b""
        rec.metrics["digest"] = dig.hex()
        members = () if rec.key[1] == WORLD else rec.members
        self._ask(rec, wire.OpDone(self.term, *rec.key, dig, members), now)

    def _ask(self, rec: OpRecord, msg: wire.Message, now: float) -> None:
        rec.request, rec.asked = msg, now
        self._to_coord(msg)

    # ------------------------------------------------------------------ verdicts and deadlines
    def on_verdict(self, msg: wire.OpVerdict, now: float) -> list[Action]:
        self._on_verdict(msg, now)
        return self._take()

    def _on_verdict(self, msg: wire.OpVerdict, now: float) -> None:
        rec = self.ops.get((msg.epoch, msg.group, msg.seq))
        if rec is None:
            if not msg.commit and msg.epoch == self.epoch and msg.seq >= self.seq.get(msg.group, 0):
                self.early_aborts[(msg.epoch, msg.group, msg.seq)] = msg.reason
                while len(self.early_aborts) > MAX_EARLY_ABORTS:
                    self.early_aborts.popitem(last=False)
            return
        if msg.commit:
            if rec.state != "awaiting" and not (rec.state == "failing" and rec.completed):
                log.error("%s: commit verdict for op %s in state %s", self.me, wire.op_key(*rec.key), rec.state)
                self._finish(rec, ProtocolError("commit verdict for an op that is not complete here"))
                return
            self.pending = msg.pending
            self._commit(rec, now)
        else:
            self._finish(rec, OpAborted(f"op {wire.op_key(*rec.key)} aborted: {msg.reason}",
                                        epoch=msg.epoch, reason=msg.reason, key=wire.op_key(*rec.key)))

    def request_abort_for(self, handle: Handle, reason: str, now: float) -> list[Action]:
        for rec in list(self.ops.values()):
            if rec.handle is handle:
                self._request_abort(rec, reason, now)
        return self._take()

    def _request_abort(self, rec: OpRecord, reason: str, now: float) -> None:
        if isinstance(rec.core, ring.PointToPoint):
            self._finish(rec, OpTimeout(f"point-to-point {wire.op_key(*rec.key)}: {reason}",
                                        epoch=rec.key[0], reason=reason))
            return
        if rec.state in ("running", "awaiting"):
            # An awaiting op (its part done, OpDone sent) may still be committed by a verdict already on
            # its way: the coordinator decides once, and our result is complete either way.
            rec.completed = rec.state == "awaiting"
            rec.state = "failing"
            members = () if rec.key[1] == WORLD else rec.members
            self._ask(rec, wire.OpFail(self.term, *rec.key, wire.clip(reason), members), now)

    def link_lost(self, peer: str, now: float) -> list[Action]:
        """A data connection to ``peer`` dropped: chunks in flight on it are gone (zmq does not resend after
        a reconnect), so an op with ``peer`` in it would only wait for its progress deadline. Abort it now
        (also when our own part is done: the lost chunk may have been our last one to ``peer``)."""
        for rec in list(self.ops.values()):
            if rec.state in ("running", "awaiting") and peer in rec.members and peer != self.me:
                self._request_abort(rec, f"connection to {peer} dropped", now)
        return self._take()

    def tick(self, now: float, progress_timeout: float) -> list[Action]:
        for rec in list(self.ops.values()):
            if rec.state == "running" and now - rec.last_progress > progress_timeout:
                self._request_abort(rec, f"no progress for {now - rec.last_progress:.1f}s", now)
            elif rec.request is not None and now - rec.asked > RESEND_S:
                # A dropped connection loses what was queued on it: ask again (the coordinator's answer to
                # a repeat is the same verdict, or "already decided").
                self._ask(rec, rec.request, now)
        return self._take()

    # ------------------------------------------------------------------ completion
    def _commit(self, rec: OpRecord, now: float) -> None:
        value: Any = None
        rec.metrics["verdict_s"] = now - rec.started  # the commit verdict is in; the copy out follows
        if rec.spec.kind in ("all_reduce", "broadcast", "recv") and rec.core is not None:
            views = rec.spec.views
            if len(views) == 1:
                rec.core.write_into(views[0])  # the first write to the caller's buffer (I2)
            else:
                result = rec.core.result
                offset = 0
                for view in views:
                    view[...] = result[offset:offset + view.size]
                    offset += view.size
        elif rec.spec.kind == "all_gather" and rec.core is not None:
            value = (rec.core.result, rec.members)
        self.recent_committed.append(wire.op_key(*rec.key))
        self.committed += 1
        self._finish(rec, None, value)

    def _finish(self, rec: OpRecord, error: Optional[BaseException], value: Any = None) -> None:
        self.ops.pop(rec.key, None)
        if rec.core is not None:
            self._unflushed = [c for c in self._unflushed if c is not rec.core]  # its buffers go back now
            # Nothing was written to the caller's buffers before a commit, so an abort only drops references
            # (I2). Scratch buffers go back to the pool: every member is done (commit) or the op's remaining
            # messages are stale and dropped on arrival (abort), so reuse cannot leak into a result.
            for buf in rec.core.allocated:
                self.pool.give(buf)
            rec.core.allocated = []
        now = self._clock() if self._clock is not None else rec.last_progress
        m = rec.metrics
        m.update(kind=rec.spec.kind, epoch=rec.key[0], group=rec.key[1], seq=rec.key[2],
                 members=list(rec.members), started_at=rec.started,  # the driver's clock; offsets below
                 duration_s=now - rec.started, committed=error is None,
                 error=type(error).__name__ if error else "", reason=str(error) if error else "")
        if rec.core is not None:
            m.update(bytes_sent=rec.core.bytes_sent, bytes_received=rec.core.bytes_received)
        rec.handle.metrics = m
        self.history.append(m)
        if error is None:
            rec.handle.resolve(value)
        else:
            self.aborted += 1
            rec.handle.fail(error)

    # ------------------------------------------------------------------ early data
    def _take_early(self, key: tuple[int, str, int]) -> list[tuple[str, wire.Chunk, Any]]:
        items = self.early.pop(key, [])
        self.early_bytes -= sum((len(p) if p is not None else 0) + EARLY_OVERHEAD for _, _, p in items)
        return items

    def _drop_early(self, key: tuple[int, str, int]) -> None:
        self._take_early(key)


__all__ = ["OpEngine", "OpSpec", "OpRecord", "RemoteError"]
