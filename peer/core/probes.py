"""Bandwidth probes: a small burst to every new member; the receiver reports the rate it saw.

The coordinator collects the reports and reorders the ring at a topology vote when that makes the
slowest link faster (``collectives.topology``). Pure bookkeeping: the node does the sending.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from collectives import wire

PROBE_PARTS, PROBE_PART_BYTES = 8, 64 * 1024  # a 512 KiB probe to every new member


class Probes:
    def __init__(self, send: Callable[[str, wire.Message, Any], None], clock: Callable[[], float]) -> None:
        self._send = send
        self._clock = clock  # a fine-grained clock from the driver (perf_counter)
        self.probed: set[str] = set()
        self._rx: dict[str, tuple[float, int, int]] = {}  # sender -> (first arrival, bytes after it, parts)
        self._filler = bytes(PROBE_PART_BYTES)

    def probe_new(self, me: str, epoch: int, members: Iterable[str]) -> None:
        for m in members:
            if m != me and m not in self.probed:
                self.probed.add(m)
                for part in range(PROBE_PARTS):
                    self._send(m, wire.BwProbe(epoch, part, PROBE_PARTS), self._filler)

    def on_probe(self, sender: str, msg: wire.BwProbe, payload: Any) -> Optional[float]:
        """Returns the measured bytes/s once the last part of a probe from ``sender`` has arrived."""
        t = self._clock()
        first, nbytes, seen = self._rx.get(sender, (t, 0, 0))
        if seen:
            nbytes += len(payload)  # bytes after the first part, over the time since the first part
        seen += 1
        if seen < msg.parts:
            self._rx[sender] = (first, nbytes, seen)
            return None
        self._rx.pop(sender, None)
        if t > first and nbytes:
            return min(nbytes / (t - first), 9e12)
        return None
