"""Tier 3: real peer processes on 127.0.0.1, killed, stopped and joined while they all-reduce.

Every peer records each op attempt; ``peer.history.check_records`` asserts parity (I1), atomicity (I2) and
the numpy reference on the recorded history.
"""

from __future__ import annotations

import random
import signal
import time
from typing import Any

import pytest

from peer.sim.history import check_records
from peer.sim.procs import LocalProcs
from tests.helpers import FAST_ARGS, HB_TIMEOUT

# the ring (``ring.AllReduce``) at every swarm size here; a smaller buffer would run in one step
# (``ring.DirectAllReduce``), which the inproc DiLoCo tests kill mid-sync
ELEMS = 70_000


def _peer_args(duration: float, elems: int = ELEMS) -> list[str]:
    return ["--elems", str(elems), "--duration", str(duration), *FAST_ARGS]


def _committed(records: list[dict[str, Any]], peer: str, after: float = 0.0) -> list[dict[str, Any]]:
    return [r for r in records if r.get("peer") == peer and r.get("committed") and r["t"] > after]


def _wait_for_commits(procs: LocalProcs, names: list[str], count: int, timeout: float) -> None:
    """Until each of ``names`` has recorded ``count`` committed ops with all of ``names`` in them."""
    deadline = time.monotonic() + timeout
    while True:
        recs = procs.records(names)
        if all(sum(1 for r in recs if r.get("peer") == n and r.get("committed")
                   and set(names) <= set(r["members"])) >= count for n in names):
            return
        assert time.monotonic() < deadline, f"{names} did not commit {count} ops together in {timeout}s"
        time.sleep(0.1)


def _wait_for_commit(procs: LocalProcs, peer: str, members: list[str], after: float, timeout: float) -> None:
    """Until ``peer`` has recorded a committed op after ``after`` with exactly ``members``."""
    deadline = time.monotonic() + timeout
    while not [r for r in _committed(procs.records([peer]), peer, after) if sorted(r["members"]) == members]:
        assert time.monotonic() < deadline, f"{peer} committed no op of {members} in {timeout}s"
        time.sleep(0.1)


def _assert_invariants(records: list[dict[str, Any]], elems: int = ELEMS) -> dict[str, Any]:
    summary = check_records(records, elems=elems)
    assert summary["parity_violations"] == 0, summary
    assert summary["partial_commits"] == 0, summary
    assert summary["unrestored_buffers"] == 0, summary
    assert summary["reference_mismatches"] == 0, summary
    assert summary["reference_checked"] > 0, summary
    return summary


@pytest.mark.timeout(90)
def test_four_peers_match_reference_with_identical_digests(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    names = [f"p{i}" for i in range(4)]
    for n in names:
        procs.peer(n, [coord.hostport], _peer_args(5))
    for n in names:
        procs.wait_done(n, 60)
    records = procs.records()
    _assert_invariants(records)
    four = [r for r in records if r.get("committed") and len(r["members"]) == 4]
    assert four, "the four peers never all-reduced together"


@pytest.mark.timeout(90)
def test_sigkill_mid_op_aborts_everywhere_and_survivors_continue(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    elems = 2_000_000  # 8 MB ops: a kill lands mid-op
    for n in ("a", "b", "c", "d"):
        procs.peer(n, [coord.hostport], _peer_args(20, elems))
    _wait_for_commits(procs, ["a", "b", "c", "d"], 3, 40)  # all four in, all-reducing together
    # Freeze d first so that the others are surely inside an op that needs d, then kill it.
    procs.signal("d", signal.SIGSTOP)
    time.sleep(0.4)
    killed_at = time.time()
    procs.kill("d")
    for n in ("a", "b", "c"):
        procs.wait_done(n, 60)
    records = procs.records()
    _assert_invariants(records, elems)
    aborted = [r for r in records if r.get("committed") is False and r["t"] >= killed_at]
    assert aborted, "the kill should have aborted the op in flight"
    in_flight = min(aborted, key=lambda r: r["t"])["key"]
    hit = [r for r in aborted if r["key"] == in_flight]
    assert {r["peer"] for r in hit} == {"a", "b", "c"}, "the op in flight must abort on every survivor"
    assert not [r for r in records if r.get("key") == in_flight and r.get("committed")], "one op, one verdict"
    assert all(r["restored"] for r in aborted)
    for n in ("a", "b", "c"):
        after = [r for r in _committed(records, n, killed_at) if "d" not in r["members"]]
        assert after, f"{n} committed nothing after the kill"
        assert sorted(after[0]["members"]) == ["a", "b", "c"]


@pytest.mark.timeout(90)
def test_peer_joins_mid_run_and_takes_part(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    for n in ("a", "b", "c"):
        procs.peer(n, [coord.hostport], _peer_args(8))
    _wait_for_commits(procs, ["a", "b", "c"], 3, 30)   # the three all-reduce together
    joined_at = time.time()
    procs.peer("late", [procs.procs["b"].hostport], _peer_args(4))  # joins through a peer: redirected
    for n in ("a", "b", "c", "late"):
        procs.wait_done(n, 60)
    records = procs.records()
    _assert_invariants(records)
    with_late = [r for r in _committed(records, "a", joined_at) if "late" in r["members"]]
    assert with_late, "the joiner never took part"
    assert _committed(records, "late")


@pytest.mark.timeout(90)
def test_stalled_peer_is_evicted_then_learns_it_is_stale(procs: LocalProcs) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    for n in ("a", "b", "c"):
        procs.peer(n, [coord.hostport], _peer_args(12))
    _wait_for_commits(procs, ["a", "b", "c"], 3, 30)
    stopped_at = time.time()
    procs.signal("c", signal.SIGSTOP)
    _wait_for_commit(procs, "a", ["a", "b"], stopped_at, HB_TIMEOUT + 10)   # c evicted, a and b go on
    procs.signal("c", signal.SIGCONT)
    for n in ("a", "b", "c"):
        procs.wait_done(n, 60)
    records = procs.records()
    _assert_invariants(records)
    progressed = [r for r in _committed(records, "a", stopped_at) if r["members"] == ["a", "b"]]
    assert progressed, "a and b made no progress while c was stalled"
    first = min(r["t"] for r in progressed)
    assert first - stopped_at < HB_TIMEOUT + 8 + 2, "eviction came later than the heartbeat deadline allows"
    stale = [r for r in records if r.get("peer") == "c" and r.get("event") == "stale"]
    assert stale, "the stalled peer never learned that it was stale"
    assert _committed(records, "c", stale[0]["t"]), "the stale peer did not rejoin and take part again"


@pytest.mark.parametrize("embedded", [False, True], ids=["standalone", "embedded"])
@pytest.mark.timeout(90)
def test_coordinator_killed_swarm_keeps_committing(procs: LocalProcs, embedded: bool) -> None:
    if embedded:
        boot = procs.peer("boot", [], ["--bootstrap", *_peer_args(30)])
        entry, victim = boot.hostport, "boot"
    else:
        entry, victim = procs.coordinator(extra=FAST_ARGS).hostport, "coordinator"
    names = ["a", "b", "c"]
    for n in names:
        procs.peer(n, [entry], _peer_args(10))
    _wait_for_commits(procs, names, 3, 30)
    killed_at = time.time()
    procs.kill(victim)
    for n in names:
        procs.wait_done(n, 60)
    records = procs.records(names)
    _assert_invariants(records)
    for n in names:
        after = _committed(records, n, killed_at)
        assert after, f"{n} committed nothing after the coordinator died"
    resumed = min(r["t"] for r in _committed(records, "a", killed_at))
    assert resumed - killed_at < HB_TIMEOUT + 1.0 + 3, "re-forming took longer than the deadlines allow"


@pytest.mark.timeout(90)
def test_coordinator_and_successor_killed_together_the_last_peer_carries_on(procs: LocalProcs) -> None:
    """Both deaths are proven (the hosts refuse connections), so b need not wait for a majority of
    {a, b}: it re-forms alone, and a newcomer that joins through b trains with it."""
    entry = procs.coordinator(extra=FAST_ARGS).hostport
    procs.peer("a", [entry], _peer_args(40))
    b = procs.peer("b", [entry], _peer_args(40))
    _wait_for_commits(procs, ["a", "b"], 3, 30)
    procs.kill("coordinator")
    procs.kill("a")
    killed_at = time.time()
    procs.peer("d", [b.hostport], _peer_args(12))
    procs.wait_done("d", 60)
    records = procs.records(["b", "d"])
    _assert_invariants(records)
    together = [r for r in _committed(records, "d", killed_at) if sorted(r["members"]) == ["b", "d"]]
    assert together, "b did not re-form alone and admit the newcomer"


@pytest.mark.timeout(180)
def test_churn_keeps_progress_and_parity(procs: LocalProcs) -> None:
    rng = random.Random(7)
    coord = procs.coordinator(extra=FAST_ARGS)
    duration = 38.0   # the seeded plan has its 5th kill and spawn ~18-24 s into the loop (spawns take 0.6-1.5 s)
    end = time.time() + duration
    alive: list[str] = []
    counter = 0

    def spawn() -> None:
        nonlocal counter
        name = f"n{counter}"
        counter += 1
        procs.peer(name, [coord.hostport], _peer_args(max(1.0, end - time.time())))
        alive.append(name)

    for _ in range(3):
        spawn()
    kills = spawns = 0
    while time.time() < end - 3:
        time.sleep(rng.uniform(0.5, 2.0))
        alive[:] = [n for n in alive if procs.procs[n].alive]
        if (rng.random() < 0.6 and len(alive) < 6) or len(alive) <= 2:
            spawn()
            spawns += 1
        else:
            victim = rng.choice(alive)
            procs.kill(victim)
            alive.remove(victim)
            kills += 1
    for n in list(alive):
        if procs.procs[n].alive:
            procs.wait_done(n, 60)
    records = procs.records()
    summary = _assert_invariants(records)
    times = sorted(r["t"] for r in records if r.get("committed"))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert kills >= 5 and spawns >= 5
    assert summary["ops_committed"] > 50, summary
    assert max(gaps) < 10.0, f"no progress for {max(gaps):.1f}s"
