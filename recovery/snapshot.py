"""Snapshots of the swarm's shared state that survive the loss of every peer.

Checkpoint-free recovery (``recovery.shared_state``) covers peers coming and going; a snapshot covers the
whole swarm going down at once. Ideas taken from the seed papers: copy the bytes at a sync point and write
them in a background thread (DataStates-LLM, ByteCheckpoint), and store every tensor under its parameter
name so a snapshot can be loaded into another layout — another number of pipeline stages or expert owners
(Universal Checkpointing).

On disk (``docs/snapshots.md`` is the reference)::

    ROOT/rev-000000000012/manifest.json     written last; lists every tensor
    ROOT/rev-000000000012/00000.bin ...      one file per tensor: raw bytes, C order, little-endian
    ROOT/.tmp-...                            a write in progress (ignored by loaders, removed by writers)

A tensor file holds exactly ``prod(shape) * itemsize`` bytes, so ``sha256sum 00000.bin`` equals the
manifest's ``sha256`` and ``np.fromfile(path, dtype).reshape(shape)`` reads it. No Python object
serialisation is used: plain arrays and JSON only.

Atomicity: files go to a temporary directory, each is fsynced, the manifest last, the directory is fsynced,
renamed to ``rev-N`` and the root fsynced. A crash at any point leaves every earlier snapshot intact and at
worst a ``.tmp-`` directory that loaders skip. A loader verifies sizes and hashes of every tensor it reads
and refuses a corrupt or truncated snapshot with ``SnapshotCorrupt`` naming the file.

The background writer is ``recovery.snapshot_writer.Snapshotter``. Pure numpy and stdlib: this module
does not import ``peer``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from collectives.errors import DeadlineExceeded, LocalError, SwarmError

log = logging.getLogger(__name__)

FORMAT, VERSION = "swarmtrain-snapshot", 1
MANIFEST = "manifest.json"
KINDS = ("outer", "momentum", "stage", "expert", "other")
DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
          "uint64", "bool")
MAX_MANIFEST_BYTES = 64 << 20
_DIR_RE = re.compile(r"^rev-(\d{12})$")
_FILE_RE = re.compile(r"^\d{5}\.bin$")
MetaValue = Union[str, int, float, bool]
PathLike = Union[str, "os.PathLike[str]"]


class SnapshotError(SwarmError):
    """Base of the snapshot errors."""


class SnapshotCorrupt(SnapshotError):
    """A snapshot file is missing, truncated, malformed or fails its hash. ``path``: the file."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"snapshot file {path}: {why}; refusing this snapshot")
        self.path = path
        self.why = why


class SnapshotNotFound(SnapshotError):
    """No complete snapshot under the given directory."""


class SnapshotStale(SnapshotError):
    """The snapshot is older than the live swarm's state, which it must never override."""


class SnapshotConflict(SnapshotError):
    """Snapshots being merged disagree (different revisions, or one tensor name with different bytes)."""


# ============================================================================ the format

@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a snapshot. ``name`` is unique in a snapshot: ``"<kind>/<param>"`` by convention."""
    name: str
    kind: str                      # outer | momentum | stage | expert | other
    param: str                     # the parameter name (model.named_parameters()), the layout-free key
    file: str                      # "00000.bin", inside the snapshot directory
    dtype: str
    shape: tuple[int, ...]
    sha256: str                    # hex SHA-256 of the file's bytes (== the array's C-order bytes)
    meta: dict[str, MetaValue] = field(default_factory=dict)   # e.g. {"stage": 2} or {"expert": 5}

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "param": self.param, "file": self.file,
                "dtype": self.dtype, "shape": list(self.shape), "nbytes": self.nbytes, "sha256": self.sha256,
                "meta": dict(self.meta)}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: its array plus what it is (``meta`` becomes the entry's meta)."""
    kind: str
    param: str
    array: np.ndarray
    meta: Mapping[str, MetaValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.param}"


class Snapshot:
    """A complete snapshot on disk: manifest read and validated; tensors read (and verified) on demand."""

    def __init__(self, path: Path, revision: int, entries: Sequence[TensorEntry],
                 meta: Mapping[str, MetaValue], created: float) -> None:
        self.path = path
        self.revision = revision
        self.entries = {e.name: e for e in entries}
        self.meta = dict(meta)
        self.created = created

    def __repr__(self) -> str:
        return f"Snapshot({str(self.path)!r}, revision={self.revision}, tensors={len(self.entries)})"

    def names(self, kind: Optional[str] = None) -> list[str]:
        return [n for n, e in self.entries.items() if kind is None or e.kind == kind]

    def load(self, name: str) -> np.ndarray:
        """The tensor's array (a fresh, writable copy), after checking its size and SHA-256."""
        if name not in self.entries:
            raise LocalError(f"{self.path}: no tensor {name!r}")
        return read_tensor(self.path, self.entries[name])

    def arrays(self, kind: str) -> dict[str, np.ndarray]:
        """``param -> array`` for every tensor of ``kind``, in manifest order."""
        return {e.param: self.load(n) for n, e in self.entries.items() if e.kind == kind}

    def verify(self) -> None:
        """Read and hash every tensor (raises ``SnapshotCorrupt`` naming the first bad file)."""
        for name in self.entries:
            self.load(name)


def read_tensor(directory: Path, entry: TensorEntry) -> np.ndarray:
    path = directory / entry.file
    try:
        with open(path, "rb") as f:
            data = f.read(entry.nbytes + 1)
    except OSError as exc:
        raise SnapshotCorrupt(path, f"cannot be read ({exc.strerror or exc})") from exc
    if len(data) < entry.nbytes:
        raise SnapshotCorrupt(path, f"truncated: {len(data)} bytes, the manifest says {entry.nbytes} "
                                    f"({entry.name})")
    if len(data) > entry.nbytes:
        raise SnapshotCorrupt(path, f"longer than the manifest's {entry.nbytes} bytes ({entry.name})")
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise SnapshotCorrupt(path, f"SHA-256 mismatch for {entry.name}")
    return np.frombuffer(bytearray(data), dtype=np.dtype(entry.dtype).newbyteorder("<")).astype(
        entry.dtype, copy=False).reshape(entry.shape)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_spec(spec: TensorSpec) -> np.ndarray:
    if spec.kind not in KINDS:
        raise LocalError(f"snapshot tensor kind must be one of {KINDS}, not {spec.kind!r}")
    if not spec.param:
        raise LocalError("snapshot tensor needs a parameter name")
    arr = np.asarray(spec.array)
    if arr.dtype.name not in DTYPES:
        raise LocalError(f"{spec.name}: dtype {arr.dtype} cannot be snapshotted (one of {DTYPES})")
    for v in spec.meta.values():
        if not isinstance(v, (str, int, float, bool)):
            raise LocalError(f"{spec.name}: meta values must be str, int, float or bool")
    out = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return out if out.flags.c_contiguous else np.ascontiguousarray(out)   # (ascontiguousarray makes 0-d 1-d)


def write_snapshot(root: PathLike, revision: int, specs: Sequence[TensorSpec],
                   meta: Optional[Mapping[str, MetaValue]] = None, keep: int = 2,
                   on_file: Optional[Callable[[Path], None]] = None) -> Path:
    """Write one snapshot atomically; return its directory. Blocking (``Snapshotter`` runs it in a thread).
    ``keep``: complete snapshots kept in ``root`` (older ones removed after the new one is in place).
    ``on_file``: called after each file is durable (progress; the crash tests stop a writer there)."""
    if revision < 0:
        raise LocalError("revision must be >= 0")
    if keep < 1:
        raise LocalError("keep must be at least 1")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise LocalError("snapshot tensor names must be unique")
    rootp = Path(root)
    rootp.mkdir(parents=True, exist_ok=True)
    tmp = rootp / f".tmp-rev-{revision:012d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    entries = []
    done = False
    try:
        for i, spec in enumerate(specs):
            arr = check_spec(spec)
            fname = f"{i:05d}.bin"
            data = arr.reshape(-1).view(np.uint8).data  # (nbytes,) raw bytes, C order
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            entries.append(TensorEntry(spec.name, spec.kind, spec.param, fname, arr.dtype.name,
                                       tuple(int(d) for d in arr.shape), hashlib.sha256(data).hexdigest(),
                                       dict(spec.meta)))
            if on_file is not None:
                on_file(tmp / fname)
        manifest = {"format": FORMAT, "version": VERSION, "revision": revision, "created": time.time(),
                    "meta": dict(meta or {}), "tensors": [e.to_json() for e in entries]}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if on_file is not None:
            on_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        final = rootp / f"rev-{revision:012d}"
        old = None
        if final.exists():  # the same revision again (e.g. after a resume): replace it
            old = rootp / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(rootp)
        done = True
    finally:
        if not done:  # an error mid-write: the partial copy goes; earlier snapshots are untouched
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    prune(rootp, keep)
    return final


def list_snapshots(root: PathLike) -> list[tuple[int, Path]]:
    """(revision, directory) of every completed snapshot in ``root`` (manifest present), oldest first."""
    rootp = Path(root)
    if not rootp.is_dir():
        return []
    found = []
    for p in rootp.iterdir():
        m = _DIR_RE.match(p.name)
        if m and (p / MANIFEST).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(root: PathLike, keep: int) -> None:
    """Remove all but the newest ``keep`` snapshots, and leftovers of interrupted writes by dead writers."""
    rootp = Path(root)
    for _, p in list_snapshots(rootp)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in rootp.iterdir():
        if p.name.startswith(".old-") or (p.name.startswith(".tmp-") and not _own_live_tmp(p)):
            shutil.rmtree(p, ignore_errors=True)


def _own_live_tmp(p: Path) -> bool:
    """A ``.tmp-`` directory of a writer process that is still alive (never remove its work)."""
    parts = p.name.split("-")
    try:
        pid = int(parts[3])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def open_snapshot(path: PathLike) -> Snapshot:
    """A snapshot directory (``rev-N``), or a root: its newest complete snapshot. Validates the manifest;
    tensors are verified as they are read (``Snapshot.verify`` reads all of them now)."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        snaps = list_snapshots(p)
        if not snaps:
            raise SnapshotNotFound(f"no complete snapshot in {p}")
        p = snaps[-1][1]
    return _read_manifest(p)


def open_newest(paths: Union[PathLike, Sequence[PathLike]]) -> Snapshot:
    """The snapshot of the highest revision among several paths (each a ``rev-N`` directory or a root),
    e.g. every surviving DiLoCo peer's snapshot directory: they hold the same shared state at a revision,
    so the newest one is the swarm's. A root without any complete snapshot yet is passed over; every
    candidate's manifest is validated (a corrupt one is refused, never skipped); on equal revisions the
    first path wins."""
    many = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found = []
    for p in many:
        try:
            found.append(open_snapshot(p))
        except SnapshotNotFound:
            if len(many) == 1:
                raise
    if not found:
        raise SnapshotNotFound(f"no complete snapshot in any of {[str(p) for p in many]}")
    return max(found, key=lambda s: s.revision)   # max keeps the first of equal keys


def _read_manifest(directory: Path) -> Snapshot:
    mpath = directory / MANIFEST
    try:
        with open(mpath, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise SnapshotCorrupt(mpath, f"cannot be read ({exc.strerror or exc})") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotCorrupt(mpath, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotCorrupt(mpath, f"not valid JSON ({exc})") from exc
    try:
        return _parse_manifest(directory, doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotCorrupt(mpath, f"malformed manifest ({type(exc).__name__}: {exc})") from exc


def _parse_manifest(directory: Path, doc: Any) -> Snapshot:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} manifest")
    if doc.get("version") != VERSION:
        raise ValueError(f"version {doc.get('version')!r}, this reader knows {VERSION}")
    revision = _int(doc["revision"], "revision")
    entries, files = [], set()
    for t in _list(doc["tensors"], "tensors"):
        if not isinstance(t, dict):
            raise TypeError("tensor entry must be an object")
        kind, dtype, fname = _str(t["kind"]), _str(t["dtype"]), _str(t["file"])
        if kind not in KINDS or dtype not in DTYPES:
            raise ValueError(f"unknown kind {kind!r} or dtype {dtype!r}")
        if not _FILE_RE.match(fname) or fname in files:
            raise ValueError(f"bad or repeated file name {fname!r}")
        files.add(fname)
        shape = tuple(_int(d, "shape") for d in _list(t["shape"], "shape"))
        sha = _str(t["sha256"])
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"bad sha256 {sha!r}")
        meta = t.get("meta", {})
        if not isinstance(meta, dict) or not all(isinstance(v, (str, int, float, bool)) for v in meta.values()):
            raise TypeError("meta must map names to str, int, float or bool")
        entry = TensorEntry(_str(t["name"]), kind, _str(t["param"]), fname, dtype, shape, sha, meta)
        if _int(t["nbytes"], "nbytes") != entry.nbytes:
            raise ValueError(f"{entry.name}: nbytes disagrees with dtype and shape")
        entries.append(entry)
    if len({e.name for e in entries}) != len(entries):
        raise ValueError("repeated tensor name")
    meta = doc.get("meta", {})
    if not isinstance(meta, dict):
        raise TypeError("meta must be an object")
    created = doc.get("created", 0.0)
    return Snapshot(directory, revision, entries, meta, float(created) if isinstance(created, (int, float)) else 0.0)


def _int(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise TypeError("expected a non-empty string")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError(f"{what} must be a list")
    return v


# ============================================================================ layouts

def merge(snapshots: Sequence[Snapshot]) -> dict[str, tuple[Snapshot, TensorEntry]]:
    """One view over several peers' snapshots of the same revision (e.g. each pipeline stage owner wrote
    its own stage): ``name -> (snapshot holding it, entry)``. A name held twice must have the same hash."""
    if not snapshots:
        raise LocalError("nothing to merge")
    revs = {s.revision for s in snapshots}
    if len(revs) != 1:
        raise SnapshotConflict(f"snapshots of different revisions {sorted(revs)}: "
                               f"{[str(s.path) for s in snapshots]}")
    out: dict[str, tuple[Snapshot, TensorEntry]] = {}
    for s in snapshots:
        for name, e in s.entries.items():
            if name in out and out[name][1].sha256 != e.sha256:
                raise SnapshotConflict(f"{name}: {out[name][0].path} and {s.path} hold different bytes")
            out.setdefault(name, (s, e))
    return out


def regroup(snapshots: Sequence[Snapshot], kind: str, groups: Mapping[str, Sequence[str]]
            ) -> dict[str, dict[str, np.ndarray]]:
    """Load ``kind`` tensors into a new layout: ``groups`` maps a new owner (a stage, an expert owner) to
    the parameter names it holds. Every named parameter must be present (verified on read)."""
    held = {e.param: (s, e) for s, e in merge(snapshots).values() if e.kind == kind}
    out: dict[str, dict[str, np.ndarray]] = {}
    for group, params in groups.items():
        missing = [p for p in params if p not in held]
        if missing:
            raise SnapshotNotFound(f"{kind} tensors {missing} are in none of {[str(s.path) for s in snapshots]}")
        out[group] = {p: read_tensor(held[p][0].path, held[p][1]) for p in params}
    return out


def split_flat(flat: np.ndarray, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Views of a flat buffer (DiLoCo's outer weights: parameters concatenated in order) by parameter."""
    out, off = {}, 0
    for n, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        out[n] = flat[off:off + size].reshape(tuple(shape))
        off += size
    if off != flat.size:
        raise LocalError(f"parameters cover {off} elements, the flat buffer has {flat.size}")
    return out


def join_flat(named: Mapping[str, np.ndarray], names: Sequence[str], dtype: str = "float32") -> np.ndarray:
    """The flat buffer again: ``named[n]`` for ``n`` in ``names``, concatenated (a copy)."""
    missing = [n for n in names if n not in named]
    if missing:
        raise SnapshotNotFound(f"the snapshot lacks parameters {missing}")
    if not names:
        return np.zeros(0, dtype)
    return np.concatenate([np.asarray(named[n], dtype).reshape(-1) for n in names])


def check_not_older(snapshot_revision: int, live_revision: int) -> None:
    """Refuse to let a snapshot override a live state of a later revision."""
    if snapshot_revision < live_revision:
        raise SnapshotStale(f"snapshot revision {snapshot_revision} is older than the live state's "
                            f"revision {live_revision}; it must not override it")
