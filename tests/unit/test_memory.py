"""collectives.memory: freed frame buffers stay in the process, so the next op's frames do not page-fault."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

# A long-lived thread allocates sixteen 4 MiB frames (as libzmq's I/O thread does for received messages),
# the main thread touches and frees them (as the ring does when an op ends). glibc's mallinfo2 says how much
# of it was mmapped (given back to the kernel on free, zero-filled page by page on the next allocation) and
# how much stays free inside malloc's heaps for the next op.
_PROBE = r"""
import ctypes, json, queue, sys, threading
import numpy as np
from collectives import memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = memory.retain_freed_buffers(int(sys.argv[1]))
asks, frames = queue.Queue(), queue.Queue()
def io_thread():
    while asks.get(timeout=30):
        frames.put([np.empty(4 << 20, np.uint8) for _ in range(16)])
threading.Thread(target=io_thread, daemon=True).start()
asks.put(True)
got = frames.get(timeout=30)
for f in got: f.fill(1)
mapped = libc.mallinfo2().hblkhd
del got
kept = libc.mallinfo2().fordblks
asks.put(False)
print(json.dumps({"applied": applied, "mmapped_while_live": mapped, "free_kept_after": kept}))
"""


def _probe(retain: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(retain)], capture_output=True, text=True,
                         timeout=50, check=True)
    res: dict[str, Any] = json.loads(out.stdout)
    return res


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc tuning is glibc only")
def test_frames_come_from_the_heap_and_stay_after_free() -> None:
    res = _probe(256 << 20)
    assert res["applied"] is True
    assert res["mmapped_while_live"] < 4 << 20, res   # no frame was its own mmap
    assert res["free_kept_after"] >= 48 << 20, res    # freed frames stay mapped for the next op


def test_zero_leaves_malloc_alone() -> None:
    from collectives import memory

    assert memory.retain_freed_buffers(0) is False
