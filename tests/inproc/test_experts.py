"""ExpertSync on in-process swarms: every member bit-identical after every sync and equal to a single-process
reference of the same steps; frozen experts untouched and out of the optimizer; an owner killed mid-sync
(abort, rerun on the survivors, nothing half-applied, experts reassigned, the co-owner's progress kept, an
orphaned expert keeps its weights); a joiner catches up and takes experts."""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from peer import Swarm
from peer.train.experts import ExpertLayout, ExpertSync, SyncRecord, expert_map
from peer.train.experts_own import Expert, owned_by, owners
from peer.train.outer import state_digest, weight_scale
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_diloco import ring_sum

pytestmark = pytest.mark.timeout(90)

H, BATCH, LR, LAYERS, EXPERTS = 3, 8, 0.05, 2, 4


# ---------------------------------------------------------------- a tiny MoE-shaped job

class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(6, EXPERTS)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(EXPERTS))

    def forward(self, h: torch.Tensor) -> torch.Tensor:            # (B, 6): every expert runs, soft-routed
        g = self.router(h).softmax(-1)                                # (B, E)
        return h + sum(g[:, e:e + 1] * torch.tanh(ex(h)) for e, ex in enumerate(self.experts))


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(4, 6)
        self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))
        self.out = torch.nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def make_model(seed: int) -> Tiny:
    g = torch.Generator().manual_seed(seed)
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)  # decay and momentum would move frozen experts


def batch(index: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * index + step)
    x = torch.randn(BATCH, 4, generator=g)
    return x, torch.sin(x[:, :2] * (1 + index))


def local_step(model: torch.nn.Module, opt: Any, index: int, step: int) -> None:
    x, y = batch(index, step)
    ((model(x) - y) ** 2).mean().backward()
    if isinstance(opt, ExpertSync):
        opt.step(samples=BATCH)
    else:
        opt.step()
    opt.zero_grad()


def check_frozen(opt: ExpertSync) -> None:
    """Experts I do not own: no grad, not in the optimizer, and still at the last synced weights."""
    assert opt.inner is not None
    in_opt = {id(p) for g in opt.inner.param_groups for p in g["params"]}
    for x, ps in opt.expert_params.items():
        lo, hi = opt.bounds[x]
        if x in opt.owned:
            assert all(p.requires_grad and id(p) in in_opt for p in ps)
            continue
        assert all(not p.requires_grad and p.grad is None and id(p) not in in_opt
                   and p not in opt.inner.state for p in ps)
        flat = torch.cat([p.detach().reshape(-1) for p in ps]).numpy()
        assert flat.tobytes() == opt.theta[lo:hi].tobytes(), f"frozen expert {x} moved"


def train(swarm: Swarm, index: int, rounds: int, r: int = 2, hook: Optional[Callable[[SyncRecord], None]] = None,
          snaps: Optional[dict[int, np.ndarray]] = None) -> ExpertSync:
    """One peer's ordinary loop until the swarm's revision reaches ``rounds``; ``snaps``: the synced weights
    after each committed revision."""
    model = make_model(index)
    box: list[ExpertSync] = []

    def on_sync(rec: SyncRecord) -> None:
        if snaps is not None and rec.committed and box:
            snaps[rec.revision] = box[0].theta.copy()
        if hook is not None:
            hook(rec)

    opt = ExpertSync(model, make_opt, swarm, experts=expert_map(model), sync_steps=H, owners_per_expert=r,
                     op_timeout=30, alone_wait=2, on_sync=on_sync)
    box.append(opt)
    assert opt.has_state and opt.layout.flatten().tobytes() == opt.theta.tobytes()
    step = 0
    while opt.revision < rounds and step < 20 * H * rounds:
        local_step(model, opt, index, step)
        check_frozen(opt)
        step += 1
    opt.finish()
    return opt


def check(results: list[Any]) -> list[ExpertSync]:
    for res in results:
        if isinstance(res, Exception):
            raise res
    return results


def by_revision(opt: ExpertSync) -> dict[int, SyncRecord]:
    return {r.revision: r for r in opt.history if r.committed}


def assert_parity(opts: list[ExpertSync]) -> None:
    seen: dict[int, str] = {}
    for o in opts:
        for rev, rec in by_revision(o).items():
            assert seen.setdefault(rev, rec.digest) == rec.digest, f"revision {rev} differs on {o.swarm.id}"
    assert len({state_digest(o.theta, o.mom) for o in opts}) == 1
    for o in opts:
        assert o.layout.flatten().tobytes() == o.theta.tobytes()


# ---------------------------------------------------------------- the single-process reference

def reference(ids: dict[str, int], history: list[SyncRecord], root: int, r: int,
              zero: frozenset[tuple[int, str]] = frozenset()) -> list[str]:
    """Recompute every committed sync in one process: each member trains from the synced weights with its
    own inner optimizer over the shared part and the experts it owns under the table of the previous sync,
    shared deltas are summed over the ring, expert deltas over their contributors (in ring order), and
    ownership is recomputed from each sync's ring. Only the rings (and who entered with weight 0) come from
    the run. Returns the digests after each revision."""
    theta = ExpertLayout(make_model(root), expert_map(make_model(root))).flatten()
    mom = np.zeros(ExpertLayout(make_model(root), expert_map(make_model(root))).n_shared, np.float32)
    models = {m: make_model(i) for m, i in ids.items()}
    lays = {m: ExpertLayout(mod, expert_map(mod)) for m, mod in models.items()}
    opts: dict[str, torch.optim.Optimizer] = {}
    owned: dict[str, set[Expert]] = {m: set() for m in ids}
    steps = {m: 0 for m in ids}
    S = lays[next(iter(ids))].n_shared
    entry = next(h for h in history if h.kind == "entry")
    table = owners(entry.members, LAYERS, EXPERTS, r)

    def adopt(m: str, tab: dict[Expert, tuple[str, ...]]) -> None:
        new = owned_by(tab, m)
        if m in opts and new == owned[m]:
            return
        kept = set(lays[m].shared_params) | {p for x in new & owned[m] for p in lays[m].expert_params[x]}
        old = opts.get(m)
        opts[m] = make_opt(lays[m].freeze(new))
        if old is not None:
            for p in kept:
                if p in old.state:
                    opts[m].state[p] = old.state[p]
        owned[m] = new

    for m in entry.members:
        adopt(m, table)
    digests = []
    for rec in [h for h in history if h.committed]:
        ring = rec.members
        ws = {m: 0.0 if (rec.revision, m) in zero else float(BATCH * H) for m in ring}
        deltas = {}
        for m in ring:
            deltas[m] = np.zeros_like(theta)
            if ws[m] > 0:
                lays[m].load(theta)
                for _ in range(H):
                    local_step(models[m], opts[m], ids[m], steps[m])
                    steps[m] += 1
                deltas[m] = np.subtract(theta, lays[m].flatten())
        total = np.float32(sum(ws.values()))
        shared = ring_sum([np.multiply(deltas[m][:S], weight_scale(ws[m], total)) for m in ring])
        np.subtract(theta[:S], shared, out=theta[:S])
        lay = lays[ring[0]]
        for x in sorted(lay.bounds):
            lo, hi = lay.bounds[x]
            cs = [m for m in ring if ws[m] > 0 and x in owned[m]]
            if len(cs) == 1:
                avg = deltas[cs[0]][lo:hi]
            elif cs:
                wc = np.float32(sum(ws[m] for m in cs))
                avg = ring_sum([np.multiply(deltas[m][lo:hi], weight_scale(ws[m], wc)) for m in cs])
            else:
                continue                      # orphaned: keeps its last synced weights
            np.subtract(theta[lo:hi], avg, out=theta[lo:hi])
        digests.append(state_digest(theta, mom).hex())
        table = owners(ring, LAYERS, EXPERTS, r)
        for m in ring:
            adopt(m, table)
            lays[m].load(theta)
    return digests


def digests(opt: ExpertSync) -> list[str]:
    return [h.digest for h in opt.history if h.committed]


# ---------------------------------------------------------------- tests

def test_three_peers_bit_identical_and_equal_to_the_reference(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 3)
    opts = check(run_all([functools.partial(train, s, i, rounds=4) for i, s in enumerate(peers)]))
    assert_parity(opts)
    assert all(max(by_revision(o)) == 4 for o in opts)
    hist = opts[0].history
    root = next(i for i, o in enumerate(opts) if not o.history[0].adopted)
    assert reference({o.swarm.id: i for i, o in enumerate(opts)}, hist, root, r=2) == digests(opts[0])
    for o in opts:  # r = 2 of 3 peers: 8 owner slots per layer over 3 peers, 2 or 3 each
        per_layer = [sum(1 for (lay, _) in o.owned if lay == layer) for layer in range(LAYERS)]
        assert all(2 <= n <= 3 for n in per_layer), per_layer
        assert o.history[-1].bytes_sent > 0 and o.history[-1].bytes_received > 0


def die_in_sync(inproc: InProcess, victim: Swarm, survivors: list[Swarm], nth: int) -> None:
    """``victim`` crashes at its ``nth`` shared-parameter all-reduce (issued on the pinned communicator,
    after the header all-gather): the survivors' ops of that sync are already on the wire."""
    calls = {"n": 0}
    real_pinned = victim.comm.pinned

    class Dying:
        def __init__(self, comm: Any) -> None:
            self.comm = comm

        def __getattr__(self, name: str) -> Any:
            return getattr(self.comm, name)

        def all_reduce_async(self, buf: Any, *a: Any, **kw: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == nth:
                deadline = time.monotonic() + 10
                while not all(s.node.engine.ops for s in survivors):
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                inproc.crash(victim)
                raise RuntimeError("killed")
            return self.comm.all_reduce_async(buf, *a, **kw)

    victim.comm.pinned = lambda epoch: Dying(real_pinned(epoch))  # type: ignore[method-assign,assignment,return-value]


@pytest.mark.parametrize("r", [1, 2])
def test_owner_killed_mid_sync_reruns_on_survivors_and_reassigns(inproc: InProcess, r: int) -> None:
    _, peers = form_swarm(inproc, 3)
    victim = peers[2]
    die_in_sync(inproc, victim, peers[:2], nth=3)          # in the 3rd sync (revision 3)
    snaps: dict[int, np.ndarray] = {}
    results = run_all([lambda: train(peers[0], 0, rounds=5, r=r, snaps=snaps),
                       lambda: train(peers[1], 1, rounds=5, r=r), lambda: train(victim, 2, rounds=5, r=r)])
    assert isinstance(results[2], RuntimeError)
    opts = check(results[:2])
    assert_parity(opts)
    recs = by_revision(opts[0])
    assert [len(recs[v].members) for v in range(1, 6)] == [3, 3, 2, 2, 2]
    assert recs[3].retried and sorted(recs[3].members) == ["p0", "p1"]
    # revision 3 averaged what the survivors trained under the 3-peer table; the victim's experts
    table3 = owners(recs[2].members, LAYERS, EXPERTS, r)
    orphans = [x for x, ps in table3.items() if set(ps) == {victim.id}]
    co_owned = [x for x, ps in table3.items() if victim.id in ps and len(ps) > 1]
    assert recs[3].orphans == len(orphans)
    for x in orphans:  # nobody trained it: it keeps its last synced weights, and gets new owners
        lo, hi = opts[0].bounds[x]
        assert snaps[3][lo:hi].tobytes() == snaps[2][lo:hi].tobytes()
        assert x in opts[0].owned or x in opts[1].owned
    for x in co_owned:  # the surviving co-owner's progress went in
        lo, hi = opts[0].bounds[x]
        assert snaps[3][lo:hi].tobytes() != snaps[2][lo:hi].tobytes()
    assert (orphans if r == 1 else co_owned)
    assert recs[3].gained + by_revision(opts[1])[3].gained > 0       # the victim's experts, reassigned
    assert all(set(ps) <= {"p0", "p1"} for ps in opts[0].table.values())
    ids = {"p0": 0, "p1": 1, "p2": 2}
    assert reference(ids, opts[0].history, _root(opts, victim.id), r=r) == digests(opts[0])


def _root(opts: list[ExpertSync], victim_id: str) -> int:
    """Whose initial weights became the state: the survivor that did not adopt, else the victim."""
    for i, o in enumerate(opts):
        if not o.history[0].adopted:
            return i
    return int(victim_id[1:])


def test_joiner_catches_up_takes_experts_and_matches(inproc: InProcess) -> None:
    coord, peers = form_swarm(inproc, 2)
    late: dict[str, Swarm] = {}
    seen: list[SyncRecord] = []

    def hold(rec: SyncRecord) -> None:
        seen.append(rec)
        if rec.revision == 2 and rec.committed:
            deadline = time.monotonic() + 20
            while "s" not in late or late["s"].state != "pending":
                assert time.monotonic() < deadline
                time.sleep(0.02)

    def joiner() -> ExpertSync:
        deadline = time.monotonic() + 30
        while not any(r.revision >= 2 for r in seen):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        late["s"] = inproc.peer("late", [coord.addr.removeprefix("tcp://")])
        return train(late["s"], 2, rounds=5)

    opts = check(run_all([lambda: train(peers[0], 0, rounds=5, hook=hold),
                          lambda: train(peers[1], 1, rounds=5, hook=hold), joiner]))
    entry = opts[2].history[0]
    assert entry.kind == "entry" and entry.adopted and entry.my_samples == 0 and entry.committed
    assert entry.owned and entry.gained == len(entry.owned)   # it takes experts at once
    assert_parity(opts)
    joined = entry.revision
    assert 3 <= joined < 5 and "late" in by_revision(opts[0])[5].members
    assert by_revision(opts[0])[joined].moved > 0
    ids = {"p0": 0, "p1": 1, "late": 2}
    root = next(i for i, o in enumerate(opts[:2]) if not o.history[0].adopted)
    assert reference(ids, opts[0].history, root, r=2, zero=frozenset({(joined, "late")})) == digests(opts[0])


def test_evicted_peer_finds_it_is_stale_rejoins_and_resyncs(inproc: InProcess) -> None:
    coord, peers = form_swarm(inproc, 3)
    victim = peers[2]

    def evict_after_2(rec: SyncRecord) -> None:
        if rec.revision == 2 and rec.committed:  # as after a stall: the coordinator drops it from the epoch
            node = coord.node
            assert node.coord is not None
            node.call(lambda: node._apply(node.coord.evict(victim.id, "test: silent too long")))  # type: ignore[union-attr]
            deadline = time.monotonic() + 10
            while victim.state != "stale":
                assert time.monotonic() < deadline
                time.sleep(0.01)

    def wait_for_rejoin(rec: SyncRecord) -> None:
        if rec.revision == 3 and rec.committed:  # the survivors go on once the victim asked to rejoin
            deadline = time.monotonic() + 20
            while victim.state != "pending":
                assert time.monotonic() < deadline
                time.sleep(0.01)

    opts = check(run_all([lambda: train(peers[0], 0, rounds=6, hook=wait_for_rejoin),
                          lambda: train(peers[1], 1, rounds=6, hook=wait_for_rejoin),
                          lambda: train(victim, 2, rounds=6, hook=evict_after_2)]))
    stale = opts[2]
    assert any(r.reason.startswith("stale") for r in stale.history)
    back = [r for r in stale.history if r.kind == "entry"][1:]
    assert back and back[0].adopted and back[0].my_samples == 0
    assert_parity(opts)
    assert victim.id in by_revision(opts[0])[6].members and stale.owned   # it owns experts again
