"""DiLoCo with snapshots on in-process swarms: train with snapshots, crash every peer and the coordinator,
start a new swarm from the snapshots: the revision continues from the snapshot, the restored state is the
bits the swarm held at that revision, and parity holds after. A peer resuming from an *older* snapshot
into a live swarm takes the live state and never overrides it.

DiLoCo is used through its public state (``theta``, ``mom``, ``revision``, ``has_state``) by a small
subclass (``SnapDiLoCo``): the same two hooks the integration patch adds to ``peer.train.diloco``
(``snapshots=`` and ``resume=``), so this passes without the patch."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

from peer import Swarm
from peer.train.diloco import DiLoCo, RoundRecord
from peer.train.outer import load_params, state_digest
from recovery.snapshot import Snapshot, open_snapshot
from recovery.snapshot_writer import Snapshotter, load_outer, outer_specs
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_diloco import H, MU, OUTER_LR, by_revision, check, local_step, make_inner, make_model

pytestmark = pytest.mark.timeout(90)


def names_shapes(model: torch.nn.Module) -> tuple[list[str], list[tuple[int, ...]]]:
    named = list(model.named_parameters())
    return [n for n, _ in named], [tuple(p.shape) for _, p in named]


class SnapDiLoCo(DiLoCo):
    """DiLoCo plus the two snapshot hooks: resume before the entry sync, capture after a committed round."""

    def __init__(self, *a: Any, snapshots: Optional[Snapshotter] = None, resume: Optional[Snapshot] = None,
                 **kw: Any) -> None:
        self.snap_writer, self.resume_from = snapshots, resume  # names the patched DiLoCo does not use
        super().__init__(*a, **kw)

    def _enter(self) -> None:
        if self.resume_from is not None:
            theta, mom, rev = load_outer(self.resume_from, *names_shapes(self.model))
            self.theta[...], self.mom[...] = theta, mom
            self.revision, self.has_state = rev, True
            self.digest = state_digest(self.theta, self.mom)
            load_params(self.params, self.theta)
        super()._enter()

    def _record(self, rec: RoundRecord, t0: float, bytes0: int) -> None:
        super()._record(rec, t0, bytes0)
        if self.snap_writer is not None and rec.committed:
            self.snap_writer.capture(self.revision, outer_specs(*names_shapes(self.model), self.theta, self.mom),
                                   meta={"peer": self.swarm.id})


def run_peer(swarm: Swarm, index: int, until: int, snap_dir: Optional[Path] = None,
             resume: Optional[Snapshot] = None, hook: Optional[Callable[[RoundRecord], None]] = None
             ) -> SnapDiLoCo:
    model = make_model(index)
    snaps = Snapshotter(snap_dir, every=2, keep=4) if snap_dir is not None else None
    opt = SnapDiLoCo(model, make_inner(model), swarm, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MU,
                     op_timeout=30, alone_wait=2, on_round=hook, snapshots=snaps, resume=resume)
    step = 0
    while opt.revision < until and step < 20 * until * H:
        local_step(model, opt, index, step)
        step += 1
    opt.finish()
    if snaps is not None:
        snaps.close(30)
    return opt


def assert_parity(opts: list[DiLoCo]) -> None:
    seen: dict[int, str] = {}
    for o in opts:
        for rev, r in by_revision(o).items():
            assert seen.setdefault(rev, r.digest) == r.digest, f"revision {rev} differs on {o.swarm.id}"
    assert len({state_digest(o.theta, o.mom) for o in opts}) == 1


def test_whole_swarm_lost_restart_from_snapshots_revision_continues(inproc: InProcess, tmp_path: Path) -> None:
    _, peers = form_swarm(inproc, 2)
    dirs = [tmp_path / f"p{i}" for i in range(2)]
    first = check(run_all([lambda i=i, s=s: run_peer(s, i, 4, dirs[i]) for i, s in enumerate(peers)]))
    assert_parity(first)
    held = {rev: r.digest for rev, r in by_revision(first[0]).items()}
    for d in dirs:
        assert open_snapshot(d).revision == 4
    for s in list(inproc.swarms):  # every peer and the coordinator die at once (no goodbye)
        inproc.crash(s)

    # a new swarm: p0 resumes from its snapshot, p1 starts with nothing and catches up from p0
    snap = open_snapshot(dirs[0])
    theta, mom, rev = load_outer(snap, *names_shapes(make_model(0)))
    assert rev == 4 and state_digest(theta, mom).hex() == held[4]  # the bits the swarm held at revision 4
    _, again = form_swarm(inproc, 2)
    second = check(run_all([lambda: run_peer(again[0], 0, 7, dirs[0], resume=snap),
                            lambda: run_peer(again[1], 1, 7, dirs[1])]))
    entries = [o.history[0] for o in second]
    assert all(e.kind == "entry" for e in entries)
    assert not entries[0].adopted and entries[1].adopted  # the snapshot became the swarm's state
    assert sorted(by_revision(second[0])) == [5, 6, 7]     # the revision continues from 4
    assert_parity(second)
    assert open_snapshot(dirs[1]).revision == 6 and open_snapshot(dirs[0]).revision == 6


def test_an_older_snapshot_never_overrides_the_live_state(inproc: InProcess, tmp_path: Path) -> None:
    """p0 and p1 train to revision 6 with snapshots; meanwhile p2 joins resuming from p0's snapshot of
    revision 2. It adopts the live state; the live members' state is never replaced."""
    coord, peers = form_swarm(inproc, 2)
    late: dict[str, Swarm] = {}
    started = {"at": 0}

    def hold_at_4(rec: RoundRecord) -> None:
        started["at"] = max(started["at"], rec.revision)
        if rec.revision == 4 and rec.committed:  # members wait here until the joiner asked to join
            deadline = time.monotonic() + 20
            while "s" not in late or late["s"].state != "pending":
                assert time.monotonic() < deadline
                time.sleep(0.02)

    def joiner() -> DiLoCo:
        deadline = time.monotonic() + 30
        while started["at"] < 4 or not (tmp_path / "p0" / "rev-000000000002").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        old = open_snapshot(tmp_path / "p0" / "rev-000000000002")
        late["s"] = inproc.peer("late", [coord.addr.removeprefix("tcp://")])
        return run_peer(late["s"], 2, 8, resume=old)

    opts = check(run_all([lambda: run_peer(peers[0], 0, 8, tmp_path / "p0", hook=hold_at_4),
                          lambda: run_peer(peers[1], 1, 8, tmp_path / "p1", hook=hold_at_4), joiner]))
    entry = opts[2].history[0]
    assert entry.kind == "entry" and entry.adopted and entry.revision >= 5  # it took the live state
    assert not any(r.adopted for o in opts[:2] for r in o.history[1:])  # live members never took its state
    assert_parity(opts)
    assert "late" in by_revision(opts[0])[8].members
    assert np.array_equal(opts[2].theta, opts[0].theta)
