"""Expert-sync (SPES) snapshots and a resume with another ownership layout, live (in-process peers):

- 3 peers, 2 owners per expert, train with a snapshot of every committed sync (each peer its own directory:
  the shared layers and the experts it owns); then every peer is lost;
- the union of one directory only (experts it did not own missing) is refused, naming the missing experts;
- 2 new peers with 1 owner per expert resume from the union of the three: a corrupted expert file is refused
  on both (the owner that reads it names the file; nothing is taken); once repaired the same peers resume:
  the weights they hold equal the snapshotted ones bit for bit, the revision and the step counter continue,
  each owns its experts of the new layout, and training goes on (bit-identical members, new snapshots)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from peer import Swarm
from peer.train.experts import ExpertSync, expert_map
from peer.train.experts_own import owned_by, owners
from peer.train.experts_snapshots import (ExpertResumeReport, attach_snapshots, model_names, open_expert_union,
                                          resume_hook)
from peer.train.pipeline_snapshots import SnapshotUnion
from recovery.snapshot import SnapshotCorrupt, SnapshotError, SnapshotNotFound, list_snapshots, open_snapshot
from recovery.snapshot_writer import Snapshotter
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_experts import EXPERTS, LAYERS, H, assert_parity, local_step, make_model, make_opt
from tests.inproc.test_snapshot_pipeline import lose_everyone

pytestmark = pytest.mark.timeout(150)

K, N = 3, 2          # syncs before the loss, syncs after the resume


def build(swarm: Swarm, index: int, r: int, union: Optional[SnapshotUnion] = None,
          reports: Optional[list[ExpertResumeReport]] = None) -> ExpertSync:
    model = make_model(100 + index)           # resumed weights must not depend on these
    return ExpertSync(model, make_opt, swarm, experts=expert_map(model), sync_steps=H, owners_per_expert=r,
                      op_timeout=30, alone_wait=2, resume=resume_hook(union, reports))


def train(opt: ExpertSync, index: int, until: int, snap_dir: Path) -> ExpertSync:
    """Snapshot every committed sync into ``snap_dir``; train until the swarm's revision reaches ``until``."""
    snaps = Snapshotter(snap_dir, every=1, keep=K + N, meta={"peer": opt.swarm.id})
    attach_snapshots(opt, snaps)
    step = 0
    try:
        while opt.revision < until and step < 20 * H * until:
            local_step(opt.model, opt, index, opt.inner_step_count)
            step += 1
        opt.finish()
    finally:
        snaps.close()
    return opt


def weights(opt: ExpertSync) -> dict[str, bytes]:
    return {n: p.detach().numpy().tobytes() for n, p in opt.model.named_parameters()}


def check(results: list[object]) -> None:
    for res in results:
        if isinstance(res, Exception):
            raise res


def test_experts_resume_with_another_ownership_layout(inproc: InProcess, tmp_path: Path) -> None:
    # 3 peers, r = 2, a snapshot of every committed sync; then every peer is lost
    _, peers = form_swarm(inproc, 3)
    dirs = [tmp_path / f"three-{i}" for i in range(3)]
    opts = run_all([partial(build, p, i, 2) for i, p in enumerate(peers)], timeout=60)
    check(opts)
    first = run_all([partial(train, o, i, K, dirs[i]) for i, o in enumerate(opts)], timeout=100)
    check(first)
    assert_parity(first)
    held = weights(first[0])                                       # the synced model at revision K
    mom = first[0].mom.copy()
    step = first[0].inner_step_count
    assert all(o.revision == K for o in first) and step == K * H
    for d, o in zip(dirs, first):                                  # each wrote the shared part and its experts
        snap = open_snapshot(list_snapshots(d)[-1][1])
        assert snap.revision == K and snap.meta["step"] == step
        assert {(e.meta["layer"], e.meta["expert"]) for e in snap.entries.values() if e.kind == "expert"} \
            == o.owned
    lose_everyone(inproc)

    names = model_names(make_model(0))
    # one directory alone lacks the experts its peer did not own: refused, naming them
    with pytest.raises(SnapshotNotFound) as exc:
        open_expert_union(dirs[:1], names)
    lacking = sorted({(lay, e) for lay in range(LAYERS) for e in range(EXPERTS)} - first[0].owned)
    assert lacking and str(lacking[0]) in str(exc.value) and "expert(s) (layer, expert)" in str(exc.value)
    x = lacking[0]
    assert f"expert/{names.experts[x][0]}" in str(exc.value)

    union = open_expert_union(dirs, names)
    assert union.revision == K
    assert all(union.read(f"outer/{n}").tobytes() == held[n] for n in names.shared)
    assert all(union.read(f"expert/{n}").tobytes() == held[n] for ns in names.experts.values() for n in ns)

    # 2 new peers, r = 1: a corrupted expert file is refused on both, nothing is taken
    _, peers = form_swarm(inproc, 2)
    table = owners([p.id for p in peers], LAYERS, EXPERTS, 1)
    snap, entry = union.held[f"expert/{names.experts[x][0]}"]
    bad = snap.path / entry.file
    raw = bytearray(bad.read_bytes())
    raw[0] ^= 0xFF
    bad.write_bytes(bytes(raw))
    errors = run_all([partial(build, p, i, 1, open_expert_union(dirs, names)) for i, p in enumerate(peers)],
                     timeout=60)
    reader = next(i for i, p in enumerate(peers) if p.id in table[x])
    assert isinstance(errors[reader], SnapshotCorrupt) and errors[reader].path == bad, errors
    assert isinstance(errors[1 - reader], SnapshotError) and "nothing resumed" in str(errors[1 - reader]), errors
    raw[0] ^= 0xFF
    bad.write_bytes(bytes(raw))

    # repaired: the same peers resume with the new layout
    reports: list[ExpertResumeReport] = []
    again = run_all([partial(build, p, i, 1, open_expert_union(dirs, names), reports) for i, p in enumerate(peers)],
                    timeout=60)
    check(again)
    for o in again:
        assert weights(o) == held                                  # bit for bit, every expert on every peer
        assert o.mom.tobytes() == mom.tobytes()
        assert o.revision == K and o.inner_step_count == step      # the counters continue
        assert o.owned == owned_by(table, o.swarm.id)              # the new layout: one owner per expert
    assert sorted(len(r.owned) for r in reports) == [LAYERS * EXPERTS // 2] * 2
    new_dirs = [tmp_path / f"two-{i}" for i in range(2)]
    second = run_all([partial(train, o, 10 + i, K + N, new_dirs[i]) for i, o in enumerate(again)], timeout=100)
    check(second)
    assert_parity(second)
    for o in second:
        revs = [r.revision for r in o.history if r.committed]
        assert revs == list(range(K + 1, K + N + 1)), revs            # the next committed sync is K + 1
        assert o.inner_step_count == step + N * H
    assert weights(second[0]) != held                                # it trained on
    cont = open_expert_union(new_dirs, names)                       # and its snapshots are a complete union
    assert cont.revision == K + N
    assert all(np.array_equal(cont.read(f"outer/{n}").reshape(-1),
                              second[0].model.get_parameter(n).detach().numpy().reshape(-1))
               for n in names.shared)
