"""``Transport.private_payloads``: what the transport delivers is a buffer of its own, which the ring may sum
into in place (``collectives.ring.RingOp.owns_payloads``). Real sockets on 127.0.0.1, clear and sealed."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from collectives import keys, wire
from collectives.security import Curve
from collectives.transport import Received, Transport

pytestmark = pytest.mark.timeout(60)


def _chunks(ts: list[Transport], want: int, seconds: float = 10.0) -> list[Received]:
    """Poll every transport (handshakes need both ends polled); the chunks each one received, in order."""
    got: list[Received] = []
    deadline = time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        for t in ts:
            events, _ = t.poll(10)
            got += [e for e in events if isinstance(e, Received) and isinstance(e.msg, wire.Chunk)]
    return got


@pytest.mark.parametrize("secure", [False, True], ids=["clear", "sealed"])
def test_every_delivered_payload_is_a_writable_buffer_of_its_own(secure: bool) -> None:
    secret = keys.new_secret()
    mk: Any = (lambda: Curve(keys.generate_keypair(), secret)) if secure else (lambda: None)
    a, b = Transport("a", security=mk()), Transport("b", security=mk())
    try:
        assert a.private_payloads and b.private_payloads
        a.connect("b", b.addr)
        b.connect("a", a.addr)  # as members do (secure: b answers a's key offer on its own link)
        sent = np.arange(1 << 18, dtype=np.float32)  # 1 MiB, sent zero-copy
        msg = wire.Chunk(1, "w", 0, wire.PHASE_REDUCE_SCATTER, 0, 0, "float32", sent.size)
        a.send("b", msg, sent)
        a.send("a", msg, sent)  # to ourselves: a private copy too
        got = _chunks([a, b], 2)
        assert len(got) == 2, got
        for rec in got:
            arr = np.frombuffer(rec.payload, np.float32)
            assert arr.flags.writeable and np.array_equal(arr, sent)
            assert not np.shares_memory(arr, sent)
            arr += 1  # the ring's in-place sum
        assert np.array_equal(sent, np.arange(1 << 18, dtype=np.float32)), "the sender's buffer is untouched"
    finally:
        a.close()
        b.close()
