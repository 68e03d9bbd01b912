"""Atomicity of snapshots against a real crash: a writer process is SIGKILLed in the middle of writing
revision 2 (after a tensor file, or after the manifest but before the rename); revision 1 stays the newest
snapshot and verifies, the partial write is ignored, and the next writer removes it."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from recovery.snapshot import TensorSpec, open_snapshot, write_snapshot

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from recovery.snapshot import TensorSpec, write_snapshot
    root, stop_at = sys.argv[1], sys.argv[2]
    def specs(rev):
        return [TensorSpec("outer", f"w{i}", np.full(1000, rev * 10 + i, np.float32)) for i in range(4)]
    write_snapshot(root, 1, specs(1))
    print("wrote 1", flush=True)
    def hold(path):
        if path.name == stop_at:
            print("holding " + str(path), flush=True)
            sys.stdin.readline()   # blocks until the test kills this process
    write_snapshot(root, 2, specs(2), on_file=hold)
    print("wrote 2", flush=True)
""")


def read_line(p: subprocess.Popen[str], timeout: float) -> str:
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"writer printed nothing within {timeout}s")
        return p.stdout.readline().strip()
    finally:
        sel.close()


@pytest.mark.parametrize("stop_at", ["00001.bin", "manifest.json"])
def test_a_writer_killed_mid_write_leaves_the_previous_snapshot(tmp_path: Path, stop_at: str) -> None:
    root = tmp_path / "snaps"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(root), stop_at], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env, cwd=str(tmp_path))
    try:
        assert read_line(p, 30) == "wrote 1"
        assert read_line(p, 30).startswith("holding ")  # revision 2 is half on disk right now
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    leftovers = [d for d in root.iterdir() if d.name.startswith(".tmp-rev-000000000002")]
    assert len(leftovers) == 1 and (leftovers[0] / stop_at).exists()
    snap = open_snapshot(root)
    assert snap.revision == 1
    snap.verify()
    assert snap.load("outer/w3").tolist() == [13.0] * 1000
    # the next writer (another process: the dead one's pid is gone) cleans up the partial write
    write_snapshot(root, 3, [TensorSpec("outer", "w0", np.zeros(2, np.float32))])
    assert not [d for d in root.iterdir() if d.name.startswith(".")]
    assert open_snapshot(root).revision == 3
