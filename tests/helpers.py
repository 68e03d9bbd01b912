"""Shared fixtures: fast timeouts, in-process swarms and local peer processes that are always cleaned up.

Everything runs secure (CURVE, as in production): the session has one swarm secret, exported as
$SWARMTRAIN_SECRET (with a default key file in $SWARMTRAIN_KEY) so that any PeerConfig a test builds is
secure; ``InProcess`` gives each peer id its own key file; ``LocalProcs`` makes its own secret and keys.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from collectives import keys
from peer import PeerConfig, Swarm, Timeouts
from peer.config import KEY_ENV, SECRET_ENV, SecurityConfig
from peer.sim.procs import LocalProcs

# Short timeouts so failure tests finish quickly (defaults are sized for the internet).
# Heartbeat deadlines stay well above scheduling hiccups of a loaded 2-core machine.
FAST = Timeouts.local()
FAST_ARGS = FAST.cli_args()
HB_TIMEOUT = FAST.heartbeat_timeout


@pytest.fixture(scope="session", autouse=True)
def swarm_secret(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's swarm secret (exported, so that every peer a test builds is secure by default)."""
    d = tmp_path_factory.mktemp("swarm-keys")
    secret = d / "swarm.secret"
    keys.save_secret(secret, keys.new_secret())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(SECRET_ENV, str(secret))
        mp.setenv(KEY_ENV, str(d / "default.key"))
        yield secret


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[LocalProcs]:
    lp = LocalProcs(tmp_path)
    try:
        yield lp
    finally:
        lp.close()


class InProcess:
    """Several peers in this process (each with its own I/O thread and real loopback sockets)."""

    def __init__(self, keydir: Optional[Path] = None) -> None:
        self.swarms: list[Swarm] = []
        self.keydir = keydir or Path(tempfile.mkdtemp(prefix="swarmtrain-keys-"))

    def security(self, peer_id: str) -> SecurityConfig:
        """Secure, with the session secret and a key file of this peer id's own (kept across restarts)."""
        return SecurityConfig(key_file=str(self.keydir / f"{peer_id}.key"))

    def coordinator(self, **kw: Any) -> Swarm:
        peer_id = kw.pop("peer_id", "coord")
        kw.setdefault("security", self.security(peer_id))
        s = Swarm(PeerConfig(peer_id=peer_id, coordinator=True, member=False,
                             timeouts=kw.pop("timeouts", FAST), **kw))
        self.swarms.append(s)
        return s

    def peer(self, peer_id: str, join: list[str], **kw: Any) -> Swarm:
        kw.setdefault("security", self.security(peer_id))
        s = Swarm(PeerConfig(peer_id=peer_id, join=tuple(join), timeouts=kw.pop("timeouts", FAST), **kw))
        self.swarms.append(s)
        return s

    def crash(self, s: Swarm) -> None:
        """Like SIGKILL for an in-process peer: sockets close, no goodbye."""
        s.node._stop.set()
        s.node._thread.join(5)
        s.node.transport.close()

    def close(self) -> None:
        for s in self.swarms:
            if s.node._thread.is_alive():
                s.node.close()
            elif not s.node.transport.closed:
                s.node.transport.close()


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[InProcess]:
    ip = InProcess(tmp_path / "keys")
    try:
        yield ip
    finally:
        ip.close()


def run_all(fns: list[Callable[[], Any]], timeout: float = 60.0) -> list[Any]:
    """Run callables in threads; return results (or raised exceptions) in order."""
    results: list[Any] = [None] * len(fns)

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except Exception as exc:  # returned to the test, which asserts on it
            results[i] = exc

    threads = [threading.Thread(target=wrap, args=(i, f), daemon=True) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a collective did not return in time"
    return results


def form_swarm(inproc: InProcess, n: int, **kw: Any) -> tuple[Swarm, list[Swarm]]:
    """A standalone coordinator and ``n`` peers p0.. all admitted (in-process, secure by default)."""
    coord = inproc.coordinator(**kw)
    entry = coord.addr.removeprefix("tcp://")
    peers = [inproc.peer(f"p{i}", [entry], **kw) for i in range(n)]
    deadline = time.monotonic() + 20
    while any(len(p.members) < n or p.state != "member" for p in peers):
        assert time.monotonic() < deadline, [p.state for p in peers]
        members = [p for p in peers if p.state == "member"]
        core = coord.node.coord
        # Vote only once every member of the coordinator's epoch knows it is one: a vote without a member
        # whose EpochUpdate is still in flight waits for that member's vote (update_topology's deadline).
        if len(members) >= 2 and core is not None and core.pending and \
                set(list(core.members)) <= {p.id for p in members}:
            run_all([p.update_topology for p in members])
        else:
            time.sleep(0.05)
    return coord, peers


# ---------------------------------------------------------------------------------------------- snapshots

def corrupt_copy(snapshot_dir: Path, dest: Path, entry_file: str) -> Path:
    """A copy of a snapshot directory with the first byte of one tensor file flipped; returns that file."""
    shutil.copytree(snapshot_dir, dest)
    victim = dest / entry_file
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return victim


def check_resumed(resumed: list[dict[str, Any]], joiner: list[dict[str, Any]], held: dict[int, str],
                  revision: int, target: int) -> None:
    """The JSON events of a peer resumed from a snapshot of ``revision`` (its revision -> digest before
    the loss of the swarm: ``held``) and of a fresh joiner, both run until ``target``: the snapshot became
    the swarm's state bit for bit, the revision continued, the joiner caught up, both end bit-identical."""
    rounds = [e for e in resumed if e.get("event") == "round"]
    assert rounds[0]["kind"] == "entry" and not rounds[0]["adopted"]   # the snapshot became the swarm's state
    assert rounds[0]["digest"] == held[revision]                        # bit for bit what the swarm held
    committed = [e["revision"] for e in rounds if e["committed"] and e["kind"] != "entry"]
    assert committed == list(range(revision + 1, target + 1))           # the revision continues
    assert next(e for e in joiner if e.get("event") == "round")["adopted"]
    done = [next(e for e in lines if e.get("event") == "done") for lines in (resumed, joiner)]
    assert done[0]["revision"] == done[1]["revision"] == target and done[0]["digest"] == done[1]["digest"]
