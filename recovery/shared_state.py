"""Shared state: named tensors plus a revision that every member holds bit for bit.

``sync(comm, state)`` is a collective over the members of ``comm``:

1. every member all-gathers a small header (revision, last synced revision, strategy, a digest of its
   tensor names); a member whose set of names differs from the majority is refused (``StateMismatch``)
   and the others carry on without it;
2. the rest all-gather per-tensor SHA-256 hashes (of dtype, shape and bytes);
3. everyone computes the same canonical state: among voters (not ``receive_only``) with a legal revision
   (their last synced revision, or one more: revisions advance by exactly one per committed step), the
   highest revision, and at it the most common hash vector (ties: earliest in ring order);
4. a member whose tensors differ pulls only those tensors, split into ranges fetched in parallel from
   every member that holds the canonical bytes (point-to-point); bytes land in a staging buffer and are
   copied into the live tensor only after the hash verifies. Ranges that fail are fetched again, one
   source at a time, in later rounds; sources caught serving bad bytes are reported.

When everyone agrees, only headers and hashes move. If a source dies mid-transfer the op aborts with
``PeerLost``; retry the whole sync (``with_retry``) and it runs again on the survivors.

``comm`` is any communicator with ``me``, ``all_gather_members``, ``group``, ``pinned``, ``send_async`` and
``recv_async`` (``peer.swarm.Communicator``); this module does not import ``peer``. All ops after the
first are pinned to the first one's epoch, so a membership change restarts the sync on every member
instead of leaving members at different steps of it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from collectives import tensors
from collectives.errors import LocalError, SwarmError

log = logging.getLogger(__name__)

STRATEGIES = {"enforce_popular": 0, "receive_only": 1, "send_only": 2}
HASH_BYTES = 32
_HEADER_WORDS = 8  # revision, last_synced, strategy, n_tensors, 4 x names digest


class StateMismatch(SwarmError):
    """This member's state cannot be reconciled (different tensor names, or send-only and out of date)."""


class NoSource(SwarmError):
    """No member holds (or correctly serves) the canonical bytes of a tensor."""


class Comm(Protocol):
    @property
    def me(self) -> str: ...
    def all_gather_members(self, tensor: Any, timeout: float = ...) -> tuple[list[Any], list[str], int]: ...
    def group(self, members: Sequence[str]) -> "Comm": ...
    def pinned(self, epoch: int) -> "Comm": ...
    def send_async(self, tensor: Any, to: str) -> Any: ...
    def recv_async(self, tensor: Any, src: str) -> Any: ...


MIRROR_CPU = False   # tests: mirror CPU tensors too, so the device path (mirror, write-back) runs on CPU


class SharedState:
    """Named tensors (torch tensors or numpy arrays, modified in place) and a revision number.

    A torch tensor on a device (CUDA) is synced through a host copy made here; ``sync`` writes the tensors it
    fetched back to the device tensors only when the whole sync succeeded (``write_back``), so a failed
    sync leaves the device tensors as they were."""

    def __init__(self, named: Mapping[str, Any], revision: int = 0) -> None:
        self.device: dict[str, Any] = {}            # name -> the device tensor behind a host copy
        host: dict[str, Any] = {}
        for n, t in sorted(named.items()):
            if type(t).__module__.startswith("torch") and (t.device.type != "cpu" or MIRROR_CPU):
                self.device[n] = t
                t = t.detach().to("cpu", copy=True).contiguous()
            host[n] = t
        self.tensors = host
        self.revision = revision
        self.last_synced = -1
        self._views = {n: tensors.flat_view(t) for n, t in self.tensors.items()}

    def write_back(self, names: Sequence[str]) -> None:
        """Copy the host copies of ``names`` into their device tensors (names without one: nothing)."""
        for n in names:
            dev = self.device.get(n)
            if dev is not None:
                dev.detach().copy_(self.tensors[n])

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def view(self, name: str) -> np.ndarray:
        return self._views[name][0]

    def tensor_hash(self, name: str, data: np.ndarray | None = None) -> bytes:
        view, dtype = self._views[name]
        h = hashlib.sha256(f"{dtype}|{tuple(np.shape(self.tensors[name]))}|".encode())
        h.update((view if data is None else data).data.cast("B"))
        return h.digest()

    def hashes(self) -> list[bytes]:
        return [self.tensor_hash(n) for n in self.tensors]

    def names_digest(self) -> bytes:
        spec = "\n".join(f"{n}:{self._views[n][1]}:{tuple(np.shape(t))}" for n, t in self.tensors.items())
        return hashlib.sha256(spec.encode()).digest()

    def nbytes(self) -> int:
        return sum(v.nbytes for v, _ in self._views.values())


@dataclass
class SyncResult:
    revision: int
    members: list[str]
    fetched: list[str] = field(default_factory=list)      # tensors this member pulled
    bytes_received: int = 0
    bytes_served: int = 0
    rounds: int = 0
    bad_sources: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # failed staging copies, kept until a verified copy shows which source sent the wrong bytes
    suspects: dict[int, list[tuple[np.ndarray, list[tuple[str, int, int]]]]] = field(
        default_factory=dict, repr=False)


@dataclass(frozen=True)
class _Transfer:
    dst: str
    src: str
    tensor: int
    lo: int
    hi: int


def sync(comm: Comm, state: SharedState, strategy: str = "enforce_popular", timeout: float = 300.0,
         max_sources: int = 4) -> SyncResult:
    if strategy not in STRATEGIES:
        raise LocalError(f"strategy must be one of {sorted(STRATEGIES)}")
    t0 = time.monotonic()
    names_digest = state.names_digest()
    header = np.zeros(_HEADER_WORDS, np.int64)
    header[:4] = (state.revision, state.last_synced, STRATEGIES[strategy], len(state.tensors))
    header[4:] = np.frombuffer(names_digest, np.int64)
    blocks, members, epoch = comm.all_gather_members(header, timeout)
    comm = comm.pinned(epoch)  # every later op of this sync runs in the same epoch, or the sync restarts
    digests = [b[4:].tobytes() for b in blocks]
    winner, _ = Counter(digests).most_common(1)[0]
    # ties: the digest that appears first in ring order among the most common ones
    top = max(Counter(digests).values())
    winner = next(d for d in digests if digests.count(d) == top)
    agreeing = [m for m, d in zip(members, digests) if d == winner]
    if names_digest != winner:
        raise StateMismatch(f"{comm.me}: my tensor names/shapes differ from the swarm's; refusing to sync")
    info = {m: b for m, b in zip(members, blocks) if m in agreeing}
    group = comm if len(agreeing) == len(members) else comm.group(agreeing)
    n = len(state.tensors)
    mine = np.frombuffer(b"".join(state.hashes()), np.uint8).copy()
    hash_blocks, ring, _ = group.all_gather_members(mine, timeout)
    hashes = {m: [bytes(h[i * HASH_BYTES:(i + 1) * HASH_BYTES]) for i in range(n)] for m, h in
              zip(ring, hash_blocks)}
    revision, canonical = _canonical(ring, info, hashes)
    result = SyncResult(revision=revision, members=ring)
    dirty = {m: [i for i in range(n) if hashes[m][i] != canonical[i]] for m in ring}
    send_only = {m for m in ring if int(info[m][2]) == STRATEGIES["send_only"]}
    needy = {m: d for m, d in dirty.items() if d and m not in send_only}
    failed: dict[tuple[str, int], set[str]] = {}  # (dst, tensor) -> sources that served bad bytes
    attempt = 0
    while needy:
        plan = _plan(ring, needy, hashes, canonical, state, failed, attempt, max_sources)
        ok = _execute(group, state, plan, canonical, result, timeout)
        report = np.zeros(n, np.uint8)
        for i in ok.get("bad", []):
            report[i] = 1
        reports, _, _ = group.all_gather_members(report, timeout)
        next_needy: dict[str, list[int]] = {}
        for m, rep in zip(ring, reports):
            bad = [i for i in needy.get(m, []) if rep[i]]
            if bad:
                next_needy[m] = bad
                for i in bad:
                    srcs = {t.src for t in plan if t.dst == m and t.tensor == i}
                    if len(srcs) == 1:  # a single source failed: it is the culprit; never ask it again
                        failed.setdefault((m, i), set()).update(srcs)
        needy = next_needy
        attempt += 1
        result.rounds = attempt
    if comm.me in send_only and dirty[comm.me]:
        raise StateMismatch(f"{comm.me} is send-only but holds a non-canonical state")
    state.write_back(result.fetched)
    state.revision = revision
    state.last_synced = revision
    result.seconds = time.monotonic() - t0
    return result


def _canonical(ring: list[str], info: dict[str, np.ndarray], hashes: dict[str, list[bytes]]
               ) -> tuple[int, list[bytes]]:
    voters = []
    for m in ring:
        rev, last, strat = int(info[m][0]), int(info[m][1]), int(info[m][2])
        legal = last < 0 or rev in (last, last + 1)
        if strat != STRATEGIES["receive_only"] and legal:
            voters.append(m)
    if not voters:
        raise NoSource("no member may vote on the shared state (all receive-only or illegal revisions)")
    top = max(int(info[m][0]) for m in voters)
    at_top = [m for m in voters if int(info[m][0]) == top]
    counts = Counter(tuple(hashes[m]) for m in at_top)
    best = max(counts.values())
    chosen = next(m for m in at_top if counts[tuple(hashes[m])] == best)
    return top, list(hashes[chosen])


def _plan(ring: list[str], needy: dict[str, list[int]], hashes: dict[str, list[bytes]],
          canonical: list[bytes], state: SharedState, failed: dict[tuple[str, int], set[str]],
          attempt: int, max_sources: int) -> list[_Transfer]:
    """The same transfer list on every member (deterministic from the gathered information)."""
    plan: list[_Transfer] = []
    names = state.names
    for dst in ring:
        for i in needy.get(dst, []):
            sources = [m for m in ring if m != dst and hashes[m][i] == canonical[i]
                       and m not in failed.get((dst, i), set())]
            if not sources:
                raise NoSource(f"no member can serve a verified copy of {names[i]!r} to {dst}")
            size = state.view(names[i]).size
            if attempt == 0:
                k = max(1, min(len(sources), max_sources, size))
                shift = ring.index(dst) % len(sources)
                picks = [sources[(shift + j) % len(sources)] for j in range(k)]
            else:  # after a failed verification: whole tensor, one source at a time
                picks = [sources[(ring.index(dst) + attempt - 1) % len(sources)]]
            for (lo, hi), src in zip(tensors.chunk_bounds(size, len(picks)), picks):
                plan.append(_Transfer(dst, src, i, lo, hi))
    return plan


def _execute(comm: Comm, state: SharedState, plan: list[_Transfer], canonical: list[bytes],
             result: SyncResult, timeout: float) -> dict[str, list[int]]:
    me = comm.me
    names = state.names
    staging: dict[int, np.ndarray] = {}
    handles = []
    for t in plan:
        view = state.view(names[t.tensor])
        if t.src == me:
            handles.append(comm.send_async(view[t.lo:t.hi], to=t.dst))
            result.bytes_served += (t.hi - t.lo) * view.itemsize
        elif t.dst == me:
            buf = staging.setdefault(t.tensor, np.empty_like(view))
            handles.append(comm.recv_async(buf[t.lo:t.hi], src=t.src))
    deadline = time.monotonic() + timeout
    for h in handles:
        h.wait(max(0.1, deadline - time.monotonic()))  # raises PeerLost etc.: the caller retries the sync
    bad: list[int] = []
    for i, buf in staging.items():
        name = names[i]
        ranges = [(t.src, t.lo, t.hi) for t in plan if t.dst == me and t.tensor == i]
        if state.tensor_hash(name, buf) == canonical[i]:
            state.view(name)[...] = buf  # verified: only now does it touch the live tensor
            result.fetched.append(name)
            result.bytes_received += buf.nbytes
            for old, old_ranges in result.suspects.pop(i, []):
                for src, lo, hi in old_ranges:  # which earlier source sent bytes that differ?
                    if not np.array_equal(old[lo:hi].view(np.uint8), buf[lo:hi].view(np.uint8)) \
                            and src not in result.bad_sources:
                        result.bad_sources.append(src)
        else:
            log.warning("%s: %s from %s failed verification; fetching again elsewhere", me, name,
                        sorted({r[0] for r in ranges}))
            result.suspects.setdefault(i, []).append((buf, ranges))
            if len(ranges) == 1 and ranges[0][0] not in result.bad_sources:
                result.bad_sources.append(ranges[0][0])
            bad.append(i)
    return {"bad": bad}

