"""Tier 1: the membership client (``peer.core.member``), several of them and a coordinator driven by messages
and a simulated clock only: no sockets, no threads. A tiny in-memory network delivers the cores' ``Out`` and
``ViaAddr`` actions to the core they name; everything else they return is recorded per peer."""

from __future__ import annotations

from typing import Any

import pytest

from collectives import wire
from collectives.errors import CoordinatorUnavailable, LocalError, StaleError
from peer.config import Timeouts
from peer.core.actions import Action, Admitted, Note, Out, ToCoordinator, ViaAddr, Wake
from peer.core.member import MemberCore
from peer.core.ops import OpEngine, OpSpec
from peer.core.states import NodeState
from peer.handle import Handle

import numpy as np

pytestmark = pytest.mark.timeout(60)
T = Timeouts.local(heartbeat_timeout=1.0, coordinator_timeout=1.0, reform_window=0.6, op_progress_timeout=5.0)
DT = 0.05  # simulated time between ticks: well under local_stall (coordinator_timeout / 2)


def addr(p: str) -> str:
    return f"tcp://127.0.0.1:{2000 + sum(map(ord, p))}"


class Net:
    """Delivers messages between cores at once, in order; a killed peer gets nothing and ticks no more."""

    def __init__(self) -> None:
        self.cores: dict[str, MemberCore] = {}
        self.by_addr: dict[str, str] = {}
        self.down: set[str] = set()
        self.seen: dict[str, list[Action]] = {}
        self.now = 0.0

    def add(self, me: str, *, member: bool = True, coordinator: bool = False,
            join: tuple[str, ...] = ()) -> MemberCore:
        core = MemberCore(me, addr(me), T, OpEngine(me, 1 << 16, True, 1 << 24), self.now, swarm="default",
                          member=member, coordinator=coordinator, join=list(join))
        self.cores[me], self.by_addr[addr(me)], self.seen[me] = core, me, []
        return core

    def start(self, me: str) -> None:
        self.deliver(me, self.cores[me].start(self.now))

    def deliver(self, sender: str, actions: list[Action]) -> None:
        queue = [(sender, a) for a in actions]
        while queue:
            frm, a = queue.pop(0)
            self.seen[frm].append(a)
            to, msg = "", None
            if isinstance(a, Out):
                to, msg = a.to, a.msg
            elif isinstance(a, ViaAddr):
                to, msg = self.by_addr.get(a.addr, ""), a.msg
            elif isinstance(a, ToCoordinator):
                to, msg = self.cores[frm].coord_id, a.msg
            if msg is None or to not in self.cores or to in self.down:
                continue
            core = self.cores[to]
            got = core.on_message(frm, msg, self.now, coord_up=core.coord_id not in self.down)
            queue += [(to, b) for b in got]

    def kill(self, me: str) -> None:
        """``me`` dies: every live peer's link to it goes down."""
        self.down.add(me)
        for p, core in self.cores.items():
            if p not in self.down:
                self.deliver(p, core.on_link(me, "down", self.now))

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now += DT
            for p, core in list(self.cores.items()):
                if p not in self.down:
                    self.deliver(p, core.tick(self.now))

    def vote(self, *peers: str) -> None:
        for p in peers:
            core = self.cores[p]
            self.deliver(p, [Out(core.coord_id, wire.TopologyVote(core.term, core.epoch))])


def of(net: Net, peer: str, kind: type) -> list[Any]:
    return [a for a in net.seen[peer] if isinstance(a, kind)]


def swarm(*members: str) -> Net:
    """A standalone coordinator "c" and ``members``, all admitted (the third and later at a vote)."""
    net = Net()
    net.add("c", member=False, coordinator=True)
    for m in members:
        net.add(m, join=(addr("c"),))
        net.start(m)
        net.advance(0.1)
        net.vote(*[p for p in members if p in net.cores and net.cores[p].state is NodeState.MEMBER])
        net.advance(0.1)
    return net


def test_members_join_through_a_seed_link_and_agree_on_the_epoch() -> None:
    net = swarm("a", "b", "x")
    cores = [net.cores[m] for m in ("a", "b", "x")]
    assert all(c.state is NodeState.MEMBER for c in cores)
    assert {(c.term, c.epoch, tuple(c.members), c.coord_id) for c in cores} == {(1, 3, ("a", "b", "x"), "c")}
    first = net.seen["a"][0]
    assert isinstance(first, ViaAddr) and first.addr == addr("c") and isinstance(first.msg, wire.Join)
    assert all(of(net, m, Admitted) for m in ("a", "b", "x"))
    assert net.cores["a"].addrs["x"] == addr("x")  # the epoch carried every member's address


def test_a_dead_coordinator_is_replaced_by_the_first_survivor_in_a_new_term() -> None:
    net = swarm("a", "b", "x")
    net.kill("c")
    net.advance(T.reconnect_grace + 4 * DT)
    assert all(net.cores[m].state is NodeState.REFORMING for m in ("b", "x")) or \
        net.cores["a"].coord is not None
    net.advance(T.reform_window + 1.0)
    for m in ("a", "b", "x"):
        c = net.cores[m]
        assert (c.state, c.term, c.coord_id, c.members) == (NodeState.MEMBER, 2, "a", ["a", "b", "x"]), m
    assert net.cores["a"].coord is not None and net.cores["b"].coord is None
    assert [n for n in of(net, "a", Note) if n.kind == "coordinator" and "taking over" in n.detail]
    rejoins = [a for a in net.seen["b"] if isinstance(a, Out) and isinstance(a.msg, wire.Rejoin)]
    assert rejoins and rejoins[0].to == "a" and rejoins[0].msg.term == 2
    net.advance(3 * T.coordinator_timeout)  # the new coordinator keeps answering heartbeats
    assert all(net.cores[m].state is NodeState.MEMBER and net.cores[m].term == 2 for m in ("a", "b", "x"))


def test_a_silent_coordinator_with_its_link_up_is_presumed_dead_after_coordinator_timeout() -> None:
    net = swarm("a", "b")
    net.down.add("c")  # it stops answering, but no link event says so (a stall, a partition)
    net.advance(T.coordinator_timeout - 2 * DT)
    assert all(net.cores[m].state is NodeState.MEMBER for m in ("a", "b"))
    net.advance(4 * DT)
    assert [n for n in of(net, "b", Note) if n.kind == "coordinator_lost" and "no heartbeat ack" in n.detail]
    net.advance(T.reform_window + 1.0)
    assert all(net.cores[m].coord_id == "a" and net.cores[m].state is NodeState.MEMBER for m in ("a", "b"))


def test_when_the_candidate_does_not_answer_the_next_one_is_tried() -> None:
    net = swarm("a", "b", "x")
    net.kill("c")
    net.kill("a")  # the first candidate died too
    net.advance(T.reconnect_grace + T.candidate_timeout + T.reform_window + 2.0)
    for m in ("b", "x"):
        c = net.cores[m]
        assert (c.state, c.coord_id, c.members) == (NodeState.MEMBER, "b", ["b", "x"]), m
    tried = [a.to for a in net.seen["x"] if isinstance(a, Out) and isinstance(a.msg, wire.Rejoin)]
    assert tried[0] == "a" and "b" in tried


def test_a_candidate_proven_gone_is_skipped_without_waiting() -> None:
    net = swarm("a", "b", "x")
    for m in ("b", "x"):
        net.deliver(m, net.cores[m].on_link("a", "refused", net.now))  # a's host refused: it is gone
    net.kill("a")
    net.kill("c")
    net.advance(T.reconnect_grace + T.reform_window + 0.5)  # well short of one candidate_timeout
    assert net.cores["x"].coord_id == "b" and net.cores["x"].state is NodeState.MEMBER
    assert not [a for a in net.seen["x"] if isinstance(a, Out) and isinstance(a.msg, wire.Rejoin) and a.to == "a"]


def test_a_reforming_member_told_the_old_coordinator_lives_goes_back_to_it() -> None:
    net = swarm("a", "b")
    b = net.cores["b"]
    b.state = NodeState.REFORMING  # b gave up on c (its own link trouble), the others did not
    out = b.on_message("a", wire.Redirect("c", addr("c")), net.now, coord_up=True)
    assert b.state is NodeState.MEMBER and b.coord_id == "c"
    assert [a for a in out if isinstance(a, Out) and a.to == "c" and isinstance(a.msg, wire.Heartbeat)]


def test_a_member_answers_a_join_with_a_redirect_to_its_coordinator() -> None:
    net = swarm("a", "b")
    net.add("y", join=(addr("a"),))  # y only knows a member's address
    net.start("y")
    redirect = [a for a in net.seen["a"] if isinstance(a, Out) and isinstance(a.msg, wire.Redirect)]
    assert redirect and redirect[0].to == "y" and redirect[0].msg.coord_addr == addr("c")
    assert [a for a in net.seen["y"] if isinstance(a, ViaAddr) and a.addr == addr("c")]
    assert net.cores["y"].state is NodeState.PENDING and net.cores["y"].coord_id == "c"


def test_a_rejoin_sent_while_the_coordinator_answers_gets_a_redirect() -> None:
    net = swarm("a", "b")
    out = net.cores["a"].on_message("b", wire.Rejoin(2, 2, addr("b"), (), ()), net.now, coord_up=True)
    assert [a for a in out if isinstance(a, Out) and isinstance(a.msg, wire.Redirect) and a.to == "b"]
    assert net.cores["a"].coord is None and net.cores["a"].state is NodeState.MEMBER
    out = net.cores["a"].on_message("b", wire.Rejoin(2, 2, addr("b"), (), ()), net.now, coord_up=False)
    assert net.cores["a"].state is NodeState.REFORMING or net.cores["a"].coord is not None


def test_stale_and_epochs_from_strangers_are_ignored() -> None:
    net = swarm("a", "b")
    a = net.cores["a"]
    before = (a.state, a.term, a.epoch, list(a.members))
    assert a.on_message("evil", wire.Stale(9, 9, "evil", addr("evil"), "take over"), net.now, coord_up=True) == []
    assert a.on_message("evil", wire.EpochUpdate(9, 9, "evil", addr("evil"), ("a", "evil"),
                                                  (addr("a"), addr("evil")), "hijack"), net.now,
                        coord_up=True) == []
    assert (a.state, a.term, a.epoch, list(a.members)) == before


def test_a_replaced_coordinator_is_told_its_term_is_over() -> None:
    net = swarm("a", "b")
    a = net.cores["a"]
    a.term = 3  # as after two failovers
    out = a.on_message("c", wire.HeartbeatAck(1, a.epoch, 0), net.now, coord_up=True)
    stale = [x for x in out if isinstance(x, Out) and isinstance(x.msg, wire.Stale)]
    assert stale and stale[0].to == "c" and stale[0].msg.term == 3


def test_stale_from_the_coordinator_fails_open_ops_and_rejoin_asks_it_first() -> None:
    net = swarm("a", "b")
    a = net.cores["a"]
    h = Handle("all_reduce")
    net.deliver("a", a.engine.issue(OpSpec("all_reduce", [np.ones(4, np.float32)]), h, net.now))
    out = a.on_message("c", wire.Stale(1, a.epoch, "c", addr("c"), "evicted"), net.now, coord_up=True)
    assert a.state is NodeState.STALE
    wakes = [x for x in out if isinstance(x, Wake)]
    assert wakes and isinstance(wakes[0].error, StaleError) and any(isinstance(x, Admitted) for x in out)
    with pytest.raises(StaleError):
        h.wait(1.0)
    out = a.rejoin(net.now)
    assert a.state is NodeState.JOINING and a.members == [] and a.epoch == 0
    assert isinstance(out[0], ViaAddr) and out[0].addr == addr("c")
    net.deliver("a", out)
    net.advance(0.2)
    net.vote("b")
    net.advance(0.2)
    assert a.state is NodeState.MEMBER and "a" in a.members


def test_a_rejoining_peer_is_not_made_stale_by_answers_to_its_former_membership() -> None:
    """A peer cut off from the swarm queues heartbeats and op failures of its old epoch; at the heal they can
    reach the coordinator before its Join, and the coordinator answers each with a Stale ("evicted"). That
    answer reaches the joiner before the Welcome: it must not make the joiner stale (it did, and the joiner
    then ignored the Welcome)."""
    net = swarm("a", "b", "x")
    a, coord = net.cores["a"], net.cores["c"].coord
    assert coord is not None
    old_epoch = a.epoch
    net.down.add("a")  # cut off: it hears nothing and its timers stop
    net.advance(T.heartbeat_timeout + 1.0)
    assert "a" not in coord.members and coord.epoch > old_epoch
    net.down.discard("a")
    net.deliver("a", [Out("c", wire.Heartbeat(a.term, a.epoch))])  # its first word after the heal
    assert a.state is NodeState.STALE
    join = a.rejoin(net.now)
    assert a.state is NodeState.JOINING
    # What a queued before the heal arrives now, ahead of the Join: an op failure, a heartbeat.
    for late in (wire.OpFail(a.term, old_epoch, "default", 7, "deadline", ("a", "b", "x")), wire.Heartbeat(a.term, old_epoch)):
        net.deliver("a", [Out("c", late)])
    answers = [x.msg for x in net.seen["c"] if isinstance(x, Out) and x.to == "a" and isinstance(x.msg, wire.Stale)]
    assert answers[-1].refused_epoch == old_epoch and "evicted" in answers[-1].reason
    assert a.state is NodeState.JOINING
    net.deliver("a", join)
    assert a.state is NodeState.PENDING
    net.vote("b", "x")
    net.advance(0.2)
    assert a.state is NodeState.MEMBER and "a" in a.members and a.epoch == coord.epoch


def test_a_refused_join_still_makes_the_joiner_stale() -> None:
    net = swarm("a")
    j = net.add("j", join=(addr("c"),))
    j.start(net.now)  # its Join is refused (not delivered here)
    assert j.state is NodeState.JOINING
    out = j.on_message("c", wire.Stale(1, 1, "c", addr("c"), "wrong swarm 'other'"), net.now, coord_up=True)
    assert j.state is NodeState.STALE and any(isinstance(x, Wake) for x in out)


def test_nobody_answers_a_join_retries_then_stale_at_the_deadline() -> None:
    net = Net()
    y = net.add("y", join=(addr("nobody"), addr("nobody2")))
    net.start("y")
    net.advance(T.join_timeout + 1.0)
    assert y.state is NodeState.STALE
    joins = of(net, "y", ViaAddr)
    assert {j.addr for j in joins} == {addr("nobody"), addr("nobody2")}
    assert 2 <= len(joins) <= T.join_timeout / T.join_retry + 2
    wakes = of(net, "y", Wake)
    assert wakes and isinstance(wakes[-1].error, CoordinatorUnavailable) and of(net, "y", Admitted)


def test_a_local_stall_is_not_taken_for_a_dead_coordinator() -> None:
    net = swarm("a", "b")
    net.now += 3 * T.coordinator_timeout  # our process was stopped: nobody ticked
    net.advance(DT)
    assert net.cores["a"].state is NodeState.MEMBER
    assert [n for n in of(net, "a", Note) if n.kind == "local_stall"]


def test_a_peer_that_left_stays_left() -> None:
    net = swarm("a", "b")
    a = net.cores["a"]
    out = a.leave()
    assert a.state is NodeState.LEFT
    assert [x for x in out if isinstance(x, Out) and x.to == "c" and isinstance(x.msg, wire.Leave)]
    with pytest.raises(LocalError):
        a.rejoin(net.now)
    assert a.on_message("c", wire.EpochUpdate(1, 9, "c", addr("c"), ("a",), (addr("a"),), "x"), net.now,
                        coord_up=True) == []
    assert a.state is NodeState.LEFT


def test_protocol_faults_are_suspected_and_evicted_by_a_hosted_coordinator() -> None:
    net = swarm("a", "b")
    out = net.cores["a"].on_bad("b", "bad frame")
    assert [x for x in out if isinstance(x, Note) and x.kind == "bad_input"]
    assert any(type(x).__name__ == "Suspect" and x.peer == "b" for x in out)
    out = net.cores["c"].on_bad("b", "bad frame")
    assert "b" not in net.cores["c"].coord.members  # type: ignore[union-attr]
    assert [x for x in out if isinstance(x, Out) and isinstance(x.msg, wire.EpochUpdate)]
