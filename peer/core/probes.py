"""Bandwidth probes: a small burst to every new member; the receiver reports the rate it saw.

The coordinator collects the reports and reorders the ring at a topology vote when that makes the
slowest link faster (``collectives.topology``). Pure bookkeeping: the node does the sending.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from collectives import wire

PROBE_PARTS, PROBE_PART_BYTES = 8, 64 * 1024  # a 512 KiB probe to every new member
# Probes go out when an epoch adds members, and are timed by their arrival here: the node does not hold
# sealed-data reads (``peer.node``) while a probe is arriving, nor, for this long after an epoch change,
# while a member's probe has not arrived yet (one that never probes us: the wait ends here).
PROBE_GRACE_S = 2.0


class Probes:
    def __init__(self, send: Callable[[str, wire.Message, Any], None], clock: Callable[[], float]) -> None:
        self._send = send
        self._clock = clock  # a fine-grained clock from the driver (perf_counter)
        self.probed: set[str] = set()
        self._rx: dict[str, tuple[float, int, int]] = {}  # sender -> (first arrival, bytes after it, parts)
        self.heard: set[str] = set()  # senders whose probe reached us whole
        self._filler = bytes(PROBE_PART_BYTES)

    def probe_new(self, me: str, epoch: int, members: Iterable[str]) -> None:
        for m in members:
            if m != me and m not in self.probed:
                self.probed.add(m)
                for part in range(PROBE_PARTS):
                    self._send(m, wire.BwProbe(epoch, part, PROBE_PARTS), self._filler)

    @property
    def receiving(self) -> bool:
        """A probe is partly here (its timing would be wrong if the rest waited in the socket)."""
        return bool(self._rx)

    def awaiting(self, me: str, members: Iterable[str]) -> bool:
        """Some member's probe has not reached us whole yet (each member probes a new one once)."""
        return any(m != me and m not in self.heard for m in members)

    def keep_heard(self, members: Iterable[str]) -> None:
        """Forget the probes of peers that left the epoch: one that comes back as a new process probes us
        again."""
        self.heard &= set(members)

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
        self.heard.add(sender)
        if t > first and nbytes:
            return min(nbytes / (t - first), 9e12)
        return None
