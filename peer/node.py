"""The peer node: one I/O thread that owns the transport, the membership client, the op engine and
(when this process holds the role) the coordinator core.

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
from collectives.errors import (CoordinatorUnavailable, LocalError, ProtocolError, StaleError, TooFewPeers,
                                WireError)
from collectives.transport import Bad, LinkEvent, Received, Transport
from peer.config import PeerConfig, normalize_addr
from peer.core.actions import Action, Connect, Data, Drop, Out, Suspect, ToCoordinator
from peer.core.coordinator import CoordinatorCore
from peer.handle import Handle
from peer.logs import peer_log
from peer.core.ops import OpEngine, OpSpec
from peer.failover import SEED, FailoverMixin
from peer.core.probes import Probes
from peer.core.states import NODE_TRANSITIONS, NodeState, transition

_TO_COORDINATOR = (wire.Join, wire.Heartbeat, wire.Leave, wire.TopologyVote, wire.OpDone, wire.OpFail,
                   wire.Suspect, wire.Rejoin, wire.BwReport)
_FROM_COORDINATOR = (wire.Welcome, wire.HeartbeatAck, wire.EpochUpdate, wire.TopologyDone, wire.OpVerdict,
                     wire.Stale, wire.Redirect)


class Node(FailoverMixin):
    def __init__(self, cfg: PeerConfig) -> None:
        self.cfg = cfg
        self.t = cfg.timeouts
        self.id = cfg.peer_id
        self.log = peer_log(__name__, self.id)
        self.transport = Transport(cfg.peer_id, cfg.host, cfg.port, limits=cfg.limits,
                                   security=cfg.security.build(cfg.peer_id))
        self.addr = normalize_addr(cfg.advertise) if cfg.advertise else self.transport.addr
        self._state = NodeState.JOINING if cfg.member else NodeState.COORDINATOR
        self.term = 0
        self.epoch = 0
        self.members: list[str] = []
        self.addrs: dict[str, str] = {}
        self.coord_id = ""
        self.coord_addr = ""
        self.coord: Optional[CoordinatorCore] = None
        self.last_ack = time.monotonic()
        self.coord_down_since: Optional[float] = None
        self.join_addrs = [normalize_addr(a) for a in cfg.join]
        self.last_members: list[tuple[str, str]] = []  # (id, addr): where a stale peer also looks for the swarm
        self.dead: set[str] = set()  # peers whose host refused our connection since we last saw them up
        self.redirects = 0
        self.join_index = 0
        self.join_deadline = 0.0
        self.join_retry_at = 0.0
        self.reform_candidates: list[str] = []
        self.reform_term = 0
        self.reform_deadline = 0.0
        self.early_rejoins: list[tuple[str, wire.Rejoin]] = []
        self.engine = OpEngine(self.id, cfg.slice_bytes, cfg.parity_digest, cfg.max_early_bytes,
                               clock=time.monotonic)
        self.admitted = threading.Condition()
        self.topology_waiters: list[Handle] = []
        self.events: list[tuple[float, str, str]] = []  # (wall time, kind, detail): membership history
        self._cmds: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self.transport.poller.register(self._wake_r, zmq.POLLIN)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"swarm-{self.id}", daemon=True)
        self.error: Optional[BaseException] = None
        self._last_hb = 0.0
        self.probes = Probes(self._send, time.perf_counter)
        self._join_addr = ""
        self._last_tick = time.monotonic()
        self.old_coord_id = ""
        self.old_coord_addr = ""
        now = time.monotonic()
        if cfg.coordinator:
            self.coord = CoordinatorCore(self.id, self.addr, self.t, now, swarm=cfg.swarm)
            self.coord_id, self.coord_addr, self.term = self.id, self.addr, 1
        if cfg.member:
            self.join_deadline = now + self.t.join_timeout

    @property
    def state(self) -> NodeState:
        return self._state

    @state.setter
    def state(self, new: NodeState) -> None:
        self._state = transition(NODE_TRANSITIONS, self._state, new)

    # ------------------------------------------------------------------ thread plumbing
    def start(self) -> "Node":
        self._thread.start()
        if self.cfg.member:
            self.call(self._begin_join)
        return self

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the I/O thread."""
        self._cmds.put((fn, args))
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
        except Exception as exc:  # the I/O thread must never die silently (I5)
            self.log.exception("I/O thread crashed")
            self.error = exc
            self._apply(self.engine.fail_all(lambda: LocalError(f"peer I/O thread crashed: {exc!r}")))
            self._wake_waiters(LocalError(f"peer I/O thread crashed: {exc!r}"))

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
        if self.coord_id:
            self._send(self.coord_id, msg)

    def _suspect(self, peer: str, reason: str) -> None:
        self.log.warning("suspect %s: %s", peer, reason)
        self._note("suspect", f"{peer}: {reason}")
        self._to_coordinator(wire.Suspect(self.term, self.epoch, peer, wire.clip(reason)))

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
                self.addrs[a.peer] = a.addr
                if a.peer != self.id:
                    self.transport.connect(a.peer, a.addr)
            elif isinstance(a, Drop):
                if a.peer not in self.members and a.peer != self.coord_id:
                    self.transport.disconnect(a.peer)
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
            if ev.kind == "refused":
                self.dead.add(ev.peer)  # proof (its host refused): it cannot be in any swarm
            elif ev.kind == "up":
                self.dead.discard(ev.peer)
            if self.coord is not None:
                self._apply(self.coord.on_link(ev.peer, ev.kind, now))
            if ev.peer == self.coord_id and self.coord is None:
                if ev.kind == "down":
                    self.coord_down_since = now
                elif ev.kind == "up":
                    self.coord_down_since = None
                elif ev.kind == "refused" and self.coord_down_since is not None:
                    self._coordinator_dead(now, "connection refused")
        elif isinstance(ev, Bad):
            self.log.warning("bad message from %r: %s", ev.sender, ev.error)
            self._note("bad_input", f"{ev.sender}: {ev.error}")
            if ev.sender and ev.sender in self.members:
                self._suspect(ev.sender, f"protocol: {ev.error}")
            if ev.sender and self.coord is not None:
                self._apply(self.coord.evict(ev.sender, f"protocol: {ev.error}"))

    def _on_message(self, sender: str, msg: wire.Message, payload: Any, now: float) -> None:
        if isinstance(msg, wire.Chunk):
            self._apply(self.engine.on_chunk(sender, msg, payload, now))
        elif isinstance(msg, wire.P2PAck):
            self._apply(self.engine.on_ack(sender, msg, now))
        elif isinstance(msg, wire.BwProbe):
            rate = self.probes.on_probe(sender, msg, payload)
            if rate is not None and self.state is NodeState.MEMBER:
                self._to_coordinator(wire.BwReport(self.term, self.epoch, sender, rate))
        elif isinstance(msg, _TO_COORDINATOR):
            self._to_coordinator_role(sender, msg, now)
        elif isinstance(msg, _FROM_COORDINATOR):
            self._from_coordinator(sender, msg, now)

    def _to_coordinator_role(self, sender: str, msg: wire.Message, now: float) -> None:
        if self.coord is not None:
            self._apply(self.coord.on_message(sender, msg, now))
            return
        if isinstance(msg, wire.Join) and self.state is NodeState.REDIRECTOR and msg.peer_id == sender:
            self._redirect_joiner(sender, msg)
        elif isinstance(msg, wire.Join) and self.state is NodeState.MEMBER and msg.peer_id == sender:
            self.transport.connect(sender, msg.addr)
            self.addrs.setdefault(sender, msg.addr)
            self._send(sender, wire.Redirect(self.coord_id, self.coord_addr))
        elif isinstance(msg, wire.Rejoin) and msg.term > self.term and sender in self.members:
            # A survivor thinks the coordinator is dead and that I am its successor.
            self.addrs.setdefault(sender, msg.addr)
            if self.state is NodeState.MEMBER and self.transport.is_up(self.coord_id) \
                    and now - self.last_ack < self.t.ack_fresh:
                # Our coordinator answers: the sender was stalled or cut off, not the coordinator.
                self.transport.connect(sender, msg.addr)
                self._send(sender, wire.Redirect(self.coord_id, self.coord_addr))
                return
            self.early_rejoins.append((sender, msg))
            if self.state is NodeState.MEMBER and not self.transport.is_up(self.coord_id):
                self._coordinator_dead(now, f"{sender} reports it gone")

    def _from_coordinator(self, sender: str, msg: wire.Message, now: float) -> None:
        if self.state is NodeState.LEFT:
            return  # we left: no coordinator moves us any more
        term = getattr(msg, "term", None)
        if isinstance(msg, wire.Stale):
            if sender == self.coord_id or (msg.term > self.term and self._may_lead(sender)):
                self._become_stale(msg, now)
            return
        if isinstance(msg, wire.Redirect):
            if self.state is NodeState.REFORMING and msg.coord_id == self.coord_id:
                # The coordinator we gave up on is alive for the others: ask it where we stand.
                self.state = NodeState.MEMBER
                self.last_ack = now
                self._send(self.coord_id, wire.Heartbeat(self.term, self.epoch))
                return
            if self.state is NodeState.JOINING:
                self._send_join(msg.coord_addr)
            return
        if term is not None and term < self.term:
            # An old coordinator that has been replaced: tell it.
            if sender in self.addrs or sender in self.transport.links:
                self._send(sender, wire.Stale(self.term, self.epoch, self.coord_id, self.coord_addr,
                                              "your term is over"))
            return
        if isinstance(msg, wire.Welcome):
            if self.state is NodeState.JOINING:
                self.state = NodeState.PENDING
                self._adopt_coordinator(sender, self._seed_addr(), msg.term)
                self._note("pending", f"waiting for admission by {sender}")
            return
        if sender != self.coord_id and not (isinstance(msg, wire.EpochUpdate) and
                                            (term or 0) >= self.term and self._may_lead(sender)) \
                and not self._successor_verdict(sender, msg):
            return
        if isinstance(msg, wire.HeartbeatAck):
            self.last_ack = now
        elif isinstance(msg, wire.EpochUpdate):
            self._on_epoch(sender, msg, now)
        elif isinstance(msg, wire.OpVerdict):
            self._apply(self.engine.on_verdict(msg, now))
        elif isinstance(msg, wire.TopologyDone):
            self._wake_waiters(None)

    def _successor_verdict(self, sender: str, msg: wire.Message) -> bool:
        """While re-forming, the candidate we sent our Rejoin to resolves our in-doubt ops *before* the
        EpochUpdate that makes it our coordinator (which aborts whatever is still open): take those verdicts,
        or an op the old coordinator committed on some members would abort on the others (I2)."""
        return (isinstance(msg, wire.OpVerdict) and self.state is NodeState.REFORMING and bool(self.reform_candidates)
                and sender == self.reform_candidates[0] and msg.term == self.reform_term)

    def _may_lead(self, sender: str) -> bool:
        """Besides our coordinator, only a member of our epoch (a successor) may end our term or install a new
        epoch: any other authenticated peer could otherwise hijack membership. A joiner has no epoch yet."""
        return self.state is NodeState.JOINING or sender in self.members or (
            self.coord is not None and sender in self.coord.members)

    def _adopt_coordinator(self, coord_id: str, coord_addr: str, term: int) -> None:
        self.transport.disconnect(SEED)
        if coord_id != self.id:
            self.transport.connect(coord_id, coord_addr)
        self.coord_id, self.coord_addr, self.term = coord_id, coord_addr, term
        self.addrs[coord_id] = coord_addr
        self.last_ack = time.monotonic()
        self.coord_down_since = None
        self.transport.disconnect(SEED)

    def _on_epoch(self, sender: str, msg: wire.EpochUpdate, now: float) -> None:
        if msg.term == self.term and msg.epoch <= self.epoch and self.state is NodeState.MEMBER:
            return
        if self.coord is not None and msg.coord_id != self.id:
            self.coord = None  # someone else coordinates now
        new_term = msg.term != self.term
        self._adopt_coordinator(msg.coord_id, msg.coord_addr, msg.term)
        old = set(self.members)
        self.epoch = msg.epoch
        self.members = list(msg.member_ids)
        self.addrs.update(zip(msg.member_ids, msg.member_addrs))
        if self.id not in self.members:
            self._become_stale(wire.Stale(msg.term, msg.epoch, msg.coord_id, msg.coord_addr, "not in epoch"),
                               now)
            return
        self.state = NodeState.MEMBER
        self.reform_candidates = []
        for m in self.members:
            if m != self.id:
                self.transport.connect(m, self.addrs[m])
        for m in old - set(self.members):
            if m != self.coord_id:
                self.transport.disconnect(m)
        self._apply(self.engine.new_epoch(msg.term, msg.epoch, self.members, msg.reason))
        if self.cfg.bandwidth_probes:
            self.probes.probe_new(self.id, self.epoch, self.members)
        self._note("epoch", f"{msg.epoch} {','.join(self.members)} ({msg.reason})")
        self.log.info("epoch %d members=%s (%s)", msg.epoch, self.members, msg.reason)
        if new_term:
            self._wake_waiters(None)  # votes cast under the old coordinator are void
        with self.admitted:
            self.admitted.notify_all()

    def _wake_waiters(self, error: Optional[BaseException]) -> None:
        waiters, self.topology_waiters = self.topology_waiters, []
        for h in waiters:
            if error is None:
                h.resolve(self.epoch)
            else:
                h.fail(error)

    def _become_stale(self, msg: wire.Stale, now: float) -> None:
        if self.coord is not None and msg.term >= self.term and msg.coord_id != self.id:
            self.log.warning("stepping down as coordinator (term %d < %d)", self.term, msg.term)
            self.coord = None
        self._remember_members()
        self.coord_id, self.coord_addr = msg.coord_id, msg.coord_addr
        self.addrs[msg.coord_id] = msg.coord_addr
        if self.state is NodeState.LEFT:
            return
        if not self.cfg.member:
            self.state = NodeState.REDIRECTOR
            return
        if self.state is NodeState.STALE:
            return
        self.state = NodeState.STALE
        self._note("stale", msg.reason)
        self.log.warning("stale (%s); rejoin to take part again", msg.reason)
        self._apply(self.engine.fail_all(lambda: StaleError(f"{self.id} is stale: {msg.reason}")))
        self._wake_waiters(StaleError(f"{self.id} is stale: {msg.reason}"))
        with self.admitted:
            self.admitted.notify_all()

    # ------------------------------------------------------------------ timers
    def _tick(self, now: float) -> None:
        if now - self._last_tick > self.t.local_stall:
            # We were not running (SIGSTOP, swap, a long GC): the silence was ours, not the coordinator's.
            self.log.warning("local stall of %.1fs; checking in before judging others",
                        now - self._last_tick)
            self._note("local_stall", f"{now - self._last_tick:.1f}s")
            self.last_ack = now
            self._last_hb = 0.0
        self._last_tick = now
        if self.coord is not None:
            self._apply(self.coord.tick(now))
            if self.coord.failed_reform:
                self.coord = None
                self._become_stale(wire.Stale(self.term, self.epoch, self.old_coord_id, self.old_coord_addr,
                                              "no quorum to re-form"), now)
            elif self.coord.lost_quorum:
                self._step_down(now)
        self._apply(self.engine.tick(now, self.t.op_progress_timeout))
        if self.state in (NodeState.MEMBER, NodeState.PENDING) and self.coord_id:
            if now - self._last_hb >= self.t.heartbeat_interval:
                self._last_hb = now
                self._to_coordinator(wire.Heartbeat(self.term, self.epoch))
            if self.coord is None:
                if now - self.last_ack > self.t.coordinator_timeout:
                    self._coordinator_dead(now, f"no heartbeat ack for {now - self.last_ack:.1f}s")
                elif self.coord_down_since is not None and now - self.coord_down_since > self.t.reconnect_grace:
                    self._coordinator_dead(now, "link down")
        elif self.state is NodeState.JOINING:
            if now > self.join_deadline:
                self.state = NodeState.STALE
                self._wake_waiters(CoordinatorUnavailable("could not join: no coordinator answered"))
                with self.admitted:
                    self.admitted.notify_all()
            elif now >= self.join_retry_at:
                self._try_join(now)
        elif self.state is NodeState.REFORMING and (now > self.reform_deadline or self.reform_candidates[:1] and
                                            self.reform_candidates[0] in self.dead):
            if self.reform_candidates:
                self.reform_candidates.pop(0)
            self._next_candidate(now)

    # ------------------------------------------------------------------ commands (I/O thread)
    def submit_op(self, spec: OpSpec, handle: Handle) -> None:
        if self.state is NodeState.STALE:
            handle.fail(StaleError(f"{self.id} is stale: rejoin first"))
        elif self.state is not NodeState.MEMBER:
            handle.fail(TooFewPeers(f"{self.id} is not a member yet (state {self.state})",
                                    reason="not admitted") if self.state is NodeState.REFORMING
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

    def submit_leave(self, handle: Handle) -> None:
        if self.state in (NodeState.MEMBER, NodeState.PENDING):
            self._to_coordinator(wire.Leave(self.term, self.epoch))
        self.state = NodeState.LEFT
        self._apply(self.engine.fail_all(lambda: LocalError("left the swarm")))
        handle.resolve(None)
