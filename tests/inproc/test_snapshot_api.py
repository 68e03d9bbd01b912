"""DiLoCo's snapshot arguments (``snapshots=``, ``resume=``): the whole swarm crashes, a new swarm resumes
from a snapshot through the API, the revision continues and parity holds; train_swarm's flags parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.train_swarm import build_parser
from peer.train.diloco import DiLoCo
from peer.train.outer import state_digest
from recovery.snapshot import open_snapshot
from recovery.snapshot_writer import Snapshotter
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_diloco import H, by_revision, check, local_step, make_inner, make_model

pytestmark = pytest.mark.timeout(90)


def run(swarm, index, until, snap_dir=None, resume=None) -> DiLoCo:  # type: ignore[no-untyped-def]
    model = make_model(index)
    snaps = Snapshotter(snap_dir, every=2) if snap_dir is not None else None
    opt = DiLoCo(model, make_inner(model), swarm, inner_steps=H, op_timeout=30, alone_wait=2,
                 snapshots=snaps, resume=resume)
    step = 0
    while opt.revision < until and step < 20 * until * H:
        local_step(model, opt, index, step)
        step += 1
    opt.finish()
    if snaps is not None:
        snaps.close(30)
    return opt


def test_api_resume_after_losing_every_peer(inproc: InProcess, tmp_path: Path) -> None:
    _, peers = form_swarm(inproc, 2)
    first = check(run_all([lambda i=i, s=s: run(s, i, 4, tmp_path / f"p{i}") for i, s in enumerate(peers)]))
    held = by_revision(first[0])[4].digest
    for s in list(inproc.swarms):
        inproc.crash(s)
    snap = open_snapshot(tmp_path / "p1")
    assert snap.revision == 4
    _, again = form_swarm(inproc, 2)
    second = check(run_all([lambda: run(again[0], 0, 6), lambda: run(again[1], 1, 6, resume=snap)]))
    assert second[1].history[0].digest == held and second[0].history[0].adopted
    assert sorted(by_revision(second[0])) == [5, 6]
    assert state_digest(second[0].theta, second[0].mom) == state_digest(second[1].theta, second[1].mom)


def test_train_swarm_has_the_snapshot_flags() -> None:
    a = build_parser().parse_args(["--bootstrap", "--snapshot-dir", "s", "--snapshot-every", "3", "--resume", "r"])
    assert (a.snapshot_dir, a.snapshot_every, a.resume) == ("s", 3, ["r"])


def test_swarmtrain_peer_has_the_training_workload_and_snapshot_flags() -> None:
    from peer.cli import build_parser as cli_parser, diloco_config_from_args

    a = cli_parser().parse_args(["peer", "--bootstrap", "--workload", "train", "--task", "m:f", "--task-arg",
                                 "width=8", "--resume", "r1", "--resume", "r2", "--inner-steps", "4",
                                 "--codec", "int8"])
    assert (a.workload, a.task, a.task_arg, a.resume) == ("train", "m:f", ["width=8"], ["r1", "r2"])
    cfg = diloco_config_from_args(a)
    assert (cfg.inner_steps, cfg.codec, cfg.outer_lr) == (4, "int8", 0.7)   # unset: DiLoCo's defaults
