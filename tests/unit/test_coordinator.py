"""Tier 1: the coordinator state machine, driven by messages and time only (no sockets)."""

from __future__ import annotations

import pytest

from collectives import wire
from peer.config import Timeouts
from peer.core.coordinator import Connect, CoordinatorCore, Drop, Out

pytestmark = pytest.mark.timeout(30)
T = Timeouts.local(heartbeat_timeout=1.0, coordinator_timeout=1.0, op_progress_timeout=5.0)


def addr(p: str) -> str:
    return f"tcp://127.0.0.1:{1000 + sum(map(ord, p))}"


def msgs(actions: list, kind: type, to: str | None = None) -> list:
    return [a.msg for a in actions if isinstance(a, Out) and isinstance(a.msg, kind) and (to is None or a.to == to)]


def core_with(members: list[str], now: float = 0.0) -> CoordinatorCore:
    c = CoordinatorCore("coord", addr("coord"), T, now)
    for m in members:
        out = c.on_message(m, wire.Join(m, addr(m), "default"), now)
        if len(c.members) >= 2 and c.pending:
            for v in list(c.members):
                out = c.on_message(v, wire.TopologyVote(c.term, c.epoch), now)
    return c


def test_first_two_joiners_are_admitted_at_once_third_waits_for_a_vote() -> None:
    c = CoordinatorCore("coord", addr("coord"), T, 0.0)
    out = c.on_message("a", wire.Join("a", addr("a"), "default"), 0.0)
    assert Connect("a", addr("a")) in out and c.members == ["a"] and c.epoch == 1
    c.on_message("b", wire.Join("b", addr("b"), "default"), 0.0)
    assert c.members == ["a", "b"] and c.epoch == 2
    out = c.on_message("x", wire.Join("x", addr("x"), "default"), 0.0)
    assert c.pending == ["x"] and c.members == ["a", "b"] and msgs(out, wire.Welcome, "x")
    assert not msgs(c.on_message("a", wire.TopologyVote(1, 2), 0.1), wire.TopologyDone)
    out = c.on_message("b", wire.TopologyVote(1, 2), 0.1)
    assert c.members == ["a", "b", "x"] and c.epoch == 3 and not c.pending
    ups = msgs(out, wire.EpochUpdate)
    assert len(ups) == 3 and ups[0].member_ids == ("a", "b", "x")
    assert {a.to for a in out if isinstance(a, Out) and isinstance(a.msg, wire.TopologyDone)} == {"a", "b"}


def test_a_vote_from_an_older_epoch_still_counts() -> None:
    c = core_with(["a", "b"])
    c.on_message("x", wire.Join("x", addr("x"), "default"), 0.0)
    c.on_message("a", wire.TopologyVote(1, c.epoch - 1), 0.0)  # a had not seen the last epoch yet
    out = c.on_message("b", wire.TopologyVote(1, c.epoch), 0.0)
    assert "x" in c.members and len(msgs(out, wire.TopologyDone)) == 2


def test_a_death_completes_a_vote_the_dead_peer_never_cast() -> None:
    c = core_with(["a", "b", "d"])
    c.on_message("x", wire.Join("x", addr("x"), "default"), 0.0)
    c.on_message("a", wire.TopologyVote(1, c.epoch), 0.0)
    c.on_message("b", wire.TopologyVote(1, c.epoch), 0.0)
    out = c.evict("d", "test")
    assert c.members == ["a", "b", "x"] and len(msgs(out, wire.TopologyDone)) == 2


def test_op_commits_only_when_every_member_is_done_with_equal_digests() -> None:
    c = core_with(["a", "b", "c"])
    e = c.epoch
    assert not c.on_message("a", wire.OpDone(1, e, "w", 0, b"x", ()), 0.0)
    assert not c.on_message("b", wire.OpDone(1, e, "w", 0, b"x", ()), 0.0)
    out = c.on_message("c", wire.OpDone(1, e, "w", 0, b"x", ()), 0.0)
    verdicts = msgs(out, wire.OpVerdict)
    assert len(verdicts) == 3 and all(v.commit for v in verdicts)
    # a late duplicate gets the same verdict again, never a different one
    again = msgs(c.on_message("a", wire.OpDone(1, e, "w", 0, b"x", ()), 0.0), wire.OpVerdict)
    assert again and again[0].commit
    for m in ("a", "b"):
        c.on_message(m, wire.OpDone(1, e, "w", 1, b"x", ()), 0.0)
    out = c.on_message("c", wire.OpDone(1, e, "w", 1, b"y", ()), 0.0)
    assert not any(v.commit for v in msgs(out, wire.OpVerdict)), "different digests must abort"


def test_death_aborts_open_ops_before_the_new_epoch_is_announced() -> None:
    c = core_with(["a", "b", "c"])
    e = c.epoch
    c.on_message("a", wire.OpDone(1, e, "w", 0, b"", ()), 0.0)
    out = c.on_link("c", "down", 0.1) + c.on_link("c", "refused", 0.2)
    kinds = [type(a.msg).__name__ for a in out if isinstance(a, Out) and a.to == "a"]
    assert kinds.index("OpVerdict") < kinds.index("EpochUpdate")
    assert not msgs(out, wire.OpVerdict)[0].commit and c.members == ["a", "b"]
    assert Drop("c") in out
    late = msgs(c.on_message("b", wire.OpDone(1, e, "w", 0, b"", ()), 0.3), wire.OpVerdict)
    assert late and not late[0].commit


def test_silent_member_is_evicted_after_the_heartbeat_deadline_and_told_it_is_stale() -> None:
    c = core_with(["a", "b", "c"])
    for t in (0.3, 0.6, 0.9):
        c.on_message("a", wire.Heartbeat(1, c.epoch), t)
        c.on_message("b", wire.Heartbeat(1, c.epoch), t)
        assert not c.tick(t)
    out = c.tick(1.2)
    assert c.members == ["a", "b"] and msgs(out, wire.EpochUpdate)
    back = c.on_message("c", wire.Heartbeat(1, 3), 5.0)
    assert msgs(back, wire.Stale, "c")


def test_successor_resolves_in_doubt_ops_from_what_survivors_report() -> None:
    c = CoordinatorCore("a", addr("a"), T, 0.0, term=2, epoch=7,
                        members=[("a", addr("a")), ("b", addr("b")), ("c", addr("c"))],
                        reform_expected={"a", "b", "c"})
    k1, k2 = wire.op_key(7, "w", 3), wire.op_key(7, "w", 4)
    c.on_message("a", wire.Rejoin(2, 7, addr("a"), (k1,), (k2,)), 0.0)
    c.on_message("b", wire.Rejoin(2, 7, addr("b"), (), (k1, k2)), 0.0)
    assert not c.tick(0.5)  # still waiting for c
    out = c.tick(1.1)
    verdicts = {(a.to, a.msg.seq): a.msg.commit for a in out if isinstance(a, Out)
                and isinstance(a.msg, wire.OpVerdict)}
    assert verdicts == {("a", 4): False, ("b", 3): True, ("b", 4): False}
    assert c.members == ["a", "b"] and c.epoch == 8 and msgs(out, wire.EpochUpdate)


def test_a_minority_cannot_reform() -> None:
    c = CoordinatorCore("c", addr("c"), T, 0.0, term=2, epoch=7,
                        members=[("a", addr("a")), ("b", addr("b")), ("c", addr("c"))],
                        reform_expected={"a", "b", "c"})
    c.on_message("c", wire.Rejoin(2, 7, addr("c"), (), ()), 0.0)
    c.tick(1.1)
    assert c.failed_reform


def test_join_from_another_swarm_or_with_a_forged_id_is_refused() -> None:
    c = CoordinatorCore("coord", addr("coord"), T, 0.0, swarm="alpha")
    out = c.on_message("x", wire.Join("x", addr("x"), "beta"), 0.0)
    assert msgs(out, wire.Stale, "x") and not c.members and not c.pending
    assert c.on_message("x", wire.Join("y", addr("y"), "alpha"), 0.0) == []
    assert not c.members and not c.pending


def test_measured_bandwidth_reorders_the_ring_at_the_next_vote() -> None:
    c = core_with(["a", "b", "c", "d"])
    for src in "abcd":
        for dst in "abcd":
            if src != dst:
                rate = 1e6 if {src, dst} == {"a", "b"} else 1e8  # the a<->b link is slow
                c.on_message(dst, wire.BwReport(1, c.epoch, src, rate), 0.0)
    assert c.reorder is not None and c._wanted() == 1, "members must learn a topology update is wanted"
    e = c.epoch
    for m in ("a", "b", "c", "d"):
        out = c.on_message(m, wire.TopologyVote(1, e), 0.0)
    assert c.epoch == e + 1 and c.members[0] == "a" and c.members[1] != "b" and c.members[-1] != "b"
    assert msgs(out, wire.EpochUpdate) and c.reorder is None


def test_bandwidth_from_a_non_member_is_ignored() -> None:
    c = core_with(["a", "b", "c"])
    assert c.on_message("a", wire.BwReport(1, c.epoch, "zzz", 1e6), 0.0) == [] and not c.bw


# ---------------------------------------------------------------------------------- partitions (one swarm)

def embedded(members: list[str], now: float = 0.0) -> CoordinatorCore:
    """A coordinator that is itself the first member (as after a failover)."""
    return CoordinatorCore(members[0], addr(members[0]), T, now, term=2, epoch=5,
                           members=[(m, addr(m)) for m in members])


def beat(c: CoordinatorCore, who: list[str], t: float) -> None:
    for m in who:
        c.on_message(m, wire.Heartbeat(c.term, c.epoch), t)


def test_a_coordinator_cut_off_with_a_minority_steps_down_instead_of_evicting_the_majority() -> None:
    c = embedded(["a", "b", "c", "d", "e"])
    c.on_message("b", wire.OpDone(2, 5, "w", 0, b"", ()), 0.0)
    for t in (0.3, 0.6, 0.9, 1.2):  # the partition: only b is still heard
        beat(c, ["b"], t)
        out = c.tick(t)
    assert c.lost_quorum and c.members == ["a", "b", "c", "d", "e"] and c.epoch == 5  # nobody evicted
    assert msgs(out, wire.Stale, "b") and not msgs(out, wire.EpochUpdate)
    assert [v.commit for v in msgs(out, wire.OpVerdict)] == [False] * 5  # its open op is aborted
    # a joiner arriving now is not admitted: that is how the soak's split brain began
    assert c.on_message("x", wire.Join("x", addr("x"), "default"), 1.3) == [] and c.tick(1.3) == []
    assert c.members == ["a", "b", "c", "d", "e"]


def test_a_coordinator_that_hears_a_majority_evicts_the_silent_minority() -> None:
    c = embedded(["a", "b", "c", "d", "e"])
    for t in (0.3, 0.6, 0.9, 1.2):
        beat(c, ["b", "c"], t)
        c.tick(t)
    assert not c.lost_quorum and c.members == ["a", "b", "c"]


def test_members_falling_silent_a_few_beats_apart_do_not_erode_the_majority() -> None:
    # d and e went silent at 0.0, b and c at 0.3 (same partition): at 1.05 only d, e are past the deadline,
    # but b and c have been silent for more than half of it, so a alone is no majority.
    c = embedded(["a", "b", "c", "d", "e"])
    beat(c, ["b", "c"], 0.3)
    out = c.tick(1.05)
    assert c.lost_quorum and len(c.members) == 5 and not msgs(out, wire.EpochUpdate)


def test_a_standalone_coordinator_counts_itself_so_two_members_can_lose_one() -> None:
    c = core_with(["a", "b"])
    for t in (0.3, 0.6, 0.9, 1.2):
        beat(c, ["a"], t)
        c.tick(t)
    assert not c.lost_quorum and c.members == ["a"]


def test_an_embedded_coordinator_of_two_cannot_evict_its_silent_partner() -> None:
    c = embedded(["a", "b"])
    c.tick(1.2)
    assert c.lost_quorum and c.members == ["a", "b"]


def test_a_refused_connection_is_proof_and_needs_no_majority() -> None:
    c = embedded(["a", "b", "c"])
    c.on_link("b", "down", 0.1)
    c.on_link("c", "down", 0.1)
    out = c.on_link("b", "refused", 0.15) + c.on_link("c", "refused", 0.2)
    assert c.members == ["a"] and not c.lost_quorum and msgs(out, wire.EpochUpdate)


def test_a_suspect_report_of_a_down_link_evicts_only_with_a_majority() -> None:
    c = embedded(["a", "b", "c", "d"])
    for m in ("c", "d"):
        c.on_link(m, "down", 0.0)
    beat(c, ["b"], 0.1)
    c.on_message("b", wire.Suspect(2, 5, "c", "link down"), 0.1)
    assert "c" in c.members  # a, b of four: no majority without c and d
    beat(c, ["d"], 0.2)
    c.on_link("d", "up", 0.2)
    c.on_message("b", wire.Suspect(2, 5, "c", "link down"), 0.2)
    assert "c" not in c.members


def test_rejoins_from_strangers_do_not_make_a_reform_quorum() -> None:
    c = CoordinatorCore("c", addr("c"), T, 0.0, term=2, epoch=7,
                        members=[("a", addr("a")), ("b", addr("b")), ("c", addr("c"))],
                        reform_expected={"a", "b", "c"})
    for p in ("c", "x", "y"):
        c.on_message(p, wire.Rejoin(2, 7, addr(p), (), ()), 0.0)
    c.tick(1.1)
    assert c.failed_reform


def test_a_member_behind_by_an_epoch_gets_the_epoch_update_again() -> None:
    c = core_with(["a", "b", "c"])
    out = c.on_message("a", wire.Heartbeat(1, c.epoch - 1), 0.1)  # its EpochUpdate was lost
    assert msgs(out, wire.HeartbeatAck, "a") and msgs(out, wire.EpochUpdate, "a")[0].epoch == c.epoch
    assert not msgs(c.on_message("b", wire.Heartbeat(1, c.epoch), 0.1), wire.EpochUpdate)


def test_a_joiner_holds_data_of_the_epoch_that_admits_it_but_a_member_flags_data_far_ahead() -> None:
    from peer.core.ops import OpEngine

    from peer.core.actions import Suspect

    eng = OpEngine("j", 1 << 20, True, 1 << 20)
    chunk = wire.Chunk(40, "w", 0, 0, 0, 0, "float32", 4)
    out = eng.on_chunk("a", chunk, b"\x00" * 16, 0.0)  # its EpochUpdate (epoch 40) is still on the way
    assert not out and eng.early_bytes > 0
    assert eng.new_epoch(1, 20, ["a", "j"], "joined") == []
    out = eng.on_chunk("a", wire.Chunk(40, "w", 1, 0, 0, 0, "float32", 4), b"\x00" * 16, 0.1)
    assert len(out) == 1 and isinstance(out[0], Suspect)
    assert out[0].peer == "a" and "far ahead" in out[0].reason


def test_a_member_flooding_commit_requests_for_new_ops_is_evicted() -> None:
    from peer.core.coordinator import MAX_OPEN_OPS

    c = core_with(["a", "b", "d"])
    for seq in range(MAX_OPEN_OPS):
        c.on_message("a", wire.OpDone(1, c.epoch, "w", seq, b"", ()), 0.0)
    assert "a" in c.members and len(c.ops) == MAX_OPEN_OPS
    out = c.on_message("a", wire.OpDone(1, c.epoch, "w", MAX_OPEN_OPS, b"", ()), 0.0)
    assert "a" not in c.members and Drop("a") in out and not c.ops  # its ops were aborted with the epoch


def test_a_successor_does_not_wait_for_or_count_survivors_proven_gone() -> None:
    c = CoordinatorCore("a", addr("a"), T, 0.0, term=2, epoch=7,
                        members=[("a", addr("a")), ("b", addr("b")), ("c", addr("c"))],
                        reform_expected={"a", "b", "c"})
    c.on_message("a", wire.Rejoin(2, 7, addr("a"), (), ()), 0.0)
    for p in ("b", "c"):
        c.on_link(p, "down", 0.1)
        c.on_link(p, "refused", 0.1)
    out = c.tick(0.2)  # everyone still alive has checked in: no need to wait out the window
    assert not c.failed_reform and c.members == ["a"] and msgs(out, wire.EpochUpdate)


def test_a_dropped_data_link_fails_an_op_whose_part_is_done_but_a_commit_verdict_still_commits() -> None:
    import numpy as np

    from peer.handle import Handle
    from peer.core.ops import OpEngine, OpRecord, OpSpec

    from peer.core.actions import ToCoordinator

    eng = OpEngine("j", 1 << 20, True, 1 << 20)
    eng.new_epoch(1, 3, ["a", "j"], "test")
    asked: list[wire.Message] = []
    key = (3, "w", 0)
    for verdict in (True, False):
        h = Handle("barrier")
        rec = OpRecord(OpSpec("barrier", []), None, h, key, ("a", "j"), np.empty(0, np.float32), 0.0, 0.0,
                       state="awaiting")
        eng.ops[key] = rec
        asked += [a.msg for a in eng.link_lost("a", 1.0) if isinstance(a, ToCoordinator)]  # our last chunk
        # to a may have gone down with the connection
        assert isinstance(asked[-1], wire.OpFail) and rec.state == "failing"
        assert eng.awaiting_keys() == [wire.op_key(*key)]  # in doubt: a successor must resolve it
        eng.on_verdict(wire.OpVerdict(1, *key, verdict, 0, "decided before our OpFail" if verdict else "x"), 1.1)
        assert h.done() and key not in eng.ops
        if verdict:
            assert h.wait(0) is None  # committed, not an error


def test_an_abort_verdict_that_arrives_before_the_op_is_issued_fails_it_at_once() -> None:
    """The soak's 51 s stall: the others failed op w:7 before this member issued it; the verdict was dropped,
    the member then ran w:7 alone while the others ran w:8, and each round timed out one op apart."""
    import numpy as np

    from collectives.errors import OpAborted
    from peer.handle import Handle
    from peer.core.ops import OpEngine, OpSpec

    eng = OpEngine("j", 1 << 20, True, 1 << 20)
    eng.new_epoch(1, 3, ["a", "j"], "test")
    eng.on_verdict(wire.OpVerdict(1, 3, "w", 0, False, 0, "a: connection to b dropped"), 0.0)
    h = Handle("barrier")
    eng.issue(OpSpec("barrier", [np.zeros(0, np.float32)]), h, 0.1)
    with pytest.raises(OpAborted, match="before it started here"):
        h.wait(0)
    h2 = Handle("barrier")
    eng.issue(OpSpec("barrier", [np.zeros(0, np.float32)]), h2, 0.2)
    assert (3, "w", 1) in eng.ops and not h2.done()  # in step with the others again


def test_verdicts_are_repeated_to_a_member_whose_connection_came_back() -> None:
    """A corrupted or reset connection loses what was queued on it, an abort verdict included; the member
    would run the aborted op until its progress deadline, one op behind the others."""
    c = core_with(["a", "b", "d"])
    c.on_message("a", wire.OpFail(1, c.epoch, "w", 5, "connection to b dropped", ()), 0.0)
    c.on_link("b", "down", 0.1)
    out = c.on_link("b", "up", 0.2)
    again = msgs(out, wire.OpVerdict, "b")
    assert [(v.seq, v.commit) for v in again] == [(5, False)]
