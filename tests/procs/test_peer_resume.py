"""``swarmtrain peer --workload train`` (``python -m peer peer``, the char LM task of
``examples/charlm_task.py``) survives the loss of every peer: two peers train with ``--snapshot-every 1``,
both are SIGKILLed (the bootstrap peer is the coordinator too), then

- ``--bootstrap --resume`` from a corrupted copy of the snapshot is refused: the peer exits with an error
  naming the bad file, before it listens;
- ``--bootstrap --resume DIR`` starts a new swarm: its first committed revision is the snapshot's + 1, a
  fresh joiner catches up, and both end bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from peer.sim.procs import LocalProcs
from recovery.snapshot import list_snapshots, open_snapshot
from tests.helpers import FAST_ARGS, check_resumed, corrupt_copy

pytestmark = pytest.mark.timeout(240)  # 5 processes importing torch, one after the other

TASK = ["--workload", "train", "--task", "examples.charlm_task:task", "--task-arg", "data=synthetic",
        "--task-arg", "width=16", "--task-arg", "layers=1", "--task-arg", "block=16", "--task-arg", "batch=4",
        "--inner-steps", "3", "--op-timeout", "30", "--first-sync-timeout", "120", "--snapshot-every", "1",
        *FAST_ARGS]
READY = 120.0  # seconds to import torch and build the task on a loaded 2-core machine


def train_args(procs: LocalProcs, name: str, outer_steps: int, extra: list[str]) -> list[str]:
    return [*TASK, "--outer-steps", str(outer_steps), "--snapshot-dir", str(procs.workdir / f"snap-{name}"),
            *extra]


def test_peer_cli_trains_is_killed_and_resumes_from_its_snapshot(procs: LocalProcs) -> None:
    procs.peer("p0", [], train_args(procs, "p0", 1000, ["--bootstrap"]), record=False, ready_timeout=READY)
    procs.peer("p1", [procs.procs["p0"].hostport], train_args(procs, "p1", 1000, []), record=False,
               ready_timeout=READY)
    while True:  # train until revision 3 committed on the bootstrap peer and a snapshot of >= 2 is on disk
        e = procs.until("p0", "round", 120)
        written = list_snapshots(procs.workdir / "snap-p0")
        if e["committed"] and e["revision"] >= 3 and written and written[-1][0] >= 2:
            break
    procs.kill("p1")
    procs.kill("p0")  # SIGKILL: the whole swarm, coordinator included, is gone
    procs.drain("p0")  # the rounds it printed before it died
    snap = open_snapshot(procs.workdir / "snap-p0")
    snap.verify()
    assert snap.revision >= 2
    held = {e["revision"]: e["digest"] for e in procs.procs["p0"].lines if e.get("event") == "round"}

    # a corrupted snapshot is refused through the CLI, naming the file
    victim = corrupt_copy(snap.path, procs.workdir / "bad", snap.entries["outer/pos"].file)
    refused = procs.start("refused", "peer", ["peer", "--id", "refused", *procs.security_args("refused"),
                                              *train_args(procs, "refused", 1000, ["--bootstrap", "--resume",
                                                                                   str(victim.parent)])])
    assert refused.popen.wait(READY) == 2
    err = procs.log_tail("refused")
    assert "SnapshotCorrupt" in err and str(victim) in err, err

    # a new swarm from the snapshot root: the revision continues, a fresh joiner catches up, parity
    target = snap.revision + 2
    procs.peer("r0", [], train_args(procs, "r0", target, ["--bootstrap", "--resume", str(snap.path.parent)]),
               record=False, ready_timeout=READY)
    procs.peer("j1", [procs.procs["r0"].hostport], train_args(procs, "j1", target, []), record=False,
               ready_timeout=READY)
    procs.wait_done("r0", 150)
    procs.wait_done("j1", 150)
    check_resumed(procs.procs["r0"].lines, procs.procs["j1"].lines, held, snap.revision, target)
    assert open_snapshot(procs.workdir / "snap-r0").revision == target
