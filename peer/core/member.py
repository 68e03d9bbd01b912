"""The membership client: how this peer joins, follows epochs, notices a dead coordinator, re-forms the swarm
under a successor, goes stale and rejoins; and, when this process holds the coordinator role, the hosted
``CoordinatorCore``.

Pure, like the other cores: every entry point takes the message or event and ``now`` and returns actions
(``peer.core.actions``); ``peer.node`` does the I/O. Facts only the driver knows (is the link to our
coordinator up) come in as arguments. The op engine is a pure core too: the membership client calls it where
membership decides an op's fate (a new epoch, going stale, a verdict) and returns its actions in order.

States and their one transition table: ``peer.core.states`` (an illegal move raises ``LocalError``).

Joining: a Join goes to each known address in turn (the last coordinator, ``--join``, the last epoch's
members; any member answers with a Redirect to its coordinator) until admitted or ``join_timeout``.

When the coordinator is presumed dead (no heartbeat ack for ``coordinator_timeout``, its link down for
longer than ``reconnect_grace``, or its host refused the connection), the survivors send a ``Rejoin`` (their
last epoch and the verdicts they hold) to the first surviving member of the last epoch. That member takes
the coordinator role in reform mode (``CoordinatorCore(reform_expected=...)``); if it does not answer within
``Timeouts.candidate_timeout``, the next candidate is tried. No candidate left: stale.
"""

from __future__ import annotations

from typing import Callable, Optional

from collectives import wire
from collectives.errors import CoordinatorUnavailable, LocalError, StaleError
from peer.config import Timeouts
from peer.core.actions import Action, Admitted, Connect, Drop, Note, Out, Probe, Suspect, ViaAddr, Wake
from peer.core.coordinator import CoordinatorCore
from peer.core.ops import OpEngine
from peer.core.states import NODE_TRANSITIONS, NodeState, transition
from peer.logs import peer_log

SEED = "@seed"  # the transport key of a link to a join address whose peer id we do not know yet

TO_COORDINATOR = (wire.Join, wire.Heartbeat, wire.Leave, wire.TopologyVote, wire.OpDone, wire.OpFail,
                  wire.Suspect, wire.Rejoin, wire.BwReport)
FROM_COORDINATOR = (wire.Welcome, wire.HeartbeatAck, wire.EpochUpdate, wire.TopologyDone, wire.OpVerdict,
                    wire.Stale, wire.Redirect)


class MemberCore:
    """``member``: this peer takes part in collectives (else a standalone coordinator). ``coordinator``: it
    starts the swarm (holds the role from the start). ``join``: addresses to ask for admission."""

    def __init__(self, me: str, addr: str, timeouts: Timeouts, engine: OpEngine, now: float, *, swarm: str,
                 member: bool, coordinator: bool, join: list[str], bandwidth_probes: bool = False) -> None:
        self.id, self.addr, self.t, self.swarm = me, addr, timeouts, swarm
        self.is_member, self.bandwidth_probes = member, bandwidth_probes
        self.engine = engine
        self.log = peer_log(__name__, me)
        self._state = NodeState.JOINING if member else NodeState.COORDINATOR
        self.term = 0
        self.epoch = 0
        self.members: list[str] = []
        self.addrs: dict[str, str] = {}
        self.coord_id = ""
        self.coord_addr = ""
        self.coord: Optional[CoordinatorCore] = None  # the coordinator role, when this process holds it
        self.last_ack = now
        self.coord_down_since: Optional[float] = None
        self.join_addrs = list(join)
        self.last_members: list[tuple[str, str]] = []  # (id, addr): where a stale peer also looks for the swarm
        self.dead: set[str] = set()  # peers whose host refused our connection since we last saw them up
        self.redirects = 0
        self.join_index = 0
        self.join_deadline = now + timeouts.join_timeout if member else 0.0
        self.join_retry_at = 0.0
        self.join_addr = ""  # the address our last Join went to
        self.reform_candidates: list[str] = []
        self.reform_term = 0
        self.reform_deadline = 0.0
        self.early_rejoins: list[tuple[str, wire.Rejoin]] = []
        self.old_coord_id = ""
        self.old_coord_addr = ""
        self.last_hb = 0.0
        self.last_tick = now
        if coordinator:
            self.coord = CoordinatorCore(me, addr, timeouts, now, swarm=swarm)
            self.coord_id, self.coord_addr, self.term = me, addr, 1

    @property
    def state(self) -> NodeState:
        return self._state

    @state.setter
    def state(self, new: NodeState) -> None:
        self._state = transition(NODE_TRANSITIONS, self._state, new)

    def _to_coord(self, msg: wire.Message) -> list[Action]:
        """To the coordinator as of now (not as of when the driver applies the actions)."""
        return [Out(self.coord_id, msg)] if self.coord_id else []

    # ------------------------------------------------------------------ entry points
    def on_message(self, sender: str, msg: wire.Message, now: float, *, coord_up: bool) -> list[Action]:
        """A membership message (``TO_COORDINATOR`` or ``FROM_COORDINATOR``). ``coord_up``: the link to our
        coordinator is up (the driver's transport knows)."""
        if isinstance(msg, TO_COORDINATOR):
            return self._to_coordinator_role(sender, msg, now, coord_up)
        if isinstance(msg, FROM_COORDINATOR):
            return self._from_coordinator(sender, msg, now)
        return []

    def on_link(self, peer: str, kind: str, now: float) -> list[Action]:
        """A control link went ``up``, ``down``, was ``refused`` or failed authentication."""
        out: list[Action] = []
        if kind == "refused":
            self.dead.add(peer)  # proof (its host refused): it cannot be in any swarm
        elif kind == "up":
            self.dead.discard(peer)
        if self.coord is not None:
            out += self.coord.on_link(peer, kind, now)
        if peer == self.coord_id and self.coord is None:
            if kind == "down":
                self.coord_down_since = now
            elif kind == "up":
                self.coord_down_since = None
            elif kind == "refused" and self.coord_down_since is not None:
                out += self._coordinator_dead(now, "connection refused")
        return out

    def on_bad(self, sender: str, error: str) -> list[Action]:
        """``sender`` sent something malformed or breached the protocol."""
        out: list[Action] = [Note("bad_input", f"{sender}: {error}")]
        if sender and sender in self.members:
            out.append(Suspect(sender, f"protocol: {error}"))
        if sender and self.coord is not None:
            out += self.coord.evict(sender, f"protocol: {error}")
        return out

    def bandwidth(self, sender: str, rate: float) -> list[Action]:
        """A probe from ``sender`` arrived at ``rate`` bytes/s: report it while we are a member."""
        if self.state is not NodeState.MEMBER:
            return []
        return self._to_coord(wire.BwReport(self.term, self.epoch, sender, rate))

    def start(self, now: float) -> list[Action]:
        """Ask to be admitted (a member's first step)."""
        self.state = NodeState.JOINING
        self.join_deadline = now + self.t.join_timeout
        if self.coord is not None and self.coord_id == self.id:
            self.state = NodeState.PENDING
            return [Out(self.id, wire.Join(self.id, self.addr, self.swarm))]
        first = [self.coord_addr] if self.coord_addr and self.coord_addr != self.addr else []
        self.join_addrs = list(dict.fromkeys(first + self.join_addrs + [a for _, a in self.last_members]))
        self.join_index = 0  # the coordinator we last heard of first
        return self._try_join(now)

    def rejoin(self, now: float) -> list[Action]:
        """Leave the stale (or any non-terminal) state and ask to be admitted again; ``LocalError`` if this
        peer cannot (it left, or it is a standalone coordinator)."""
        if NodeState.JOINING not in NODE_TRANSITIONS[self.state] and self.state is not NodeState.JOINING:
            raise LocalError(f"{self.id} cannot rejoin (state {self.state})")
        self.members, self.epoch = [], 0
        return self.start(now)

    def leave(self) -> list[Action]:
        """Leave for good (terminal): tell the coordinator, fail what is still open."""
        out = self._to_coord(wire.Leave(self.term, self.epoch)) \
            if self.state in (NodeState.MEMBER, NodeState.PENDING) else []
        self.state = NodeState.LEFT
        return out + self.engine.fail_all(lambda: LocalError("left the swarm"))

    def tick(self, now: float) -> list[Action]:
        """Timers: local stalls, the hosted coordinator, heartbeats, the coordinator's silence, join retries
        and deadlines, successor candidates that do not answer."""
        out: list[Action] = []
        if now - self.last_tick > self.t.local_stall:
            # We were not running (SIGSTOP, swap, a long GC): the silence was ours, not the coordinator's.
            self.log.warning("local stall of %.1fs; checking in before judging others", now - self.last_tick)
            out.append(Note("local_stall", f"{now - self.last_tick:.1f}s"))
            self.last_ack = now
            self.last_hb = 0.0
        self.last_tick = now
        if self.coord is not None:
            out += self.coord.tick(now)
            if self.coord.failed_reform:
                self.coord = None
                out += self._become_stale(wire.Stale(self.term, self.epoch, self.old_coord_id,
                                                     self.old_coord_addr, "no quorum to re-form"))
            elif self.coord.lost_quorum:
                out += self._step_down()
        if self.state in (NodeState.MEMBER, NodeState.PENDING) and self.coord_id:
            if now - self.last_hb >= self.t.heartbeat_interval:
                self.last_hb = now
                out += self._to_coord(wire.Heartbeat(self.term, self.epoch))
            if self.coord is None:
                if now - self.last_ack > self.t.coordinator_timeout:
                    out += self._coordinator_dead(now, f"no heartbeat ack for {now - self.last_ack:.1f}s")
                elif self.coord_down_since is not None and now - self.coord_down_since > self.t.reconnect_grace:
                    out += self._coordinator_dead(now, "link down")
        elif self.state is NodeState.JOINING:
            if now > self.join_deadline:
                self.state = NodeState.STALE
                out += [Wake(CoordinatorUnavailable("could not join: no coordinator answered")), Admitted()]
            elif now >= self.join_retry_at:
                out += self._try_join(now)
        elif self.state is NodeState.REFORMING and (now > self.reform_deadline or self.reform_candidates[:1] and
                                                    self.reform_candidates[0] in self.dead):
            if self.reform_candidates:
                self.reform_candidates.pop(0)
            out += self._next_candidate(now)
        return out

    # ------------------------------------------------------------------ messages for the coordinator role
    def _to_coordinator_role(self, sender: str, msg: wire.Message, now: float, coord_up: bool) -> list[Action]:
        if self.coord is not None:
            return self.coord.on_message(sender, msg, now)
        if isinstance(msg, wire.Join) and self.state is NodeState.REDIRECTOR and msg.peer_id == sender:
            return self._redirect_joiner(sender, msg)
        if isinstance(msg, wire.Join) and self.state is NodeState.MEMBER and msg.peer_id == sender:
            self.addrs.setdefault(sender, msg.addr)
            return [Connect(sender, msg.addr, remember=False), Out(sender, wire.Redirect(self.coord_id,
                                                                                          self.coord_addr))]
        if isinstance(msg, wire.Rejoin) and msg.term > self.term and sender in self.members:
            # A survivor thinks the coordinator is dead and that I am its successor.
            self.addrs.setdefault(sender, msg.addr)
            if self.state is NodeState.MEMBER and coord_up and now - self.last_ack < self.t.ack_fresh:
                # Our coordinator answers: the sender was stalled or cut off, not the coordinator.
                return [Connect(sender, msg.addr, remember=False),
                        Out(sender, wire.Redirect(self.coord_id, self.coord_addr))]
            self.early_rejoins.append((sender, msg))
            if self.state is NodeState.MEMBER and not coord_up:
                return self._coordinator_dead(now, f"{sender} reports it gone")
        return []

    def _redirect_joiner(self, sender: str, msg: wire.Join) -> list[Action]:
        """(standalone coordinator that stepped down) Send a joiner to a member of our last epoch."""
        if not self.last_members:
            return []
        self.redirects += 1
        member, addr = self.last_members[self.redirects % len(self.last_members)]
        return [Connect(sender, msg.addr, remember=False), Out(sender, wire.Redirect(member, addr))]

    # ------------------------------------------------------------------ messages from a coordinator
    def _from_coordinator(self, sender: str, msg: wire.Message, now: float) -> list[Action]:
        if self.state is NodeState.LEFT:
            return []  # we left: no coordinator moves us any more
        term = getattr(msg, "term", None)
        if isinstance(msg, wire.Stale):
            if self.state in (NodeState.JOINING, NodeState.PENDING) and msg.refused_epoch > 0:
                # It refuses a message of our former membership (queued while we were cut off, delivered
                # before our Join): it says nothing about this join, and the Welcome follows it.
                self.log.info("ignoring a Stale for our former membership (epoch %d): %s", msg.refused_epoch,
                              msg.reason)
                return []
            if sender == self.coord_id or (msg.term > self.term and self._may_lead(sender)):
                return self._become_stale(msg)
            return []
        if isinstance(msg, wire.Redirect):
            if self.state is NodeState.REFORMING and msg.coord_id == self.coord_id:
                # The coordinator we gave up on is alive for the others: ask it where we stand.
                self.state = NodeState.MEMBER
                self.last_ack = now
                return [Out(self.coord_id, wire.Heartbeat(self.term, self.epoch))]
            if self.state is NodeState.JOINING:
                return self._send_join(msg.coord_addr)
            return []
        if term is not None and term < self.term:
            # An old coordinator that has been replaced: tell it (the driver drops it if it cannot reach it).
            return [Out(sender, wire.Stale(self.term, self.epoch, self.coord_id, self.coord_addr,
                                           "your term is over"))]
        if isinstance(msg, wire.Welcome):
            if self.state is not NodeState.JOINING:
                return []
            self.state = NodeState.PENDING
            out = self._adopt_coordinator(sender, self.join_addr or self.coord_addr, msg.term, now)
            return out + [Note("pending", f"waiting for admission by {sender}")]
        if sender != self.coord_id and not (isinstance(msg, wire.EpochUpdate) and
                                            (term or 0) >= self.term and self._may_lead(sender)) \
                and not self._successor_verdict(sender, msg):
            return []
        if isinstance(msg, wire.HeartbeatAck):
            self.last_ack = now
        elif isinstance(msg, wire.EpochUpdate):
            return self._on_epoch(msg, now)
        elif isinstance(msg, wire.OpVerdict):
            return self.engine.on_verdict(msg, now)
        elif isinstance(msg, wire.TopologyDone):
            return [Wake(None)]
        return []

    def _successor_verdict(self, sender: str, msg: wire.Message) -> bool:
        """While re-forming, the candidate we sent our Rejoin to resolves our in-doubt ops *before* the
        EpochUpdate that makes it our coordinator (which aborts whatever is still open): take those verdicts,
        or an op the old coordinator committed on some members would abort on the others (I2)."""
        return (isinstance(msg, wire.OpVerdict) and self.state is NodeState.REFORMING
                and bool(self.reform_candidates) and sender == self.reform_candidates[0]
                and msg.term == self.reform_term)

    def _may_lead(self, sender: str) -> bool:
        """Besides our coordinator, only a member of our epoch (a successor) may end our term or install a new
        epoch: any other authenticated peer could otherwise hijack membership. A joiner has no epoch yet."""
        return self.state is NodeState.JOINING or sender in self.members or (
            self.coord is not None and sender in self.coord.members)

    def _adopt_coordinator(self, coord_id: str, coord_addr: str, term: int, now: float) -> list[Action]:
        self.coord_id, self.coord_addr, self.term = coord_id, coord_addr, term
        self.addrs[coord_id] = coord_addr
        self.last_ack = now
        self.coord_down_since = None
        out: list[Action] = [Drop(SEED)]
        if coord_id != self.id:
            out.append(Connect(coord_id, coord_addr))
        return out

    def _on_epoch(self, msg: wire.EpochUpdate, now: float) -> list[Action]:
        if msg.term == self.term and msg.epoch <= self.epoch and self.state is NodeState.MEMBER:
            return []
        if self.coord is not None and msg.coord_id != self.id:
            self.coord = None  # someone else coordinates now
        new_term = msg.term != self.term
        out = self._adopt_coordinator(msg.coord_id, msg.coord_addr, msg.term, now)
        old = set(self.members)
        self.epoch = msg.epoch
        self.members = list(msg.member_ids)
        self.addrs.update(zip(msg.member_ids, msg.member_addrs))
        if self.id not in self.members:
            return out + self._become_stale(wire.Stale(msg.term, msg.epoch, msg.coord_id, msg.coord_addr,
                                                       "not in epoch"))
        self.state = NodeState.MEMBER
        self.reform_candidates = []
        out += [Connect(m, self.addrs[m]) for m in self.members if m != self.id]
        out += [Drop(m) for m in old - set(self.members) if m != self.coord_id]
        out += self.engine.new_epoch(msg.term, msg.epoch, self.members, msg.reason)
        if self.bandwidth_probes:
            out.append(Probe(self.epoch, tuple(self.members)))
        out.append(Note("epoch", f"{msg.epoch} {','.join(self.members)} ({msg.reason})"))
        self.log.info("epoch %d members=%s (%s)", msg.epoch, self.members, msg.reason)
        if new_term:
            out.append(Wake(None))  # votes cast under the old coordinator are void
        out.append(Admitted())
        return out

    # ------------------------------------------------------------------ losing the coordinator
    def _remember_members(self) -> None:
        """Keep the last epoch's members and addresses: a stale peer looks for the swarm there."""
        core = self.coord
        ids = core.members if core is not None else self.members
        found = [(m, self.addrs.get(m) or (core.addrs.get(m, "") if core is not None else "")) for m in ids]
        found = [(m, a) for m, a in found if a and m != self.id and a != self.addr]
        if found:
            self.last_members = found

    def _become_stale(self, msg: wire.Stale) -> list[Action]:
        if self.coord is not None and msg.term >= self.term and msg.coord_id != self.id:
            self.log.warning("stepping down as coordinator (term %d < %d)", self.term, msg.term)
            self.coord = None
        self._remember_members()
        self.coord_id, self.coord_addr = msg.coord_id, msg.coord_addr
        self.addrs[msg.coord_id] = msg.coord_addr
        if self.state is NodeState.LEFT:
            return []
        if not self.is_member:
            self.state = NodeState.REDIRECTOR
            return []
        if self.state is NodeState.STALE:
            return []
        self.state = NodeState.STALE
        self.log.warning("stale (%s); rejoin to take part again", msg.reason)
        error: Callable[[], BaseException] = lambda: StaleError(f"{self.id} is stale: {msg.reason}")
        return [Note("stale", msg.reason), *self.engine.fail_all(error), Wake(error()), Admitted()]

    def _step_down(self) -> list[Action]:
        """Our coordinator core lost its quorum: give up the role (its ops are already aborted)."""
        self._remember_members()
        self.coord = None
        out: list[Action] = [Note("coordinator", "stepped down: lost quorum")]
        return out + self._become_stale(wire.Stale(self.term, self.epoch, self.id, self.addr,
                                                   "coordinator lost its quorum"))

    def _coordinator_dead(self, now: float, why: str) -> list[Action]:
        if self.state is not NodeState.MEMBER or self.coord is not None:
            if self.state in (NodeState.PENDING, NodeState.JOINING):
                self.state = NodeState.JOINING
                return [Note("coordinator_lost", why), *self._try_join(now)]
            return []
        self.log.warning("coordinator %s presumed dead (%s)", self.coord_id, why)
        self.reform_candidates = [m for m in self.members if m != self.coord_id]
        self.old_coord_id, self.old_coord_addr = self.coord_id, self.coord_addr
        self.reform_term = self.term + 1
        self.state = NodeState.REFORMING
        return [Note("coordinator_lost", f"{self.coord_id}: {why}"), *self._next_candidate(now)]

    def _next_candidate(self, now: float) -> list[Action]:
        while self.reform_candidates and self.reform_candidates[0] in self.dead \
                and self.reform_candidates[0] != self.id:
            self.reform_candidates.pop(0)  # proven gone: do not wait for it
        if not self.reform_candidates:
            gone = self._become_stale(wire.Stale(self.term, self.epoch, self.coord_id,
                                                 self.coord_addr or self.addr, "no successor reachable"))
            return gone + self.engine.fail_all(lambda: CoordinatorUnavailable("no coordinator reachable"))
        cand = self.reform_candidates[0]
        rejoin = wire.Rejoin(self.reform_term, self.epoch, self.addr, tuple(self.engine.recent_committed),
                             tuple(self.engine.awaiting_keys()))
        self.reform_deadline = now + self.t.candidate_timeout
        if cand != self.id:
            return [Out(cand, rejoin)]
        survivors = [(m, self.addrs[m]) for m in self.reform_candidates if m not in self.dead]
        self.coord = CoordinatorCore(self.id, self.addr, self.t, now, swarm=self.swarm, term=self.reform_term,
                                     epoch=self.epoch, members=survivors,
                                     reform_expected={m for m, _ in survivors})
        self.log.warning("taking over as coordinator (term %d)", self.reform_term)
        self.coord_id, self.coord_addr = self.id, self.addr
        out: list[Action] = [Note("coordinator", f"taking over as coordinator, term {self.reform_term}")]
        out += [Connect(m, a, remember=False) for m, a in survivors if m != self.id]
        out.append(Out(self.id, rejoin))
        for sender, early in self.early_rejoins:
            if early.term == self.reform_term:
                out += self.coord.on_message(sender, early, now)
        self.early_rejoins.clear()
        return out

    # ------------------------------------------------------------------ (re)joining
    def _try_join(self, now: float) -> list[Action]:
        if not self.join_addrs:
            return []
        addr = self.join_addrs[self.join_index % len(self.join_addrs)]
        self.join_index += 1
        self.join_retry_at = now + self.t.join_retry
        return self._send_join(addr)

    def _send_join(self, addr: str) -> list[Action]:
        self.join_addr = addr
        return [ViaAddr(addr, SEED, wire.Join(self.id, self.addr, self.swarm))]
