"""The peer node: the one I/O driver. Its thread owns the transport and drives the pure cores: the
membership client (``peer.core.member``, which hosts the coordinator core when this process holds the role),
the op engine (``peer.core.ops``) and the bandwidth probes. The cores return actions; ``_apply`` does them.

User threads never touch sockets: they put a command on a queue, poke a pipe, and wait on a ``Handle``.

Membership client states: ``peer.core.states`` (one transition table; an illegal move raises LocalError)::

    joining --Welcome--> pending --EpochUpdate with me--> member --Stale--> stale --rejoin()--> joining
    member --coordinator dead--> reforming --EpochUpdate from successor--> member
                                           --no candidate answers--> stale
    (coordinator role) --lost quorum--> stale (a member) or redirector (standalone)

A stale peer rejoins through the coordinator it last heard of, its ``--join`` addresses, and the members of
its last epoch (any live member answers a Join with a Redirect to its coordinator).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Any, Callable, Optional

import zmq

from collectives import wire
from collectives.errors import (LocalError, ProtocolError, StaleError, TooFewPeers,
                                WireError)
from collectives.transport import Bad, LinkEvent, Received, Transport
from peer.config import PeerConfig, normalize_addr
from peer.core.actions import (Action, Admitted, Connect, Data, Drop, Note, Out, Probe, Suspect, ToCoordinator,
                               ViaAddr, Wake)
from peer.core.coordinator import CoordinatorCore
from peer.core.member import FROM_COORDINATOR, TO_COORDINATOR, MemberCore
from peer.core.ops import OpEngine, OpSpec
from peer.core.probes import PROBE_GRACE_S, Probes
from peer.core.states import NodeState
from peer.handle import Handle
from peer.logs import peer_log


class Node:
    def __init__(self, cfg: PeerConfig) -> None:
        self.cfg = cfg
        self.t = cfg.timeouts
        self.id = cfg.peer_id
        self.log = peer_log(__name__, self.id)
        self.transport = Transport(cfg.peer_id, cfg.host, cfg.port, limits=cfg.limits,
                                   security=cfg.security.build(cfg.peer_id))
        self.addr = normalize_addr(cfg.advertise) if cfg.advertise else self.transport.addr
        self.engine = OpEngine(self.id, cfg.slice_bytes, cfg.parity_digest, cfg.max_early_bytes,
                               clock=time.monotonic, owns_payloads=self.transport.private_payloads)
        self.transport.set_landing(self.engine.landing)
        self.member = MemberCore(self.id, self.addr, self.t, self.engine, time.monotonic(), swarm=cfg.swarm,
                                 member=cfg.member, coordinator=cfg.coordinator,
                                 join=[normalize_addr(a) for a in cfg.join],
                                 bandwidth_probes=cfg.bandwidth_probes)
        self.admitted = threading.Condition()
        self.topology_waiters: list[Handle] = []
        self.events: list[tuple[float, str, str]] = []  # (wall time, kind, detail): membership history
        self._cmds: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.Queue()
        self._cmds_lock = threading.Lock()  # ``call`` against the crash handler's drain of ``_cmds``
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.transport.poller.register(self._wake_r, zmq.POLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"swarm-{self.id}", daemon=True)
        self.error: Optional[BaseException] = None
        self.probes = Probes(self._send, time.perf_counter)
        self._epoch_seen, self._epoch_at = -1, 0.0  # ``_hold_early_data``

    # the membership client's view, read by Swarm and tests (the I/O thread writes it)
    @property
    def state(self) -> NodeState:
        return self.member.state

    @property
    def term(self) -> int:
        return self.member.term

    @property
    def epoch(self) -> int:
        return self.member.epoch

    @property
    def members(self) -> list[str]:
        return self.member.members

    @property
    def addrs(self) -> dict[str, str]:
        return self.member.addrs

    @property
    def coord(self) -> Optional[CoordinatorCore]:
        return self.member.coord

    @property
    def coord_id(self) -> str:
        return self.member.coord_id

    # ------------------------------------------------------------------ thread plumbing
    def start(self) -> "Node":
        self._thread.start()
        if self.cfg.member:
            self.call(lambda: self._apply(self.member.start(time.monotonic())))
        return self

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the I/O thread. Once that thread has crashed, nothing runs: every handle in
        ``args`` fails at once with the crash, instead of waiting out its deadline."""
        with self._cmds_lock:
            if self.error is None:
                self._cmds.put((fn, args))
        if self.error is not None:
            _fail_handles(args, self.error)
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # pipe closed during shutdown
            pass

    def close(self, timeout: float = 5.0) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self.call(lambda: None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.log.error("I/O thread did not stop within %.1fs", timeout)
            return
        self.transport.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                events, woke = self.transport.poll(50, extra=self._wake_r)
                if woke:
                    try:
                        os.read(self._wake_r, 65536)
                    except BlockingIOError:
                        pass
                while True:
                    try:
                        fn, args = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    fn(*args)
                now = time.monotonic()
                for ev in events:
                    self._on_event(ev, now)
                self._tick(time.monotonic())
                self._hold_early_data(time.monotonic())
        except Exception as exc:  # the I/O thread must never die silently (I5)
            self.log.exception("I/O thread crashed")
            with self._cmds_lock:
                self.error = exc
            self._apply(self.engine.fail_all(lambda: _crashed(exc)))
            self._wake_waiters(_crashed(exc))
            while True:  # commands queued before the crash will never run
                try:
                    _, args = self._cmds.get_nowait()
                except queue.Empty:
                    break
                _fail_handles(args, exc)

    def _hold_early_data(self, now: float) -> None:
        """Secure mode: while no op runs here, stop reading the data socket, so that what a peer that runs
        ahead sends for the next op waits there (TCP pushes back on the sender) instead of being decrypted
        into fresh arrays (the peak-memory transient of early data); the next op reads it straight into
        its scratch. Not after a point-to-point op: a pipeline stage wants its next activation to stream
        in while it computes. Never while a bandwidth probe may be arriving (they are timed here): while
        one is partly in, and, within ``PROBE_GRACE_S`` of an epoch change, while a member's has not come."""
        members = self.member.members
        if self.member.epoch != self._epoch_seen:
            self._epoch_seen, self._epoch_at = self.member.epoch, now
            self.probes.keep_heard(members)
        probing = self.probes.receiving or (now - self._epoch_at < PROBE_GRACE_S and
                                            self.probes.awaiting(self.id, members))
        self.transport.hold_data(self.state is NodeState.MEMBER and not self.engine.running and not probing
                                 and self.engine.last_kind not in ("send", "recv"))

    def _note(self, kind: str, detail: str) -> None:
        self.events.append((time.time(), kind, detail))
        if len(self.events) > 10000:
            del self.events[:1000]

    # ------------------------------------------------------------------ sending
    def _send(self, to: str, msg: wire.Message, payload: Any = None) -> None:
        if to != self.id and to not in self.transport.links:
            addr = self.addrs.get(to)
            if addr is None:
                self.log.debug("no address for %s; dropping %s", to, type(msg).__name__)
                return
            self.transport.connect(to, addr)
        self.transport.send(to, msg, payload)

    def _to_coordinator(self, msg: wire.Message) -> None:
        if self.member.coord_id:
            self._send(self.member.coord_id, msg)

    def _suspect(self, peer: str, reason: str) -> None:
        self.log.warning("suspect %s: %s", peer, reason)
        self._note("suspect", f"{peer}: {reason}")
        self._to_coordinator(wire.Suspect(self.term, self.epoch, peer, wire.clip(reason)))

    def _send_via(self, addr: str, seed: str, msg: wire.Message) -> None:
        """Reuse a link we already have to ``addr``: a second socket with our identity to the same ROUTER would
        take the identity over and drop the first one's messages."""
        key = next((p for p, link in self.transport.links.items() if link.addr == addr), None)
        if key is None:
            self.transport.disconnect(seed)
            self.transport.connect(seed, addr)
            key = seed
        self._send(key, msg)

    def _apply(self, actions: list[Action]) -> None:
        """Do what a core asked, in order: the one place where the cores' decisions become I/O."""
        for a in actions:
            if isinstance(a, (Out, Data)):
                self._send(a.to, a.msg, a.payload if isinstance(a, Data) else None)
            elif isinstance(a, ToCoordinator):
                self._to_coordinator(a.msg)
            elif isinstance(a, Suspect):
                self._suspect(a.peer, a.reason)
            elif isinstance(a, Connect):
                if a.remember:
                    self.addrs[a.peer] = a.addr
                if a.peer != self.id:
                    self.transport.connect(a.peer, a.addr)
            elif isinstance(a, Drop):
                if a.peer not in self.members and a.peer != self.coord_id:
                    self.transport.disconnect(a.peer)
            elif isinstance(a, ViaAddr):
                self._send_via(a.addr, a.seed, a.msg)
            elif isinstance(a, Note):
                self._note(a.kind, a.detail)
            elif isinstance(a, Wake):
                self._wake_waiters(a.error)
            elif isinstance(a, Admitted):
                with self.admitted:
                    self.admitted.notify_all()
            elif isinstance(a, Probe):
                self.probes.probe_new(self.id, a.epoch, a.members)
        self.engine.flush()  # checksums of the slices just forwarded, while they are warm

    # ------------------------------------------------------------------ events
    def _on_event(self, ev: Any, now: float) -> None:
        if isinstance(ev, Received):
            try:
                self._on_message(ev.sender, ev.msg, ev.payload, now)
            except (WireError, ProtocolError) as exc:  # a peer's fault: drop it, keep serving the rest
                self._on_event(Bad(ev.sender, WireError(str(exc))), now)
        elif isinstance(ev, LinkEvent) and ev.kind == "data_lost":
            self._apply(self.engine.link_lost(ev.peer, now))
        elif isinstance(ev, LinkEvent):
            self._apply(self.member.on_link(ev.peer, ev.kind, now))
        elif isinstance(ev, Bad):
            self.log.warning("bad message from %r: %s", ev.sender, ev.error)
            self._apply(self.member.on_bad(ev.sender, str(ev.error)))

    def _on_message(self, sender: str, msg: wire.Message, payload: Any, now: float) -> None:
        if isinstance(msg, wire.Chunk):
            self._apply(self.engine.on_chunk(sender, msg, payload, now))
        elif isinstance(msg, wire.P2PAck):
            self._apply(self.engine.on_ack(sender, msg, now))
        elif isinstance(msg, wire.BwProbe):
            rate = self.probes.on_probe(sender, msg, payload)
            if rate is not None:
                self._apply(self.member.bandwidth(sender, rate))
        elif isinstance(msg, (TO_COORDINATOR, FROM_COORDINATOR)):
            self._apply(self.member.on_message(sender, msg, now,
                                               coord_up=self.transport.is_up(self.member.coord_id)))

    def _wake_waiters(self, error: Optional[BaseException]) -> None:
        waiters, self.topology_waiters = self.topology_waiters, []
        for h in waiters:
            if error is None:
                h.resolve(self.epoch)
            else:
                h.fail(error)

    # ------------------------------------------------------------------ timers
    def _tick(self, now: float) -> None:
        self._apply(self.member.tick(now))
        self._apply(self.engine.tick(now, self.t.op_progress_timeout))

    # ------------------------------------------------------------------ commands (I/O thread)
    def submit_op(self, spec: OpSpec, handle: Handle) -> None:
        if self.state is NodeState.STALE:
            handle.fail(StaleError(f"{self.id} is stale: rejoin first"))
        elif self.state is not NodeState.MEMBER:
            handle.fail(TooFewPeers(f"{self.id} is not a member yet (state {self.state})",
                                    epoch=self.epoch, reason="not admitted") if self.state is NodeState.REFORMING
                        else LocalError(f"{self.id} is not a member (state {self.state})"))
        else:
            self._apply(self.engine.issue(spec, handle, time.monotonic()))

    def abort_op(self, handle: Handle, reason: str) -> None:
        """Ask the swarm to abort the op behind ``handle`` (its caller gave up)."""
        self._apply(self.engine.request_abort_for(handle, reason, time.monotonic()))

    def submit_topology(self, handle: Handle) -> None:
        if self.state is NodeState.STALE:
            handle.fail(StaleError(f"{self.id} is stale: rejoin first"))
            return
        if self.state is not NodeState.MEMBER:
            handle.fail(LocalError(f"{self.id} is not a member (state {self.state})"))
            return
        self.topology_waiters.append(handle)
        self._to_coordinator(wire.TopologyVote(self.term, self.epoch))

    def submit_rejoin(self, handle: Handle) -> None:
        """Leave the stale state and ask to be admitted again."""
        try:
            actions = self.member.rejoin(time.monotonic())
        except LocalError as exc:
            handle.fail(exc)
            return
        self._apply(actions)
        handle.resolve(None)

    def submit_leave(self, handle: Handle) -> None:
        self._apply(self.member.leave())
        handle.resolve(None)


def _crashed(exc: BaseException) -> LocalError:
    return LocalError(f"peer I/O thread crashed: {exc!r}")


def _fail_handles(args: tuple[Any, ...], crash: BaseException) -> None:
    for arg in args:
        if isinstance(arg, Handle):
            arg.fail(_crashed(crash))
