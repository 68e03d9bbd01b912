"""Pure ring schedules: all-reduce, all-gather, broadcast, point-to-point.

No sockets here. An op object is fed received chunks and returns the chunks to send, so the schedules can be
tested in-process and fuzzed. The driver (``peer.node``) moves the bytes.

All-reduce is the pipelined ring: reduce-scatter then all-gather, N-1 steps each, over N contiguous chunks
split into slices of at most ``slice_bytes`` (each slice is forwarded as soon as it is reduced). Peer ``r``
ends the reduce-scatter owning chunk ``(r+1) % N``; the owner finishes it (``avg`` divides there) and the
all-gather forwards those exact bytes unchanged, so every member ends with bit-identical results (I1).
A small all-reduce runs in one step instead (``DirectAllReduce``, chosen by ``direct``): each member sends
its buffer to every other and reduces the N contributions itself, in ring order, with arithmetic that is
exact on every CPU.

Memory discipline: a buffer handed out in a ``Send`` is never written again by this op (sends are
zero-copy), and the caller's buffers are only read until the commit. When the driver says it owns every
payload it hands over (``owns_payloads``: each is a received frame nobody else references), an all-reduce
sums each reduce-scatter slice into the frame it arrived in and keeps every frame by reference, so it needs
no scratch at all; otherwise it sums into one op-sized scratch buffer (each of its slices written once, by
one fused ``reduce_into``). ``write_into`` copies the result into the caller's tensor once, at commit. An
abort is "drop the references" (I2 needs no backup copy).

Parity digest: each finished slice gets a ``tensors.slice_checksum`` right after the driver has sent what
that step produced (``flush``), while its bytes are still warm in cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from collectives import tensors
from collectives.codecs import Codec
from collectives.errors import LocalError, ProtocolError
from collectives.wire import (PHASE_ALL_GATHER, PHASE_BROADCAST, PHASE_DIRECT, PHASE_P2P, PHASE_REDUCE_SCATTER,
                              Chunk)

# An all-reduce whose buffer, times the other members, is at most this many bytes runs in one step
# (``DirectAllReduce``): for the tiny ops of DiLoCo's bookkeeping, one message latency instead of 2(N-1).
DIRECT_MAX_BYTES = 256 * 1024


def direct(nbytes: int, n: int, reduce_op: str = "sum", dtype: str = "float32") -> bool:
    """Whether an uncompressed all-reduce of ``nbytes`` among ``n`` members runs as ``DirectAllReduce``
    (every member decides alike: the size, the members, the op and the dtype are the op's). Float min/max
    stay in the ring: which of +0/-0, or of two NaNs, they return depends on numpy's code path, which
    members on other CPUs need not share; sums are IEEE-exact everywhere (NaNs are made canonical)."""
    exact = reduce_op in ("sum", "avg") or tensors.DTYPES[dtype].kind in "iu" and dtype != "bfloat16"
    return n >= 2 and exact and nbytes * (n - 1) <= DIRECT_MAX_BYTES


@dataclass(frozen=True)
class OpId:
    epoch: int
    group: str
    seq: int


@dataclass
class Send:
    to: str
    msg: Chunk
    payload: Any  # a buffer: numpy array or a received zmq frame forwarded unchanged


def group_id(member_ids: tuple[str, ...] | list[str], kind: str = "g") -> str:
    """Stable id of an ordered member subset (the world group uses ``"w"``)."""
    h = hashlib.blake2b("\x00".join(member_ids).encode(), digest_size=10).hexdigest()
    return f"{kind}{h}"


def digest(arr: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(arr).data.cast("B"), digest_size=16).digest()


class RingOp:
    """Common state of a ring collective: who I am, neighbours, expected slices."""

    result: np.ndarray

    def __init__(self, op: OpId, ring: list[str], me: str, dtype: str, slice_bytes: int) -> None:
        if me not in ring:
            raise ProtocolError(f"{me} is not in the ring")
        self.op, self.ring, self.me, self.dtype = op, list(ring), me, dtype
        self.n = len(ring)
        self.rank = ring.index(me)
        self.left = ring[(self.rank - 1) % self.n]
        self.right = ring[(self.rank + 1) % self.n]
        self.itemsize = tensors.DTYPES[dtype].itemsize
        self.slice_bytes = slice_bytes
        self.remaining = 0
        self.seen: set[tuple[int, int, int]] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self._checks: dict[int, bytes] = {}  # slice start -> checksum of its final bytes
        self._stores: list[tuple[int, int, Any]] = []
        self._to_check: list[tuple[int, Any]] = []
        self.alloc: Any = np.empty  # scratch allocator (the driver passes a pool)
        self.checksum = True        # checksum each slice as it lands (for ``digest``); off when nobody asks
        # The driver's promise that every payload it hands to ``on_chunk`` is a buffer of this op's own
        # (a received frame, a freshly opened sealed frame, a landing slice): nobody else reads or writes it.
        self.owns_payloads = False
        self.allocated: list[np.ndarray] = []

    def _scratch(self, n: int, dtype: np.dtype) -> np.ndarray:
        buf: np.ndarray = self.alloc(n, dtype)
        self.allocated.append(buf)
        return buf

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def write_into(self, dest: np.ndarray) -> None:
        if self.result is not dest:
            dest[...] = self.result

    def _store(self, lo: int, hi: int, values: Any) -> None:
        """Queue a finished slice of the result; ``flush`` writes it after the driver has sent what this
        step produced, so forwarding never waits for copies and checksums."""
        self._stores.append((lo, hi, values))

    def _check_later(self, lo: int, values: Any) -> None:
        if self.checksum:
            self._to_check.append((lo, values))

    def flush(self) -> None:
        for lo, hi, values in self._stores:
            self.result[lo:hi] = values
            self._check_later(lo, self.result[lo:hi])
        self._stores.clear()
        for lo, values in self._to_check:
            self._checks[lo] = tensors.slice_checksum(values)
        self._to_check.clear()

    def _final(self, lo: int, hi: int) -> Any:
        """The final bytes of slice [lo, hi) (for a checksum not built slice by slice)."""
        return self.result[lo:hi]

    def digest(self) -> bytes:
        """Cheap parity check of the whole result (a checksum per slice, combined in order). It catches
        peers whose results diverge by a bug; it is no defence against a lying peer (that one can send
        anything)."""
        h = hashlib.blake2b(digest_size=16)
        for lo, hi in sorted(self._slices()):
            check = self._checks.get(lo)
            if check is None:  # not built slice by slice here (a broadcast root, a single member)
                check = tensors.slice_checksum(self._final(lo, hi))
            h.update(lo.to_bytes(8, "big") + check)
        return h.digest()

    def _slices(self) -> list[tuple[int, int]]:
        parts: Any = self.parts  # type: ignore[attr-defined]
        return [p for ps in parts for p in ps] if parts and isinstance(parts[0], list) else list(parts)

    def _send(self, to: str, phase: int, step: int, part: int, payload: Any, count: int) -> Send:
        dtype, wire_count = self._wire(count)
        self.bytes_sent += wire_count * tensors.DTYPES[dtype].itemsize
        msg = Chunk(self.op.epoch, self.op.group, self.op.seq, phase, step, part, dtype, wire_count)
        return Send(to, msg, payload)

    def _wire(self, n: int) -> tuple[str, int]:
        """(dtype, element count) that ``n`` values travel as."""
        return self.dtype, n

    def _check(self, sender: str, msg: Chunk, expect_from: str, phase: int, steps: int,
               parts: list[tuple[int, int]]) -> tuple[int, int]:
        """The [lo, hi) of a slice this op expects and has not received yet; ``ProtocolError`` else."""
        if sender != expect_from:
            raise ProtocolError(f"chunk from {sender}, expected {expect_from}")
        if msg.phase != phase or msg.step >= steps or msg.part >= len(parts):
            raise ProtocolError(f"unexpected chunk phase={msg.phase} step={msg.step} part={msg.part}")
        key = (msg.phase, msg.step, msg.part)
        if key in self.seen:
            raise ProtocolError(f"duplicate chunk {key}")
        lo, hi = parts[msg.part]
        dtype, count = self._wire(hi - lo)
        if msg.dtype != dtype or msg.count != count:
            raise ProtocolError(f"chunk is {msg.count} x {msg.dtype}, expected {count} x {dtype}")
        return lo, hi

    def _accept(self, sender: str, msg: Chunk, payload: Any, expect_from: str, phase: int, steps: int,
                parts: list[tuple[int, int]]) -> np.ndarray:
        """Validate one received slice; return it as a numpy array (of the wire dtype)."""
        self._check(sender, msg, expect_from, phase, steps, parts)
        key = (msg.phase, msg.step, msg.part)
        arr = tensors.from_payload(payload, msg.dtype, msg.count)
        self.seen.add(key)
        self.remaining -= 1
        self.bytes_received += arr.nbytes
        return arr


class HeldResult(RingOp):
    """A result held slice by slice (``held``: slice start -> (stop, final values)) until the commit
    copies it into the caller's buffer (``write_into``)."""

    src: np.ndarray

    def __init__(self, op: OpId, ring: list[str], me: str, dtype: str, slice_bytes: int) -> None:
        super().__init__(op, ring, me, dtype, slice_bytes)
        self.held: dict[int, tuple[int, np.ndarray]] = {}
        self._result: np.ndarray | None = None

    @property
    def result(self) -> np.ndarray:  # type: ignore[override]
        """The whole result as one array (a copy, made on first use; the driver uses ``write_into``)."""
        if self._result is None:
            self._result = np.empty_like(self.src)
            self.write_into(self._result)
        return self._result

    def write_into(self, dest: np.ndarray) -> None:
        """Copy the result into ``dest`` (the commit: one pass over the buffer)."""
        if dest.size != self.src.size:
            raise LocalError(f"result has {self.src.size} elements, destination {dest.size}")
        for lo, (hi, values) in self.held.items():
            target = dest[lo:hi]
            if not np.may_share_memory(target, values):  # n == 1 in place: already there
                np.copyto(target, values)

    def _final(self, lo: int, hi: int) -> Any:
        return self.held[lo][1]


class AllReduce(HeldResult):
    """Ring all-reduce of ``src``; ``write_into(out)`` puts the result in ``out`` (which may be ``src``
    itself) at commit, and nothing writes the caller's buffers before that.

    A reduce-scatter partial sum is written once, by ``reduce_into(out, src, incoming)``, then sent
    zero-copy and never written again. ``out`` is the received buffer itself when the driver owns the
    payloads (``owns_payloads``, uncompressed): one pass over bytes still warm from the socket, and no
    scratch. Otherwise it is a slice of ``acc``, op-sized scratch made on first use. The owner of a chunk
    finishes it there (``avg`` divides there); the all-gather frames that arrive are kept as they are
    (zero-copy views of the received frames) and forwarded unchanged. ``held`` maps each slice of the
    result to the array that holds its final bytes.
    """

    def __init__(self, op: OpId, ring: list[str], me: str, src: np.ndarray, dtype: str, reduce_op: str,
                 slice_bytes: int, out: np.ndarray | None = None, codec: Codec | None = None) -> None:
        super().__init__(op, ring, me, dtype, slice_bytes)
        if reduce_op not in tensors.REDUCE_OPS:
            raise ValueError(f"unknown reduce op {reduce_op}")
        if codec is not None and (dtype != "float32" or reduce_op not in ("sum", "avg")):
            raise LocalError("compressed all-reduce supports float32 sum/avg only")
        self.codec = codec
        self.src, self.reduce_op = src, reduce_op
        self.out = out  # where the caller wants the result (``write_into`` at commit); may be ``src``
        self.acc: np.ndarray | None = None  # scratch, made on first use (``_scratch_slice``)
        self.started = False
        self.landed: set[tuple[int, int, int]] = set()  # chunks whose bytes ``landing`` placed in ``acc``
        self.chunks = tensors.chunk_bounds(src.size, self.n)
        self.parts = [tensors.slice_bounds(lo, hi, self.itemsize, slice_bytes) for lo, hi in self.chunks]
        # RS receives N-1 chunks, AG receives N-1 chunks.
        self.remaining = 0 if self.n == 1 else sum(
            len(self.parts[self._rs_chunk(s)]) + len(self.parts[self._ag_chunk(s)]) for s in range(self.n - 1))
        if self.n == 1:
            for lo, hi in self.parts[0]:
                self.held[lo] = (hi, src[lo:hi])

    def _rs_chunk(self, step: int) -> int:
        return (self.rank - step - 1) % self.n

    def _ag_chunk(self, step: int) -> int:
        return (self.rank - step) % self.n

    def start(self) -> list[Send]:
        if self.n == 1:
            return []
        self.started = True
        own = self.rank
        return [self._send(self.right, PHASE_REDUCE_SCATTER, 0, k, self._enc(self.src[lo:hi]), hi - lo)
                for k, (lo, hi) in enumerate(self.parts[own])]

    def _wire(self, n: int) -> tuple[str, int]:
        if self.codec is None:
            return self.dtype, n
        return self.codec.wire_dtype, self.codec.wire_count(n)

    def _enc(self, x: np.ndarray) -> np.ndarray:
        return x if self.codec is None else self.codec.encode(x)

    def _dec(self, payload: np.ndarray, n: int) -> np.ndarray:
        return payload if self.codec is None else self.codec.decode(payload, n)

    def _scratch_slice(self, lo: int, hi: int) -> np.ndarray:
        if self.acc is None:
            self.acc = self._scratch(self.src.size, self.src.dtype)
        return self.acc[lo:hi]

    def _partial(self, lo: int, hi: int, incoming: np.ndarray) -> np.ndarray:
        """Where the partial sum of reduce-scatter slice [lo, hi) is written: into the buffer it arrived in
        when that buffer is ours (``owns_payloads``; a landed slice of ``acc`` is one too), else into
        ``acc``. A compressed chunk arrives as codes of another dtype: its sum goes to ``acc``."""
        if self.owns_payloads and self.codec is None and incoming.flags.writeable:
            return incoming
        return self._scratch_slice(lo, hi)

    def _hold(self, lo: int, hi: int, values: np.ndarray) -> None:
        self.held[lo] = (hi, values)
        self._check_later(lo, values)

    def landing(self, sender: str, msg: Chunk) -> np.ndarray | None:
        """The slice of ``acc`` that this chunk's bytes may be written into before ``on_chunk`` reads them
        (secure mode decrypts straight into it: no per-frame allocation, no held copies), or None.

        Only for a transport whose frames are copies of what it was handed by the time they reach the next
        peer (sealing is one), because an all-gather slice lands where this op's reduce-scatter partial
        sum of the same range was. That sum has been sealed by then: the all-gather of a range reaches us
        only after our right neighbour received our partial sum of it (the ring passes it on through
        them to the chunk's owner). A reduce-scatter slice lands where its partial sum is about to be
        computed (in place: ``acc = src + acc``). Nothing lands twice, nothing lands where a final slice
        is held (the owner's chunk never arrives in either phase), and a chunk ``on_chunk`` would refuse
        gets None."""
        key = (msg.phase, msg.step, msg.part)
        if not self.started or self.codec is not None or key in self.landed or \
                msg.phase not in (PHASE_REDUCE_SCATTER, PHASE_ALL_GATHER):
            return None
        chunk = self._rs_chunk if msg.phase == PHASE_REDUCE_SCATTER else self._ag_chunk
        c = chunk(msg.step) if msg.step <= self.n - 2 else -1  # as on_chunk picks it
        try:
            lo, hi = self._check(sender, msg, self.left, msg.phase, self.n - 1, self.parts[c])
        except ProtocolError:
            return None  # refused later by on_chunk, from a fresh buffer
        self.landed.add(key)
        return self._scratch_slice(lo, hi)

    def on_chunk(self, sender: str, msg: Chunk, payload: Any) -> list[Send]:
        last = self.n - 2
        if not self.started:
            raise ProtocolError("chunk before the op started")
        if msg.phase == PHASE_REDUCE_SCATTER:
            c = self._rs_chunk(msg.step) if msg.step <= last else -1
            incoming = self._accept(sender, msg, payload, self.left, PHASE_REDUCE_SCATTER, self.n - 1,
                                    self.parts[c])
            lo, hi = self.parts[c][msg.part]
            acc = self._partial(lo, hi, incoming)
            tensors.reduce_into(acc, self.src[lo:hi], self._dec(incoming, hi - lo), self.reduce_op, self.dtype)
            if msg.step < last:
                return [self._send(self.right, PHASE_REDUCE_SCATTER, msg.step + 1, msg.part, self._enc(acc),
                                   hi - lo)]
            if self.reduce_op == "avg":
                tensors.finish_avg(acc, self.n, self.dtype)
            wire = self._enc(acc)
            if self.codec is not None:  # the owner keeps exactly what everyone else will decode
                acc[...] = self._dec(wire, hi - lo)
            self._hold(lo, hi, acc)
            return [self._send(self.right, PHASE_ALL_GATHER, 0, msg.part, wire, hi - lo)]
        c = self._ag_chunk(msg.step) if msg.step <= last else -1
        incoming = self._accept(sender, msg, payload, self.left, PHASE_ALL_GATHER, self.n - 1, self.parts[c])
        lo, hi = self.parts[c][msg.part]
        values = self._dec(incoming, hi - lo)
        self._hold(lo, hi, values)
        if msg.step < last:
            return [self._send(self.right, PHASE_ALL_GATHER, msg.step + 1, msg.part, payload, hi - lo)]
        return []


class DirectAllReduce(HeldResult):
    """All-reduce of a small buffer in one step: every member sends its whole buffer to every other member
    (in slices of at most ``slice_bytes``), and each reduces the N contributions in ring order, slice by
    slice: ``(c0 op c1) op c2 ...``. Every member computes the same operations on the same bytes in the
    same order, so the results are bit-identical (I1) without any forwarding, also for operations that are
    not commutative bitwise (min/max of +0/-0, NaN payloads). One message latency instead of the ring's
    2(N-1); each member sends (N-1) times the buffer (the ring: 2(N-1)/N times), hence only for buffers
    where that is small (``direct``). Members need not share a CPU or a numpy build, so the ring's rule
    "computed once, forwarded" is replaced by operations that are exact everywhere: sums (IEEE), with
    every NaN of the result made the canonical quiet NaN (the payload that survives a sum of NaNs depends
    on the code path), and min/max on integers only (``direct``). A chunk's ``step`` is its sender's rank.
    Nothing is written to the caller's buffer before the commit; the contributions are held by reference
    until the last arrives."""

    def __init__(self, op: OpId, ring: list[str], me: str, src: np.ndarray, dtype: str, reduce_op: str,
                 slice_bytes: int) -> None:
        super().__init__(op, ring, me, dtype, slice_bytes)
        if reduce_op not in tensors.REDUCE_OPS:
            raise ValueError(f"unknown reduce op {reduce_op}")
        if not direct(0, max(2, len(ring)), reduce_op, dtype):
            raise LocalError(f"{reduce_op} of {dtype} is not exact on every CPU: it runs in the ring")
        self.src, self.reduce_op = src, reduce_op
        self.parts = tensors.slice_bounds(0, src.size, self.itemsize, slice_bytes)
        self.contrib: list[list[Any]] = [[None] * len(self.parts) for _ in range(self.n)]
        self.contrib[self.rank] = [src[lo:hi] for lo, hi in self.parts]
        self.remaining = (self.n - 1) * len(self.parts)
        if self.n == 1:
            self._reduce()

    def start(self) -> list[Send]:
        return [self._send(peer, PHASE_DIRECT, self.rank, k, self.src[lo:hi], hi - lo)
                for peer in self.ring if peer != self.me for k, (lo, hi) in enumerate(self.parts)]

    def on_chunk(self, sender: str, msg: Chunk, payload: Any) -> list[Send]:
        if sender == self.me or sender not in self.ring:
            raise ProtocolError(f"direct all-reduce chunk from {sender}, not another member")
        r = self.ring.index(sender)
        if msg.step != r:
            raise ProtocolError(f"direct all-reduce chunk from {sender} (rank {r}) says step {msg.step}")
        self.contrib[r][msg.part] = self._accept(sender, msg, payload, sender, PHASE_DIRECT, self.n, self.parts)
        if self.remaining == 0:
            self._reduce()
        return []

    def _reduce(self) -> None:
        acc = self._scratch(self.src.size, self.src.dtype) if self.n > 1 else None
        for k, (lo, hi) in enumerate(self.parts):
            if acc is None:  # a single member: its own buffer is the result
                out = self.src[lo:hi]
            else:
                out = acc[lo:hi]
                tensors.reduce_into(out, self.contrib[0][k], self.contrib[1][k], self.reduce_op, self.dtype)
                for r in range(2, self.n):
                    tensors.reduce_into(out, out, self.contrib[r][k], self.reduce_op, self.dtype)
                if self.reduce_op == "avg":
                    tensors.finish_avg(out, self.n, self.dtype)
                tensors.canonical_nans(out, self.dtype)
            self.held[lo] = (hi, out)
            self._check_later(lo, out)
        self.contrib = []


class AllGather(RingOp):
    """Ring all-gather: every member contributes ``src`` (same size); result is N blocks in ring order."""

    def __init__(self, op: OpId, ring: list[str], me: str, src: np.ndarray, dtype: str,
                 slice_bytes: int) -> None:
        super().__init__(op, ring, me, dtype, slice_bytes)
        self.src = src
        m = src.size
        self.result = np.empty(m * self.n, dtype=src.dtype)
        self.parts = [tensors.slice_bounds(b * m, (b + 1) * m, self.itemsize, slice_bytes) for b in range(self.n)]
        self.remaining = sum(len(self.parts[self._recv_block(s)]) for s in range(self.n - 1))

    def _recv_block(self, step: int) -> int:
        return (self.rank - step - 1) % self.n

    def start(self) -> list[Send]:
        m = self.src.size
        for lo, hi in self.parts[self.rank]:
            self._store(lo, hi, self.src[lo - self.rank * m:hi - self.rank * m])
        if self.n == 1:
            return []
        base = self.rank * m
        return [self._send(self.right, PHASE_ALL_GATHER, 0, k, self.src[lo - base:hi - base], hi - lo)
                for k, (lo, hi) in enumerate(self.parts[self.rank])]

    def on_chunk(self, sender: str, msg: Chunk, payload: Any) -> list[Send]:
        b = self._recv_block(msg.step) if msg.step < self.n - 1 else -1
        incoming = self._accept(sender, msg, payload, self.left, PHASE_ALL_GATHER, self.n - 1, self.parts[b])
        lo, hi = self.parts[b][msg.part]
        self._store(lo, hi, incoming)
        if msg.step < self.n - 2:
            return [self._send(self.right, PHASE_ALL_GATHER, msg.step + 1, msg.part, payload, hi - lo)]
        return []


class Broadcast(RingOp):
    """Chain broadcast from ``root`` along the ring; slices are forwarded as they arrive."""

    def __init__(self, op: OpId, ring: list[str], me: str, root: str, buf: np.ndarray, dtype: str,
                 slice_bytes: int) -> None:
        super().__init__(op, ring, me, dtype, slice_bytes)
        if root not in ring:
            raise ValueError(f"root {root} is not a member")
        self.root = root
        self.pos = (self.rank - ring.index(root)) % self.n  # 0 = root
        self.src = buf
        self.result = buf if self.pos == 0 else np.empty_like(buf)
        self.parts = tensors.slice_bounds(0, buf.size, self.itemsize, slice_bytes)
        self.remaining = 0 if self.pos == 0 else len(self.parts)

    def start(self) -> list[Send]:
        if self.pos != 0 or self.n == 1:
            return []
        return [self._send(self.right, PHASE_BROADCAST, 0, k, self.src[lo:hi], hi - lo)
                for k, (lo, hi) in enumerate(self.parts)]

    def on_chunk(self, sender: str, msg: Chunk, payload: Any) -> list[Send]:
        if self.pos == 0:
            raise ProtocolError("root received broadcast data")
        incoming = self._accept(sender, msg, payload, self.left, PHASE_BROADCAST, 1, self.parts)
        lo, hi = self.parts[msg.part]
        self._store(lo, hi, incoming)
        if self.pos < self.n - 1:
            return [self._send(self.right, PHASE_BROADCAST, 0, msg.part, payload, hi - lo)]
        return []


class PointToPoint(RingOp):
    """One tensor from ``src_peer`` to ``dst_peer``. The sender is done on the receiver's ack."""

    def __init__(self, op: OpId, me: str, src_peer: str, dst_peer: str, buf: np.ndarray, dtype: str,
                 slice_bytes: int) -> None:
        super().__init__(op, [src_peer, dst_peer], me, dtype, slice_bytes)
        self.sending = me == src_peer
        self.peer = dst_peer if self.sending else src_peer
        self.src = buf
        self.result = buf if self.sending else np.empty_like(buf)
        self.parts = tensors.slice_bounds(0, buf.size, self.itemsize, slice_bytes)
        self.remaining = 1 if self.sending else len(self.parts)  # sender waits for one ack

    def start(self) -> list[Send]:
        if not self.sending:
            return []
        return [self._send(self.peer, PHASE_P2P, 0, k, self.src[lo:hi], hi - lo)
                for k, (lo, hi) in enumerate(self.parts)]

    def on_chunk(self, sender: str, msg: Chunk, payload: Any) -> list[Send]:
        if self.sending:
            raise ProtocolError("sender received point-to-point data")
        incoming = self._accept(sender, msg, payload, self.peer, PHASE_P2P, 1, self.parts)
        lo, hi = self.parts[msg.part]
        self.result[lo:hi] = incoming
        return []

    def on_ack(self, sender: str) -> None:
        if not self.sending or sender != self.peer or self.remaining == 0:
            raise ProtocolError(f"unexpected point-to-point ack from {sender}")
        self.remaining = 0
