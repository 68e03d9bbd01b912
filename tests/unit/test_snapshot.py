"""Snapshots on disk: round trip, refusal of corrupt/truncated files naming the file, the manifest's checks,
pruning, regrouping into another layout (stage count, expert owners), merging peers' snapshots, the
revision check, and the background writer (copy at capture, newest wins, errors surface)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from recovery.snapshot import (MANIFEST, SnapshotConflict, SnapshotCorrupt, SnapshotNotFound, SnapshotStale,
                               TensorSpec, check_not_older, join_flat, list_snapshots, merge, open_newest,
                               open_snapshot, regroup, split_flat, write_snapshot)
from recovery.snapshot_writer import Snapshotter, SnapshotWriteFailed

pytestmark = pytest.mark.timeout(30)


def specs(seed: int = 0) -> list[TensorSpec]:
    rng = np.random.default_rng(seed)
    return [TensorSpec("outer", "l1.weight", rng.standard_normal((3, 4)).astype(np.float32)),
            TensorSpec("outer", "l1.bias", rng.standard_normal(3).astype(np.float32)),
            TensorSpec("momentum", "l1.weight", rng.standard_normal((3, 4)).astype(np.float32)),
            TensorSpec("other", "step", np.array([7], np.int64)),
            TensorSpec("other", "empty", np.zeros((0, 5), np.float16)),
            TensorSpec("other", "scalar", np.array(3.5, np.float32))]   # 0-d (Adam's step) stays 0-d


def test_round_trip_bytes_dtypes_shapes_and_meta(tmp_path: Path) -> None:
    written = specs()
    path = write_snapshot(tmp_path, 12, written, meta={"peer": "p0", "inner_steps": 3})
    assert path.name == "rev-000000000012"
    snap = open_snapshot(tmp_path)  # the root: its newest snapshot
    assert snap.revision == 12 and snap.meta == {"peer": "p0", "inner_steps": 3}
    for s in written:
        got = snap.load(s.name)
        assert got.dtype == s.array.dtype and got.shape == s.array.shape
        assert got.tobytes() == s.array.tobytes()
        got[...] = 0  # a writable copy, not a view of anything shared
    assert list(snap.arrays("outer")) == ["l1.weight", "l1.bias"]
    # the documented format: raw bytes whose sha256sum is the manifest's, readable with np.fromfile
    doc = json.loads((path / MANIFEST).read_text())
    for entry in doc["tensors"]:
        raw = (path / entry["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"] and len(raw) == entry["nbytes"]
        arr = np.fromfile(path / entry["file"], dtype=entry["dtype"]).reshape(entry["shape"])
        assert arr.tobytes() == snap.load(entry["name"]).tobytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_flipped_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 1, specs())
    f = path / "00002.bin"
    raw = bytearray(f.read_bytes())
    raw[5] ^= 0x01
    f.write_bytes(bytes(raw))
    snap = open_snapshot(path)
    assert snap.load("outer/l1.weight").size == 12  # other tensors still verify
    with pytest.raises(SnapshotCorrupt) as exc:
        snap.verify()
    assert exc.value.path == f and str(f) in str(exc.value) and "SHA-256" in str(exc.value)


@pytest.mark.parametrize("cut", [0, 3, 47])
def test_truncated_or_missing_file_is_refused(tmp_path: Path, cut: int) -> None:
    path = write_snapshot(tmp_path, 1, specs())
    f = path / "00000.bin"
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(SnapshotCorrupt, match="truncated") as exc:
        open_snapshot(path).verify()
    assert exc.value.path == f
    f.unlink()
    with pytest.raises(SnapshotCorrupt, match="cannot be read"):
        open_snapshot(path).load("outer/l1.weight")


def test_longer_file_is_refused(tmp_path: Path) -> None:
    path = write_snapshot(tmp_path, 1, specs())
    with open(path / "00001.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SnapshotCorrupt, match="longer"):
        open_snapshot(path).load("outer/l1.bias")


@pytest.mark.parametrize("edit", [
    lambda d: "{not json",
    lambda d: json.dumps({**d, "format": "other"}),
    lambda d: json.dumps({**d, "version": 99}),
    lambda d: json.dumps({**d, "revision": -1}),
    lambda d: json.dumps({**d, "tensors": [{**d["tensors"][0], "file": "../../etc/passwd"}]}),
    lambda d: json.dumps({**d, "tensors": [{**d["tensors"][0], "dtype": "object"}]}),
    lambda d: json.dumps({**d, "tensors": [{**d["tensors"][0], "nbytes": 1}]}),
    lambda d: json.dumps({**d, "tensors": [d["tensors"][0], d["tensors"][0]]}),
    lambda d: json.dumps({**d, "tensors": [{**d["tensors"][0], "shape": [3, True]}]}),
    lambda d: json.dumps({**d, "tensors": "x"}),
])
def test_malformed_manifest_is_refused_naming_it(tmp_path: Path, edit: object) -> None:
    path = write_snapshot(tmp_path, 1, specs())
    m = path / MANIFEST
    m.write_text(edit(json.loads(m.read_text())))  # type: ignore[operator]
    with pytest.raises(SnapshotCorrupt) as exc:
        open_snapshot(path)
    assert exc.value.path == m


def test_newest_complete_snapshot_wins_and_old_ones_are_pruned(tmp_path: Path) -> None:
    for rev in (2, 4, 6):
        write_snapshot(tmp_path, rev, specs(rev), keep=2)
    assert [r for r, _ in list_snapshots(tmp_path)] == [4, 6]
    (tmp_path / "rev-000000000009").mkdir()  # no manifest: an incomplete directory is not a snapshot
    dead = tmp_path / ".tmp-rev-000000000008-999999999-deadbeef"  # a dead writer's leftover
    dead.mkdir()
    assert open_snapshot(tmp_path).revision == 6
    write_snapshot(tmp_path, 6, specs(60), keep=2)  # the same revision again replaces it
    assert open_snapshot(tmp_path).load("outer/l1.bias").tobytes() == specs(60)[1].array.tobytes()
    assert not dead.exists()
    with pytest.raises(SnapshotNotFound):
        open_snapshot(tmp_path / "nothing-here")


def test_newest_among_several_peers_directories(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "a", 3, specs(3))
    write_snapshot(tmp_path / "b", 5, specs(5))
    (tmp_path / "empty").mkdir()   # a peer that never wrote: passed over
    assert open_newest([tmp_path / "a", tmp_path / "empty", tmp_path / "b"]).revision == 5
    assert open_newest(str(tmp_path / "a")).revision == 3
    with pytest.raises(SnapshotNotFound):
        open_newest([tmp_path / "empty"])
    (tmp_path / "b" / "rev-000000000005" / MANIFEST).write_text("{")
    with pytest.raises(SnapshotCorrupt):   # a corrupt candidate is refused, never skipped
        open_newest([tmp_path / "a", tmp_path / "b"])


def test_regroup_a_pipeline_snapshot_into_another_stage_count(tmp_path: Path) -> None:
    """4 stage owners each snapshot their own blocks (per parameter name); a 2-stage and a 3-stage layout
    load from the union; every tensor arrives with the bytes its owner wrote."""
    rng = np.random.default_rng(1)
    blocks = {f"blocks.{b}.{w}": rng.standard_normal((2, 3)).astype(np.float32)
              for b in range(8) for w in ("w1", "w2")}
    names = list(blocks)
    snaps = []
    for stage in range(4):
        mine = names[stage * 4:(stage + 1) * 4]
        snaps.append(open_snapshot(write_snapshot(
            tmp_path / f"stage{stage}", 30, [TensorSpec("stage", n, blocks[n], {"stage": stage}) for n in mine])))
    two = regroup(snaps, "stage", {"s0": names[:8], "s1": names[8:]})
    three = regroup(snaps, "stage", {"s0": names[:6], "s1": names[6:12], "s2": names[12:]})
    for layout in (two, three):
        got = {n: a for group in layout.values() for n, a in group.items()}
        assert sorted(got) == sorted(names)
        assert all(got[n].tobytes() == blocks[n].tobytes() for n in names)
    with pytest.raises(SnapshotNotFound, match="blocks.0.w1"):
        regroup(snaps[1:], "stage", {"s0": names[:8]})  # stage 0's owner wrote nothing: refused by name


def test_merge_refuses_mixed_revisions_and_conflicting_bytes(tmp_path: Path) -> None:
    a = open_snapshot(write_snapshot(tmp_path / "a", 5, specs(0)))
    b = open_snapshot(write_snapshot(tmp_path / "b", 6, specs(0)))
    c = open_snapshot(write_snapshot(tmp_path / "c", 5, specs(1)))
    same = open_snapshot(write_snapshot(tmp_path / "d", 5, specs(0)))
    assert len(merge([a, same])) == len(specs())
    with pytest.raises(SnapshotConflict, match="revisions"):
        merge([a, b])
    with pytest.raises(SnapshotConflict, match="different bytes"):
        merge([a, c])


def test_expert_owners_regroup(tmp_path: Path) -> None:
    experts = {f"moe.expert{e}.w": np.full((2, 2), e, np.float32) for e in range(6)}
    s0 = write_snapshot(tmp_path / "o0", 9, [TensorSpec("expert", n, a, {"expert": i})
                                             for i, (n, a) in enumerate(experts.items()) if i % 2 == 0])
    s1 = write_snapshot(tmp_path / "o1", 9, [TensorSpec("expert", n, a, {"expert": i})
                                             for i, (n, a) in enumerate(experts.items()) if i % 2 == 1])
    names = list(experts)
    owners = regroup([open_snapshot(s0), open_snapshot(s1)], "expert",
                     {"a": names[:2], "b": names[2:4], "c": names[4:]})  # 3 owners instead of 2
    assert {n: a[0, 0] for g in owners.values() for n, a in g.items()} == {n: i for i, n in enumerate(names)}


def test_flat_buffer_split_and_join() -> None:
    flat = np.arange(10, dtype=np.float32)
    named = split_flat(flat, ["a", "b"], [(2, 3), (4,)])
    assert named["a"].shape == (2, 3) and named["b"].tolist() == [6, 7, 8, 9]
    assert join_flat(named, ["a", "b"]).tobytes() == flat.tobytes()
    with pytest.raises(Exception, match="cover"):
        split_flat(flat, ["a"], [(3,)])
    with pytest.raises(SnapshotNotFound):
        join_flat(named, ["a", "c"])


def test_revision_check() -> None:
    check_not_older(5, 5)
    check_not_older(6, 5)
    with pytest.raises(SnapshotStale, match="older"):
        check_not_older(4, 5)


def test_snapshotter_copies_at_capture_and_writes_in_the_background(tmp_path: Path) -> None:
    theta = np.arange(8, dtype=np.float32)
    snaps = Snapshotter(tmp_path, every=2, keep=3, meta={"peer": "p0"})
    try:
        assert not snaps.capture(1, [TensorSpec("outer", "w", theta)])  # not due: 1 % 2
        assert snaps.capture(2, [TensorSpec("outer", "w", theta)])
        theta += 100  # training goes on right away: the snapshot keeps the bytes of the capture
        assert not snaps.capture(2, [TensorSpec("outer", "w", theta)])  # already taken
        assert snaps.capture(4, [TensorSpec("outer", "w", theta)])
        snaps.flush(20)
    finally:
        snaps.close(20)
    assert snaps.written[-1] == 4 and snaps.written[0] in (2, 4) and snaps.skipped == 2 - len(snaps.written)
    assert open_snapshot(tmp_path).load("outer/w").tolist() == list(range(100, 108))
    if 2 in snaps.written:
        assert open_snapshot(tmp_path / "rev-000000000002").load("outer/w").tolist() == list(range(8))


def test_snapshotter_write_failure_is_raised_not_swallowed(tmp_path: Path) -> None:
    root = tmp_path / "snaps"
    snaps = Snapshotter(root)
    try:
        root.rmdir()
        root.write_text("a file where the snapshot directory should be")  # every write now fails
        snaps.capture(1, [TensorSpec("outer", "w", np.zeros(3, np.float32))])
        with pytest.raises(SnapshotWriteFailed, match="snaps"):
            snaps.flush(20)
        snaps.flush(20)  # raised once, then clear
    finally:
        snaps.close(20)
