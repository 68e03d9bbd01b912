"""Bandwidth probes' bookkeeping (``peer.core.probes``): what the node needs to know before it holds its
sealed-data reads (the probes are timed by their arrival)."""

from __future__ import annotations

from typing import Any

import pytest

from collectives import wire
from peer.core.probes import PROBE_PARTS, Probes

pytestmark = pytest.mark.timeout(30)


def test_a_probe_is_awaited_until_it_is_in_whole_and_forgotten_when_its_sender_leaves() -> None:
    clock = iter(range(100))
    sent: list[tuple[str, Any]] = []
    p = Probes(lambda to, msg, payload: sent.append((to, msg)), lambda: float(next(clock)))
    assert p.awaiting("me", ["me", "a", "b"]) and not p.receiving
    rate = None
    for part in range(PROBE_PARTS):
        rate = p.on_probe("a", wire.BwProbe(1, part, PROBE_PARTS), bytes(1000))
        assert p.receiving == (part < PROBE_PARTS - 1)
    assert rate == pytest.approx(1000 * (PROBE_PARTS - 1) / (PROBE_PARTS - 1))  # one tick per part
    assert p.heard == {"a"} and p.awaiting("me", ["me", "a", "b"]) and not p.awaiting("me", ["me", "a"])
    p.keep_heard(["me", "b"])  # a left: if it comes back as a new process, it probes us again
    assert p.awaiting("me", ["me", "a"])
