"""Keep freed frame buffers in the process instead of returning them to the kernel (glibc only).

Every received frame is a fresh allocation: libzmq's I/O thread mallocs each large message and reads the
socket straight into it, and the secure path's sealed and opened frames are fresh numpy arrays. A 4 MiB
allocation is above glibc's initial mmap threshold (128 KiB), and glibc hands freed memory back to the kernel
once more than its trim threshold sits free at the top of a heap. So with the defaults a 64 MiB all-reduce
maps, page-faults in (zero-filling every 4 KiB page) and unmaps most of its receive buffers on every op:
measured here, that alone cost about a third of a 64 MiB op on loopback (docs/performance.md, "What
changed", item 4).

``retain_freed_buffers`` raises both thresholds once per process (``mallopt``): allocations up to
``MMAP_THRESHOLD`` come from malloc's heaps, and up to ``retain_bytes`` of freed memory stays mapped for the
next op's frames. The cost is resident memory that is not given back between ops (at most ``retain_bytes``
per malloc arena beyond what is live), and every other allocation of the process up to 32 MiB (a torch
tensor, say) follows the same rule, which is what glibc's own dynamic threshold converges to anyway.
``Limits.retain_freed_bytes = 0`` leaves malloc alone. Not glibc (macOS, musl): nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit (HEAP_MAX_SIZE / 2)

_lock = threading.Lock()
_applied = 0  # the largest retain_bytes applied in this process (0: none)


def _libc() -> Optional[Any]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def retain_freed_buffers(retain_bytes: int) -> bool:
    """Let up to ``retain_bytes`` of freed memory stay in the process (and allocations up to 32 MiB come
    from malloc's heaps). Process-wide, idempotent, only ever raised; True when glibc took the settings."""
    global _applied
    if retain_bytes <= 0:
        return False
    with _lock:
        if _applied >= retain_bytes:
            return True
        libc = _libc()
        if libc is None:
            return False
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        trim = min(retain_bytes, 2**31 - 1)
        # the trim threshold first: setting either one turns off glibc's dynamic thresholds
        if not (libc.mallopt(M_TRIM_THRESHOLD, trim) and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)):
            log.warning("mallopt refused the frame-buffer settings; freed frames go back to the kernel")
            return False
        _applied = retain_bytes
        return True


__all__ = ["retain_freed_buffers", "MMAP_THRESHOLD"]
