"""The coordinator role: orders membership epochs, runs topology votes, gives every op its one verdict.

Pure: it takes (sender, message, now) and link events, and returns actions; ``peer.node`` does the I/O.
It carries no tensor data. It can run standalone or inside any peer, and any surviving member can become
the next one (``reforming``): the survivors tell the successor what they know, and it re-forms the swarm.

Machine (per peer id, as the coordinator sees it)::

    unknown --Join--> pending --vote completes / fewer than 2 members--> member
    pending|member --Leave / heartbeat timeout / link refused / link down > grace / protocol fault--> gone

Invariants:
- the epoch number only grows; every change of the member list makes a new epoch (I1, membership model);
- an op gets exactly one verdict, recorded in ``decided``; a verdict is sent before any EpochUpdate that
  follows it on the same link, so a peer that sees a newer epoch may abort everything still undecided (I2);
- every wait has a deadline: votes and ops wait only for members, and members are evicted on silence (I3);
- one swarm, never two: silence is not proof of death (a partition looks the same), so the coordinator evicts
  silent members only while it still hears a strict majority of the epoch's voters (its members, and itself
  when it runs standalone). Without that majority it steps down (``lost_quorum``): the far side may be
  re-forming under a successor, which needs a majority of the same members. Members proven gone (their host
  refused the connection), leavers and protocol offenders are removed without a vote: they cannot form a
  swarm of their own.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from collectives import wire
from collectives.errors import WireError
from collectives.ring import group_id
from collectives.topology import best_ring, bottleneck
from peer.config import Timeouts
from peer.core.actions import Action, Connect, Drop, Out  # noqa: F401  (re-exported)
from peer.core.states import COORD_TRANSITIONS, CoordMode, transition
from peer.logs import peer_log

WORLD = "w"
MAX_DECIDED = 8192
REPEAT_VERDICTS = 64  # recent verdicts repeated to a member whose connection dropped and came back
MAX_OPEN_OPS = 1024  # ops with a commit request but no verdict yet
REORDER_GAIN = 1.5  # reorder the ring only when its slowest link gets at least this much faster


@dataclass
class _Op:
    members: tuple[str, ...]
    done: dict[str, bytes] = field(default_factory=dict)


class CoordinatorCore:
    def __init__(self, me: str, me_addr: str, timeouts: Timeouts, now: float, *, swarm: str = "default",
                 term: int = 1,
                 epoch: int = 0, members: list[tuple[str, str]] | None = None,
                 reform_expected: set[str] | None = None) -> None:
        self.me, self.me_addr, self.t, self.swarm = me, me_addr, timeouts, swarm
        self.log = peer_log(__name__, me, role="coordinator")
        self.term, self.epoch = term, epoch
        self.members: list[str] = [m for m, _ in members or []]
        self.addrs: dict[str, str] = dict(members or [])
        self.pending: list[str] = []
        self.last_seen: dict[str, float] = {m: now for m in self.members}
        self.down_since: dict[str, float] = {}
        self.votes: set[str] = set()
        self.ops: dict[tuple[int, str, int], _Op] = {}
        self.decided: collections.OrderedDict[str, bool] = collections.OrderedDict()
        self.evictions = 0
        # reform state (successor after a coordinator failure)
        self._mode = CoordMode.REFORMING if reform_expected is not None else CoordMode.ACTIVE
        self.reform_deadline = now + timeouts.reform_window
        self.reform_expected = set(reform_expected or ())
        self.rejoined: dict[str, wire.Rejoin] = {}
        self.bw: dict[tuple[str, str], float] = {}      # measured (sender, receiver) -> bytes/s
        self.reorder: list[str] | None = None          # a faster ring, applied at the next topology vote
        self.former: collections.OrderedDict[str, str] = collections.OrderedDict()  # evicted id -> addr

    # ------------------------------------------------------------------ mode (``peer.core.states``)
    @property
    def mode(self) -> CoordMode:
        return self._mode

    @mode.setter
    def mode(self, new: CoordMode) -> None:
        self._mode = transition(COORD_TRANSITIONS, self._mode, new)

    @property
    def reforming(self) -> bool:
        """A successor waiting for the survivors' Rejoins."""
        return self._mode is CoordMode.REFORMING

    @property
    def failed_reform(self) -> bool:
        """Could not re-form (no quorum of survivors): the node drops this core and goes stale."""
        return self._mode is CoordMode.FAILED

    @property
    def lost_quorum(self) -> bool:
        """Stepped down (cannot hear a majority): the node drops this core."""
        return self._mode is CoordMode.STEPPED_DOWN

    # ------------------------------------------------------------------ helpers
    def _epoch_update(self, reason: str) -> list[Action]:
        msg = wire.EpochUpdate(self.term, self.epoch, self.me, self.me_addr, tuple(self.members),
                               tuple(self.addrs[m] for m in self.members), reason)
        self.log.info("epoch %d members=%s (%s)", self.epoch, self.members, reason)
        return [Out(m, msg) for m in self.members]

    def _decide(self, key: tuple[int, str, int], members: tuple[str, ...], commit: bool,
                reason: str) -> list[Action]:
        skey = wire.op_key(*key)
        self.decided[skey] = commit
        while len(self.decided) > MAX_DECIDED:
            self.decided.popitem(last=False)
        self.ops.pop(key, None)
        verdict = wire.OpVerdict(self.term, key[0], key[1], key[2], commit, self._wanted(), reason)
        return [Out(m, verdict) for m in members if m in self.addrs]

    def _abort_open_ops(self, reason: str) -> list[Action]:
        out: list[Action] = []
        for key, op in list(self.ops.items()):
            out += self._decide(key, op.members, False, reason)
        return out

    def _new_epoch(self, reason: str) -> list[Action]:
        out = self._abort_open_ops(f"membership changed: {reason}")
        self.epoch += 1
        return out + self._epoch_update(reason)

    def evict(self, peer: str, reason: str) -> list[Action]:
        if peer in self.pending:
            self.pending.remove(peer)
            self.addrs.pop(peer, None)
            self.last_seen.pop(peer, None)
            return [Drop(peer)]
        if peer not in self.members:
            return []
        self.log.warning("evicting %s (%s)", peer, reason)
        self.evictions += 1
        self.members.remove(peer)
        self.last_seen.pop(peer, None)
        self.down_since.pop(peer, None)
        self.votes.discard(peer)
        self.reorder = None
        self.bw = {k: v for k, v in self.bw.items() if peer not in k}
        out = self._new_epoch(f"{peer} lost: {reason}")
        self._forget(peer)
        return out + self._maybe_finish_vote() + [Drop(peer)]

    def _forget(self, peer: str) -> None:
        """Remember an evicted peer's address (bounded) so that it can be told it is stale."""
        addr = self.addrs.pop(peer, None)
        if addr is not None:
            self.former[peer] = addr
            while len(self.former) > 1024:
                self.former.popitem(last=False)

    def _admit_pending(self, reason: str) -> list[Action]:
        joined = list(self.pending)
        self.members += joined
        self.pending.clear()
        return self._new_epoch(f"{reason}: {','.join(joined)} joined")

    def _stale(self, peer: str, reason: str, refused_epoch: int = -1) -> Out:
        return Out(peer, wire.Stale(self.term, self.epoch, self.me, self.me_addr, reason, refused_epoch))

    # ------------------------------------------------------------------ inputs
    def on_message(self, sender: str, msg: wire.Message, now: float) -> list[Action]:
        if sender in self.last_seen:
            self.last_seen[sender] = now
        if self.lost_quorum:
            return []  # stepped down: the node drops this core
        if isinstance(msg, wire.Rejoin):
            return self._on_rejoin(sender, msg, now)
        if self.reforming:
            return []  # everything else waits until the swarm has re-formed
        if isinstance(msg, wire.Join):
            return self._on_join(sender, msg, now)
        known = sender in self.members or sender in self.pending
        if not known:
            addr = self.former.get(sender)
            if addr is not None and isinstance(msg, (wire.Heartbeat, wire.TopologyVote, wire.OpDone,
                                                      wire.OpFail, wire.Suspect)):
                return [Connect(sender, addr), self._stale(sender, "not a member (evicted)", msg.epoch)]
            return []
        if isinstance(msg, wire.Heartbeat):
            out: list[Action] = [Out(sender, wire.HeartbeatAck(self.term, self.epoch, self._wanted()))]
            if msg.epoch < self.epoch and sender in self.members:
                out += [a for a in self._epoch_update("repeated: you are behind")
                        if isinstance(a, Out) and a.to == sender]
            return out
        if isinstance(msg, wire.Leave):
            return self.evict(sender, "left")
        if sender not in self.members:
            return []  # pending peers may only heartbeat or leave
        if isinstance(msg, wire.TopologyVote):
            return self._on_vote(sender, msg)
        if isinstance(msg, (wire.OpDone, wire.OpFail)):
            return self._on_op(sender, msg)
        if isinstance(msg, wire.BwReport):
            return self._on_bw(sender, msg)
        if isinstance(msg, wire.Suspect):
            if msg.suspect_id in self.members and msg.suspect_id != sender:
                if msg.reason.startswith("protocol") or (msg.suspect_id in self.down_since and
                                                         self._has_quorum([msg.suspect_id], now)):
                    return self.evict(msg.suspect_id, f"reported by {sender}: {msg.reason}")
            return []
        return []

    def _on_join(self, sender: str, msg: wire.Join, now: float) -> list[Action]:
        if msg.peer_id != sender:
            return []
        if msg.swarm != self.swarm:
            self.log.warning("refusing %s from swarm %r", sender, msg.swarm)
            return [Connect(sender, msg.addr),
                    Out(sender, wire.Stale(self.term, self.epoch, self.me, self.me_addr,
                                           f"wrong swarm {msg.swarm!r}"))]
        out: list[Action] = []
        if sender in self.members:  # it restarted: the old incarnation is gone
            out += self.evict(sender, "rejoined as a new incarnation")
        out.append(Connect(sender, msg.addr))
        self.addrs[sender] = msg.addr
        self.last_seen[sender] = now
        self.down_since.pop(sender, None)
        if sender not in self.pending:
            self.pending.append(sender)
        out.append(Out(sender, wire.Welcome(self.term, self.epoch, self.me)))
        if len(self.members) < 2:
            out += self._admit_pending("bootstrap")  # no collective can be running: admit at once
        return out

    def _on_vote(self, sender: str, msg: wire.TopologyVote) -> list[Action]:
        # A member blocked in update_topology is at a safe point (no op in flight), whichever epoch it
        # last saw, so its vote counts for the current epoch. A vote completes when every member has one.
        self.votes.add(sender)
        return self._maybe_finish_vote()

    def _maybe_finish_vote(self) -> list[Action]:
        if not self.votes or not set(self.members) <= self.votes:
            return []
        voters = [m for m in self.members if m in self.votes]
        voted = self.epoch
        self.votes.clear()
        out: list[Action] = []
        if self.reorder:
            order = [m for m in self.reorder if m in self.members]
            self.members = order + [m for m in self.members if m not in order]
            self.reorder = None
            if not self.pending:
                out += self._new_epoch("ring reordered by measured bandwidth")
        if self.pending:
            out += self._admit_pending("topology update")
        return out + [Out(m, wire.TopologyDone(self.term, voted, self.epoch)) for m in voters]

    def _wanted(self) -> int:
        """Topology changes waiting for a vote (joiners, or a faster ring): members see it in verdicts."""
        return len(self.pending) + (1 if self.reorder else 0)

    def _on_bw(self, sender: str, msg: wire.BwReport) -> list[Action]:
        if msg.sender_id not in self.members:
            return []
        self.bw[(msg.sender_id, sender)] = msg.bytes_per_s
        cur = bottleneck(self.members, self.bw)
        best = best_ring(self.members, self.bw)
        new = bottleneck(best, self.bw)
        if cur is not None and new is not None and new > REORDER_GAIN * cur:
            if self.reorder != best:
                self.log.info("ring %s would run at %.3g B/s instead of %.3g", best, new, cur)
            self.reorder = best
        return []

    def _on_op(self, sender: str, msg: wire.OpDone | wire.OpFail) -> list[Action]:
        key = (msg.epoch, msg.group, msg.seq)
        skey = wire.op_key(*key)
        if skey in self.decided:
            commit = self.decided[skey]
            return [Out(sender, wire.OpVerdict(self.term, *key, commit, self._wanted(), "already decided"))]
        if msg.epoch != self.epoch:
            self.decided[skey] = False
            return [Out(sender, wire.OpVerdict(self.term, *key, False, self._wanted(), "stale epoch"))]
        if msg.group == WORLD:
            members = tuple(self.members)
        else:
            members = msg.members
            if (group_id(members) != msg.group and not msg.group.startswith("p")) or \
                    not set(members) <= set(self.members) or sender not in members:
                return [Out(sender, wire.OpVerdict(self.term, *key, False, self._wanted(), "bad group"))]
        if key not in self.ops and len(self.ops) >= MAX_OPEN_OPS:
            # Members have a handful of ops open at once; thousands are a member flooding our memory (I4).
            return self.evict(sender, f"protocol: more than {MAX_OPEN_OPS} open ops")
        op = self.ops.setdefault(key, _Op(members))
        if isinstance(msg, wire.OpFail):
            return self._decide(key, op.members, False, f"{sender}: {msg.reason}")
        op.done[sender] = msg.digest
        if not set(op.members) <= set(op.done):
            return []
        digests = {d for d in op.done.values() if d}
        if len(digests) > 1:
            return self._decide(key, op.members, False, "result digests differ (parity violation)")
        return self._decide(key, op.members, True, "")

    def on_link(self, peer: str, kind: str, now: float) -> list[Action]:
        if peer not in self.members and peer not in self.pending:
            return []
        if self.reforming:
            if kind == "refused" and peer != self.me:  # proven gone: neither wait for it nor count it
                self.reform_expected.discard(peer)
                self.members.remove(peer)
                self.addrs.pop(peer, None)
            return []
        if kind == "up":
            self.down_since.pop(peer, None)
            return self._repeat_verdicts(peer)
        if kind == "down":
            self.down_since.setdefault(peer, now)
            return []
        if kind == "refused" and peer in self.down_since:
            return self.evict(peer, "connection refused (process gone)")  # proof: no quorum needed
        if kind == "auth_failed":
            return self.evict(peer, "authentication failed")
        return []

    def _repeat_verdicts(self, peer: str) -> list[Action]:
        """Our connection to ``peer`` dropped and is back: verdicts queued on it may be lost (zmq does not
        resend), and a member still running an aborted op would wait out its deadline. Repeat this epoch's
        recent verdicts; a member ignores those it has already applied."""
        out: list[Action] = []
        for skey, commit in list(self.decided.items())[-REPEAT_VERDICTS:]:
            e, g, s = wire.parse_op_key(skey)
            if e == self.epoch:
                out.append(Out(peer, wire.OpVerdict(self.term, e, g, s, commit, self._wanted(), "repeated")))
        return out

    def tick(self, now: float) -> list[Action]:
        if self.lost_quorum:
            return []
        if self.reforming:
            if now >= self.reform_deadline or self.reform_expected <= set(self.rejoined):
                return self._finish_reform(now)
            return []
        out: list[Action] = []
        gone: list[tuple[str, str]] = []
        for peer in list(self.members) + list(self.pending):
            if peer == self.me:
                continue
            silent = now - self.last_seen.get(peer, now)
            down = now - self.down_since.get(peer, now)
            if silent > self.t.heartbeat_timeout:
                gone.append((peer, f"silent for {silent:.1f}s"))
            elif down > self.t.reconnect_grace:
                gone.append((peer, f"link down for {down:.1f}s"))
        lost = [p for p, _ in gone if p in self.members]
        if lost and not self._has_quorum(lost, now):
            return self._step_down(lost, now)
        for peer, reason in gone:
            out += self.evict(peer, reason)
        return out

    def _has_quorum(self, lost: list[str], now: float) -> bool:
        """Do we still hear a strict majority of the voters without ``lost``? Members heard from only
        long ago (more than half the heartbeat timeout) do not count either: peers cut off by one partition
        fall silent a few heartbeats apart, and evicting them one at a time must not erode the majority."""
        voters = set(self.members) | {self.me}
        fresh = self.t.quorum_fresh
        heard = {m for m in voters - set(lost)
                 if m == self.me or (now - self.last_seen.get(m, now) <= fresh and m not in self.down_since)}
        return len(heard) >= len(voters) // 2 + 1

    def _step_down(self, lost: list[str], now: float) -> list[Action]:
        voters = set(self.members) | {self.me}
        self.log.warning("cannot hear a majority of %d voters (silent: %s); stepping down",
                         len(voters), ",".join(lost))
        self.mode = CoordMode.STEPPED_DOWN
        out = self._abort_open_ops("coordinator lost its quorum")
        stale = wire.Stale(self.term, self.epoch, self.me, self.me_addr, "coordinator lost its quorum")
        return out + [Out(m, stale) for m in self.members if m != self.me and m not in lost]

    # ------------------------------------------------------------------ failover
    def _on_rejoin(self, sender: str, msg: wire.Rejoin, now: float) -> list[Action]:
        if not self.reforming:
            if msg.term <= self.term and sender in self.members:
                return []  # a late straggler that is still a member: nothing to do
            # a survivor we did not wait for: it is stale and must rejoin as a new peer
            self.addrs.setdefault(sender, msg.addr)
            return [Connect(sender, msg.addr), self._stale(sender, "re-formed without you", msg.last_epoch)]
        if msg.term != self.term:
            return []
        self.rejoined[sender] = msg
        self.addrs[sender] = msg.addr
        self.last_seen[sender] = now
        return [Connect(sender, msg.addr)]

    def _finish_reform(self, now: float) -> list[Action]:
        quorum = len(self.reform_expected) // 2 + 1
        if len(self.reform_expected & set(self.rejoined)) < quorum:  # strangers' Rejoins do not count
            # A minority (e.g. we were partitioned or stalled): forming a swarm here would split the brain.
            self.log.warning("only %d of %d survivors checked in (quorum %d); giving up",
                             len(self.rejoined), len(self.reform_expected), quorum)
            self.mode = CoordMode.FAILED
            return [Out(m, wire.Stale(self.term, self.epoch, self.me, self.me_addr, "no quorum to re-form"))
                    for m in self.rejoined if m != self.me]
        self.mode = CoordMode.ACTIVE
        self.members = [m for m in self.members if m in self.rejoined]
        for m in list(self.addrs):
            if m not in self.members:
                self.addrs.pop(m)
        committed = {k for r in self.rejoined.values() for k in r.committed}
        out: list[Action] = []
        for peer, r in self.rejoined.items():
            for skey in r.awaiting:
                try:
                    e, g, s = wire.parse_op_key(skey)
                except WireError:
                    continue
                commit = skey in committed
                self.decided[skey] = commit
                out.append(Out(peer, wire.OpVerdict(self.term, e, g, s, commit, 0,
                                                    "resolved by successor")))
        for m in self.members:
            self.last_seen[m] = now
        self.epoch += 1
        self.log.warning("re-formed swarm under term %d with %s", self.term, self.members)
        return out + self._epoch_update(f"re-formed under {self.me} (term {self.term})")
