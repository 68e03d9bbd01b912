"""DiLoCo on in-process swarms: bit parity after every outer step and equality with a single-process reference
of the same steps; a member lost mid-sync; a lone survivor discards; a joiner catches up; eager and streaming."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from collectives import ring, tensors
from peer import Swarm
from peer.train.diloco import DiLoCo, RoundRecord, flatten_params, fragment_bounds, state_digest
from tests.helpers import InProcess, run_all
from tests.inproc.test_collectives_inproc import form

pytestmark = pytest.mark.timeout(90)

H, BATCH, LR, OUTER_LR, MU = 3, 8, 0.05, 0.7, 0.9


# ---------------------------------------------------------------- a tiny deterministic training job

def make_model(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def make_inner(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=LR)  # stateful: its state must persist across rounds


def batch(index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * index + step)
    x = torch.randn(BATCH, 4, generator=g)
    return x, torch.sin(x[:, :2] * (1 + index))


def local_step(model: torch.nn.Module, opt: Any, index: int, step: int) -> None:
    x, y = batch(index, step)
    ((model(x) - y) ** 2).mean().backward()
    if isinstance(opt, DiLoCo):
        opt.step(samples=BATCH)
    else:
        opt.step()
    opt.zero_grad()


def train(swarm: Swarm, index: int, rounds: int, hook: Optional[Callable[[RoundRecord], None]] = None,
          **kw: Any) -> DiLoCo:
    """One peer's ordinary training loop. A joiner trains until the swarm's revision reaches ``rounds``."""
    model = make_model(index)
    kw.setdefault("inner_steps", H)
    kw.setdefault("fragments", 1)
    opt = DiLoCo(model, make_inner(model), swarm, outer_lr=OUTER_LR, outer_momentum=MU, op_timeout=30,
                 alone_wait=2, on_round=hook, **kw)
    # before the first inner step, every peer (a joiner too) holds the swarm's outer weights
    assert opt.has_state and flatten_params(list(model.parameters())).tobytes() == opt.theta.tobytes()
    steps = (rounds * kw["fragments"] - opt.revision) * (kw["inner_steps"] // kw["fragments"])
    for step in range(steps):
        local_step(model, opt, index, step)
    opt.finish()
    return opt


# ---------------------------------------------------------------- the single-process reference

def ring_sum(arrays: list[np.ndarray]) -> np.ndarray:
    """The sum an all-reduce computes, bit for bit, of ``arrays`` in ring order. A small one
    (``collectives.ring.direct``) adds them left to right (``DirectAllReduce``). Otherwise, in the ring
    (``AllReduce``), chunk c (of n contiguous chunks) is accumulated starting at ring position c, each next
    member adding its own values to the running sum."""
    n, out = len(arrays), np.empty_like(arrays[0])
    if ring.direct(arrays[0].nbytes, n):
        acc = arrays[0].copy()
        for a in arrays[1:]:
            acc = np.add(acc, a)
        return acc
    for c, (lo, hi) in enumerate(tensors.chunk_bounds(arrays[0].size, n)):
        acc = arrays[c][lo:hi].copy()
        for k in range(1, n):
            acc = np.add(arrays[(c + k) % n][lo:hi], acc)
        out[lo:hi] = acc
    return out


def ref_outer(theta: np.ndarray, mom: np.ndarray, g: np.ndarray) -> None:
    """Nesterov SGD written out independently of peer.train.diloco (same float32 operation order)."""
    mom *= np.float32(MU)
    mom += g
    d = g + np.float32(MU) * mom
    theta -= np.float32(OUTER_LR) * d


def by_revision(opt: DiLoCo) -> dict[int, RoundRecord]:
    return {r.revision: r for r in opt.history if r.committed}


def reference(opts: dict[int, DiLoCo], fragments: int = 1) -> list[str]:
    """Recompute every committed outer step in one process from the peers' data: each contributing peer
    runs its inner steps from the outer weights with its own inner optimizer, the contributions are summed
    in the recorded ring order (the only thing taken from the run, with each peer's weight), and the outer
    step is applied. Returns the digests after each revision."""
    ids = {o.swarm.id: i for i, o in opts.items()}
    root = next(i for i, o in opts.items() if o.history[0].kind == "entry" and not o.history[0].adopted)
    theta = flatten_params(list(make_model(root).parameters()))
    mom = np.zeros_like(theta)
    models = {i: make_model(i) for i in opts}
    inners = {i: make_inner(m) for i, m in models.items()}
    steps = {i: 0 for i in opts}
    start = {i: theta.copy() for i in opts}  # where each peer's current fragment phase began (streaming)
    for i, m in models.items():
        _load(m, theta)
    bounds = fragment_bounds([p.numel() for p in models[0].parameters()], fragments)
    interval = H // fragments
    digests = []
    last = max(r for o in opts.values() for r in by_revision(o))
    for rev in range(1, last + 1):
        recs = {i: by_revision(o)[rev] for i, o in opts.items() if rev in by_revision(o)}
        members = next(iter(recs.values())).members
        lo, hi = bounds[(rev - 1) % fragments]
        contrib, weights = [], []
        for m in members:
            i = ids[m]
            w = recs[i].my_samples
            delta = np.zeros(hi - lo, np.float32)
            if w > 0:
                if fragments == 1:
                    start[i] = theta.copy()
                    _load(models[i], theta)
                for _ in range(interval):
                    local_step(models[i], inners[i], i, steps[i])
                    steps[i] += 1
                delta = np.subtract(start[i][lo:hi], flatten_params(list(models[i].parameters()))[lo:hi])
            contrib.append(delta)
            weights.append(np.array([w], np.float32))
        total = ring_sum(weights)[0]
        avg = ring_sum([np.multiply(d, np.float32(np.float32(w[0]) / total)) for d, w in zip(contrib, weights)])
        t, mo = theta[lo:hi].copy(), mom[lo:hi].copy()
        ref_outer(t, mo, avg)
        theta[lo:hi], mom[lo:hi] = t, mo
        for m in members:  # the synced fragment takes the outer weights again
            i = ids[m]
            start[i][lo:hi] = theta[lo:hi]
            if fragments > 1:
                _load_range(models[i], theta, lo, hi)
        digests.append(state_digest(theta, mom).hex())
    return digests


def _load(model: torch.nn.Module, flat: np.ndarray) -> None:
    _load_range(model, flat, 0, flat.size)


def _load_range(model: torch.nn.Module, flat: np.ndarray, lo: int, hi: int) -> None:
    off = 0
    with torch.no_grad():
        for p in model.parameters():
            if lo <= off and off + p.numel() <= hi:
                p.copy_(torch.from_numpy(flat[off:off + p.numel()].copy()).view(p.shape))
            off += p.numel()


def assert_parity(opts: list[DiLoCo]) -> None:
    """Every peer that committed a revision holds the same bits for it, and ends on the same state."""
    seen: dict[int, str] = {}
    for o in opts:
        for rev, r in by_revision(o).items():
            assert seen.setdefault(rev, r.digest) == r.digest, f"revision {rev} differs on {o.swarm.id}"
    assert len({state_digest(o.theta, o.mom) for o in opts}) == 1
    for o in opts:  # finish() leaves the outer weights in the model
        assert flatten_params(o.params).tobytes() == o.theta.tobytes()


def check(results: list[Any]) -> list[DiLoCo]:
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


# ---------------------------------------------------------------- tests

def test_three_peers_match_each_other_and_the_reference(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    opts = check(run_all([lambda s=s, i=i: train(s, i, rounds=4) for i, s in enumerate(peers)]))
    assert_parity(opts)
    assert all(max(by_revision(o)) == 4 for o in opts)
    assert reference(dict(enumerate(opts))) == [by_revision(opts[0])[r].digest for r in range(1, 5)]
    assert all(len(by_revision(o)[r].members) == 3 for o in opts for r in range(1, 5))


def die_in_average(inproc: InProcess, victim: Swarm, survivors: list[Swarm], nth: int) -> None:
    """Make ``victim`` crash when it reaches its ``nth`` pseudo-gradient all-reduce (the op after the weight
    all-reduce, issued on a communicator pinned to that op's epoch): the survivors' ops of that average are
    already on the wire, waiting for its chunks."""
    calls = {"n": 0}
    real_pinned = victim.comm.pinned

    class Dying:
        def __init__(self, comm: Any) -> None:
            self.comm = comm

        def __getattr__(self, name: str) -> Any:  # the shared-state sync pins its ops too
            return getattr(self.comm, name)

        def _maybe_die(self) -> None:
            calls["n"] += 1
            if calls["n"] == nth:
                deadline = time.monotonic() + 10
                while not all(s.node.engine.ops for s in survivors):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                inproc.crash(victim)
                raise RuntimeError("killed")

        def all_reduce(self, buf: Any, *a: Any, **kw: Any) -> Any:
            self._maybe_die()
            return self.comm.all_reduce(buf, *a, **kw)

        def all_reduce_async(self, buf: Any, *a: Any, **kw: Any) -> Any:
            self._maybe_die()
            return self.comm.all_reduce_async(buf, *a, **kw)

    victim.comm.pinned = lambda epoch: Dying(real_pinned(epoch))  # type: ignore[method-assign]


def test_member_killed_mid_sync_survivors_retry_nothing_half_applied(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    survivors, victim = peers[:2], peers[2]
    die_in_average(inproc, victim, survivors, nth=3)  # round 3: the weights were summed with it
    results = run_all([lambda s=s, i=i: train(s, i, rounds=5) for i, s in enumerate(peers)])
    assert isinstance(results[2], RuntimeError)
    opts = check(results[:2])
    assert_parity(opts)
    r3 = by_revision(opts[0])[3]
    assert r3.retried and sorted(r3.members) == ["p0", "p1"]
    assert [len(by_revision(opts[0])[r].members) for r in range(1, 6)] == [3, 3, 2, 2, 2]
    # the reference: revision 3 averages the survivors only, and every step matches bit for bit
    victim_opt = {2: _victim_record(opts, victim.id)}
    assert reference({0: opts[0], 1: opts[1], **victim_opt}) == [by_revision(opts[0])[r].digest
                                                                   for r in range(1, 6)]


def _victim_record(opts: list[DiLoCo], victim_id: str) -> Any:
    """A stand-in for the dead peer in the reference: it contributed (with BATCH * H samples) to the
    revisions whose committed ring includes it."""
    class Dead:
        class swarm:
            id = victim_id
        history = [RoundRecord(kind="entry", revision=0, adopted=True)] + [
            RoundRecord(kind="sync", revision=r.revision, committed=True, members=r.members, digest=r.digest,
                        my_samples=float(BATCH * H))
            for r in opts[0].history if r.committed and victim_id in r.members]
    return Dead()


def test_lone_survivor_discards_local_steps_and_keeps_the_outer_weights(inproc: InProcess) -> None:
    a, b = form(inproc, 2)

    def b_dies(rec: RoundRecord) -> None:
        if rec.revision == 2 and rec.committed:
            inproc.crash(b)
            raise RuntimeError("killed")

    results = run_all([lambda: train(a, 0, rounds=4), lambda: train(b, 1, rounds=4, hook=b_dies)])
    assert isinstance(results[1], RuntimeError)
    [opt] = check(results[:1])
    assert max(by_revision(opt)) == 2 and opt.revision == 2
    failed = [r for r in opt.history if not r.committed and r.kind == "sync"]
    assert len(failed) == 2 and all("too few peers" in r.reason and r.revision == 2 for r in failed)
    assert state_digest(opt.theta, opt.mom).hex() == by_revision(opt)[2].digest  # nothing half-applied
    assert flatten_params(opt.params).tobytes() == opt.theta.tobytes()  # back to the outer weights


def test_evicted_peer_finds_it_is_stale_rejoins_and_resyncs(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    coord, victim = inproc.swarms[0], peers[2]

    def evict_after_round_2(rec: RoundRecord) -> None:
        if rec.revision == 2 and rec.committed:  # as after a stall: the coordinator drops it from the epoch
            node = coord.node
            node.call(lambda: node._apply(node.coord.evict(victim.id, "test: silent too long")))
            deadline = time.monotonic() + 10
            while victim.state != "stale":
                assert time.monotonic() < deadline
                time.sleep(0.01)

    def run(s: Swarm, i: int, hook: Any = None) -> DiLoCo:
        model = make_model(i)
        opt = DiLoCo(model, make_inner(model), s, inner_steps=H, op_timeout=30, alone_wait=2, on_round=hook)
        step = 0
        while opt.revision < 6 and step < 40 * H:  # every peer stops at the same shared revision
            local_step(model, opt, i, step)
            step += 1
        opt.finish()
        return opt

    def wait_for_rejoin(rec: RoundRecord) -> None:
        if rec.revision == 3 and rec.committed:  # the survivors go on once the victim asked to rejoin
            deadline = time.monotonic() + 20
            while victim.state != "pending":
                assert time.monotonic() < deadline
                time.sleep(0.01)

    opts = check(run_all([lambda: run(peers[0], 0, wait_for_rejoin), lambda: run(peers[1], 1, wait_for_rejoin),
                          lambda: run(victim, 2, evict_after_round_2)]))
    stale = opts[2]
    lost = [r for r in stale.history if r.reason.startswith("stale")]
    back = [r for r in stale.history if r.kind == "entry"][1:]  # its first entry was at the start
    assert lost and back and back[0].adopted and back[0].my_samples == 0
    assert_parity(opts)
    assert max(by_revision(stale)) == 6 and victim.id in by_revision(opts[0])[6].members


def test_joiner_catches_up_before_its_first_step_and_matches(inproc: InProcess) -> None:
    peers = form(inproc, 2)
    coord = inproc.swarms[0]
    late: dict[str, Swarm] = {}

    def hold_for_joiner(rec: RoundRecord) -> None:
        if rec.revision == 2 and rec.committed:  # members wait here until the joiner is pending
            deadline = time.monotonic() + 20
            while "s" not in late or late["s"].state != "pending":
                assert time.monotonic() < deadline
                time.sleep(0.02)

    def joiner() -> DiLoCo:
        deadline = time.monotonic() + 30
        while not any(r.revision >= 2 for r in members_hist):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        late["s"] = inproc.peer("late", [coord.addr.removeprefix("tcp://")])
        return train(late["s"], 2, rounds=6)  # asserts it holds the outer weights before its first step

    members_hist: list[RoundRecord] = []

    def member(i: int) -> DiLoCo:
        def hook(rec: RoundRecord) -> None:
            members_hist.append(rec)
            hold_for_joiner(rec)
        return train(peers[i], i, rounds=6, hook=hook)

    opts = check(run_all([lambda: member(0), lambda: member(1), joiner]))
    entry = opts[2].history[0]
    assert entry.kind == "entry" and entry.adopted and entry.my_samples == 0
    assert entry.committed  # it took part (with weight 0) in the average of the round it entered
    assert_parity(opts)
    joined_at = entry.revision
    assert 3 <= joined_at < 6 and "late" in by_revision(opts[0])[6].members
    assert by_revision(opts[2])[6].my_samples == BATCH * H
    assert reference(dict(enumerate(opts))) == [by_revision(opts[0])[r].digest for r in range(1, 7)]


def test_streaming_fragments_match_the_reference(inproc: InProcess) -> None:
    peers = form(inproc, 3)
    opts = check(run_all([lambda s=s, i=i: train(s, i, rounds=2, mode="streaming", fragments=3,
                                                   inner_steps=6) for i, s in enumerate(peers)]))
    assert_parity(opts)
    frags = [by_revision(opts[0])[r].fragment for r in range(1, 7)]
    assert frags == [0, 1, 2, 0, 1, 2]
    global H
    saved, H = H, 6
    try:
        assert reference(dict(enumerate(opts)), fragments=3) == [by_revision(opts[0])[r].digest
                                                                  for r in range(1, 7)]
    finally:
        H = saved
