"""Surviving the loss of every peer, with real processes (``examples/multi_gpu_peer.py``, one local process
per machine): train with ``--snapshot-dir --snapshot-every 1``, SIGKILL every peer (the bootstrap peer is
the coordinator too), then

- ``--bootstrap --resume`` from a corrupted copy of the snapshot is refused: the peer exits with an error
  naming the bad file;
- ``--bootstrap --resume`` from the snapshot starts a new swarm: its first committed revision is the
  snapshot's + 1, a fresh joiner catches up, and both end bit-identical."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from recovery.snapshot import list_snapshots, open_snapshot
from tests.helpers import check_resumed, corrupt_copy
from tests.procs.test_local_group import BATCH, H, LR, MU, OUTER_LR, Machine, launch_machine

pytestmark = pytest.mark.timeout(300)  # 5 processes importing torch: ~25 s each on a loaded 2-core box


def args(tmp: Path, index: int, extra: list[str]) -> list[str]:
    return ["--model", "tiny", "--id", f"m-{index}", "--machine", str(index), "--key", str(tmp / f"m-{index}.key"),
            "--local-timeouts", "--group-timeout", "60", "--batch", str(BATCH), "--lr", str(LR),
            "--inner-steps", str(H), "--outer-lr", str(OUTER_LR), "--outer-momentum", str(MU),
            "--op-timeout", "30", "--events", "--snapshot-every", "1", "--snapshot-dir", str(tmp / f"snap{index}"),
            *extra]


def _newest_revision(root: Path) -> int:
    snaps = list_snapshots(root)
    return snaps[-1][0] if snaps else -1


def _kill_and_drain(m: Machine) -> None:
    """SIGKILL every rank, then keep the complete lines each printed before it died (a snapshot can be newer
    than the last event read: its round was printed right after the capture, before the write finished)."""
    for p in m.procs:
        if p.poll() is None:
            p.kill()
    for rank, p in enumerate(m.procs):
        p.wait(10)
        assert p.stdout is not None
        complete = p.stdout.read().split("\n")[:-1]  # the last piece has no newline: cut short, or empty
        m.lines[rank].extend(json.loads(line) for line in complete if line.strip())


def test_kill_every_peer_then_resume_the_swarm_from_snapshots(tmp_path: Path) -> None:
    first = launch_machine(tmp_path, "a", 1, args(tmp_path, 0, ["--bootstrap", "--outer-steps", "1000"]))
    try:
        addr = first.until(0, "listening", 120)["addr"].removeprefix("tcp://")
        second = launch_machine(tmp_path, "b", 1, args(tmp_path, 1, ["--join", addr, "--outer-steps", "1000"]))
        try:
            while True:  # train until revision 3 committed on the bootstrap peer
                e = first.until(0, "round", 120)
                if e["committed"] and e["revision"] >= 3:
                    break
            # snapshots are written in a thread: the kill below must find one of revision 2 or later
            # complete (training goes on meanwhile)
            deadline = time.monotonic() + 60
            while _newest_revision(tmp_path / "snap0") < 2:
                assert time.monotonic() < deadline, "no complete snapshot of revision >= 2 within 60 s"
                time.sleep(0.1)
        finally:
            second.close()  # SIGKILL
    finally:
        _kill_and_drain(first)  # the whole swarm, coordinator included, is gone
        first.close()
    snap = open_snapshot(tmp_path / "snap0")
    snap.verify()
    assert snap.revision >= 2
    held = {e["revision"]: e["digest"] for e in first.lines[0] if e.get("event") == "round" and e["committed"]}

    # a corrupted snapshot is refused, naming the file
    victim = corrupt_copy(snap.path, tmp_path / "bad", snap.entries["outer/0.weight"].file)
    refused = launch_machine(tmp_path, "refused", 1, args(tmp_path, 0, ["--bootstrap", "--resume",
                                                                        str(victim.parent), "--outer-steps", "1000"]))
    try:
        assert refused.procs[0].wait(120) != 0
        assert "SnapshotCorrupt" in refused.tail(0) and str(victim) in refused.tail(0)
    finally:
        refused.close()

    # a new swarm from the snapshot: the revision continues, a fresh joiner catches up, parity
    target = snap.revision + 2
    tmp2 = tmp_path / "second"
    tmp2.mkdir()
    for k in ("m-0.key", "m-1.key"):
        shutil.copy(tmp_path / k, tmp2 / k)
    resumed = launch_machine(tmp2, "a2", 1, args(tmp2, 0, ["--bootstrap", "--resume", str(tmp_path / "snap0"),
                                                           "--outer-steps", str(target)]))
    try:
        addr = resumed.until(0, "listening", 120)["addr"].removeprefix("tcp://")
        joiner = launch_machine(tmp2, "b2", 1, args(tmp2, 1, ["--join", addr, "--outer-steps", str(target)]))
        try:
            resumed.until(0, "done", 150)
            joiner.until(0, "done", 150)
        finally:
            joiner.close()
    finally:
        resumed.close()
    check_resumed(resumed.lines[0], joiner.lines[0], held, snap.revision, target)
    assert open_snapshot(tmp2 / "snap0").revision == target
