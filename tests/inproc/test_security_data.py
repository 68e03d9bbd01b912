"""Sealed data frames (secure mode): keys agreed over CURVE, AEAD per frame, replay/reorder refused.

Unit part: ``collectives.aead`` directly. Live part: a real secure swarm, and a stranger (and a member
replaying captured frames) writing to a peer's data socket.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import pytest
import zmq

from collectives import aead, ring, wire
from collectives.errors import AuthError
from peer.swarm import Swarm
from tests.helpers import InProcess, form_swarm, run_all

pytestmark = pytest.mark.timeout(60)


def pair(sender: str = "alice", receiver: str = "bob") -> tuple[aead.Sealer, aead.Opener]:
    """Both ends of one direction, agreed as the transports do it (offer, accept, finish)."""
    priv, public = aead.new_ephemeral()
    pending = aead.Pending(7, priv, public, 0.0)
    opener, answer = aead.accept_offer(receiver, sender, 7, public)
    return aead.finish_offer(sender, receiver, pending, answer), opener


def frame(sealer: aead.Sealer, payload: bytes = b"tensor bytes" * 100, stream: int = 0,
          header: bytes = b"header") -> tuple[bytes, bytes, bytes]:
    prefix, sh, sp = sealer.seal(stream, header, payload)
    return prefix, sh, bytes(sp)


def test_round_trip_and_the_payload_is_not_in_the_clear() -> None:
    sealer, opener = pair()
    payload = np.arange(10_000, dtype=np.float32).tobytes()
    prefix, sh, sp = frame(sealer, payload)
    assert payload[:64] not in sp and b"header" not in sh
    header, out = opener.open(prefix, sh, sp)
    assert header == b"header" and bytes(out) == payload


def test_tampered_frames_are_refused() -> None:
    sealer, opener = pair()
    prefix, sh, sp = frame(sealer)
    for bad in (bytes([sp[0] ^ 1]) + sp[1:], sp[:-1] + bytes([sp[-1] ^ 0x80]), sp[:-1], b""):
        with pytest.raises(AuthError):
            opener.open(prefix, sh, bad)
    with pytest.raises(AuthError):
        opener.open(prefix, bytes([sh[0] ^ 1]) + sh[1:], sp)
    key_id, stream, c = aead.parse_prefix(prefix)
    with pytest.raises(AuthError):  # the prefix is authenticated too (moved to another stream)
        opener.open(aead.PREFIX.pack(key_id, stream + 1, c), sh, sp)
    assert opener.open(prefix, sh, sp)[0] == b"header", "refusals must not move the replay window"


def test_replayed_and_reordered_frames_are_refused() -> None:
    sealer, opener = pair()
    f1, f2, f3 = frame(sealer), frame(sealer), frame(sealer)
    opener.open(*f1)
    with pytest.raises(AuthError, match="replayed or reordered"):
        opener.open(*f1)  # replay
    opener.open(*f3)     # a gap (f2 lost with a dropped connection) is allowed...
    with pytest.raises(AuthError, match="replayed or reordered"):
        opener.open(*f2)  # ...but f2 arriving after f3 is reordering
    # streams are independent TCP connections: each has its own counter
    g = frame(sealer, stream=1)
    assert opener.open(*g)[0] == b"header"


def test_frames_swapped_between_positions_are_refused() -> None:
    sealer, opener = pair()
    p1, h1, s1 = frame(sealer, b"one" * 50)
    p2, h2, s2 = frame(sealer, b"two" * 50)
    with pytest.raises(AuthError):
        opener.open(p2, h2, s1)  # payload of frame 1 under frame 2's prefix
    with pytest.raises(AuthError):
        opener.open(p2, h1, s2)  # header of frame 1 with frame 2


def test_unauthenticated_frames_are_refused() -> None:
    """Another direction's key, another pair's key, another key id: none opens."""
    sealer, opener = pair("alice", "bob")
    other_sealer, _ = pair("mallory", "bob")
    reverse_sealer, _ = pair("bob", "alice")
    for s in (other_sealer, reverse_sealer):
        p, h, sp = frame(s)
        key_id, stream, c = aead.parse_prefix(p)
        with pytest.raises(AuthError):
            opener.open(aead.PREFIX.pack(opener.key_id, stream, c), h, sp)
    p, h, sp = frame(sealer)
    key_id, stream, c = aead.parse_prefix(p)
    with pytest.raises(AuthError, match="another key"):
        opener.open(aead.PREFIX.pack(key_id + 1, stream, c), h, sp)


def test_keys_differ_per_direction_and_per_agreement() -> None:
    a, _ = pair("alice", "bob")
    b, _ = pair("alice", "bob")
    c, _ = pair("bob", "alice")
    assert len({a.key, b.key, c.key}) == 3


def test_offer_and_accept_messages_are_validated() -> None:
    with pytest.raises(Exception):
        wire.DataOffer(1, b"short", "aesgcm")
    with pytest.raises(Exception):
        wire.DataOffer(1, bytes(32), "rot13")
    with pytest.raises(Exception):
        wire.DataAccept(1, bytes(32), "", 0)
    with pytest.raises(Exception):
        wire.DataAccept(1, bytes(32), "evil host/../", 4242)
    assert isinstance(wire.decode(wire.encode(wire.DataAccept(5, bytes(32), "127.0.0.2", 4242))), wire.DataAccept)


# ---------------------------------------------------------------- live

def _wait(cond: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_secure_swarm_moves_tensor_data_only_as_sealed_frames(inproc: InProcess) -> None:
    _, peers = form_swarm(inproc, 2, slice_bytes=64 * 1024)
    bufs = [np.full(200_000, float(i + 1), np.float32) for i in range(2)]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=30) for p, b in zip(peers, bufs)])
    assert all(np.all(b == 3.0) for b in bufs)
    for p in peers:
        t = p.node.transport
        assert t.sealed is not None and t.sealed.stats["opened"] >= 1
        assert all(not link.data for link in t.links.values()), "no tensor data on the CURVE sockets"


@pytest.mark.parametrize("dtype,op", [("float32", "sum"), ("bfloat16", "avg"), ("int32", "min")])
def test_sealed_chunks_decrypt_into_the_ops_scratch_and_the_result_is_exact(inproc: InProcess, dtype: str,
                                                                           op: str) -> None:
    """Secure mode decrypts all-reduce chunks straight into the op's scratch (``AllReduce.landing``): the
    results are still bit-identical on every member and equal to the reference reduction, over several
    ops that reuse the pooled scratch."""
    import torch

    from collectives import tensors

    _, peers = form_swarm(inproc, 3, slice_bytes=16 * 1024)
    rng = np.random.default_rng(11)
    elems = 100_001  # a ring all-reduce for every dtype here (not ``ring.direct``)
    for _ in range(3):
        if dtype == "int32":
            inputs = [torch.from_numpy(rng.integers(-1000, 1000, elems).astype(np.int32)) for _ in peers]
        else:
            tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
            inputs = [torch.from_numpy(rng.standard_normal(elems).astype(np.float32)).to(tdt) for _ in peers]
        assert not ring.direct(inputs[0].numel() * inputs[0].element_size(), len(peers))
        bufs = [x.clone() for x in inputs]
        run_all([lambda p=p, b=b: p.comm.all_reduce(b, op=op, timeout=30) for p, b in zip(peers, bufs)])
        views = [tensors.flat_view(b)[0] for b in bufs]
        assert len({ring.digest(v) for v in views}) == 1
        # the ring's order of operands for each chunk is fixed; check against the plain left-to-right sum
        # with a tolerance for floats, exactly for integers
        expect = tensors.reference_reduce([tensors.flat_view(x)[0] for x in inputs], op, dtype)
        if dtype == "bfloat16":
            np.testing.assert_allclose(tensors.bf16_to_f32(views[0]), tensors.bf16_to_f32(expect), rtol=2e-2,
                                       atol=2e-2)
        elif dtype == "float32":
            np.testing.assert_allclose(views[0], expect, rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_array_equal(views[0], expect)
    for p in peers:
        sealed = p.node.transport.sealed
        assert sealed is not None and sealed.stats["landed"] > 0 and sealed.stats["refused"] == 0


def _while_reading(victim: Swarm, others: list[Swarm], during: Callable[[], None]) -> list[np.ndarray]:
    """A peer reads its data socket only while an op runs there (``Node._hold_early_data``): start the
    victim's part of an all-reduce, run ``during()`` while it waits for the others, then let them take
    part. Returns the buffers (all 3.0 when the op committed)."""
    bufs = {p.id: np.full(1000, float(i + 1), np.float32) for i, p in enumerate([*others, victim])}
    t = threading.Thread(target=lambda: victim.comm.all_reduce(bufs[victim.id], timeout=30), daemon=True)
    t.start()
    try:
        assert _wait(lambda: victim.node.engine.running), "the victim's op never started"
        during()
    finally:
        run_all([lambda p=p: p.comm.all_reduce(bufs[p.id], timeout=30) for p in others])
        t.join(30)
    return list(bufs.values())


def test_strangers_and_replays_on_the_data_socket_are_refused(inproc: InProcess) -> None:
    """A stranger connecting to the (plain) data socket, claiming a member's id, and a replay of a real
    frame: refused, reported with an untrusted sender (nobody evicted), and the swarm keeps working."""
    _, peers = form_swarm(inproc, 2, slice_bytes=64 * 1024)
    victim = peers[1]
    sealed = victim.node.transport.sealed
    assert sealed is not None
    host = victim.node.transport.addr.rsplit(":", 1)[0]
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, f"{peers[0].id}/cafe".encode())
    def attack() -> None:
        s.connect(f"{host}:{sealed.port}")
        forged_key, _ = pair(peers[0].id, victim.id)
        assert _wait(lambda: peers[0].id in sealed.openers), "the member's key offer never arrived"
        known = next(iter(sealed.openers[peers[0].id]))
        forged_key.key_id = known
        chunk = wire.encode(wire.Chunk(victim.node.epoch, "w", 0, wire.PHASE_REDUCE_SCATTER, 0, 0, "float32", 4))
        prefix, sh, sp = forged_key.seal(0, chunk, np.zeros(4, np.float32))
        s.send_multipart([prefix, sh, bytes(sp)])          # forged (wrong key)
        s.send_multipart([b"x" * 16, b"y", b"z"])          # garbage
        s.send_multipart([b"only one part"])
        assert _wait(lambda: sealed.stats["refused"] >= 3)

    try:
        bufs = _while_reading(victim, [peers[0]], attack)
    finally:
        s.close(linger=0)
    assert all(np.all(b == 3.0) for b in bufs)
    assert set(victim.members) == {p.id for p in peers}, "a stranger's bytes must not evict anyone"


def test_a_captured_frame_replayed_is_refused(inproc: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    _, peers = form_swarm(inproc, 2, slice_bytes=64 * 1024)
    sender, victim = peers
    captured: list[list[bytes]] = []
    real_seal = aead.Sealer.seal

    def spy(self: aead.Sealer, stream: int, header: bytes, payload: object) -> tuple[bytes, bytes, np.ndarray]:
        out = real_seal(self, stream, header, payload)
        captured.append([out[0], out[1], bytes(out[2])])
        return out

    monkeypatch.setattr(aead.Sealer, "seal", spy)
    bufs = [np.full(1000, 1.0, np.float32) for _ in range(2)]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=30) for p, b in zip(peers, bufs)])
    monkeypatch.setattr(aead.Sealer, "seal", real_seal)
    sealed = victim.node.transport.sealed
    assert sealed is not None and captured
    refused = sealed.stats["refused"]
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, f"{sender.id}/beef".encode())
    def replay() -> None:
        s.connect(f"{victim.node.transport.addr.rsplit(':', 1)[0]}:{sealed.port}")
        for parts in captured:  # every frame either peer sealed: none opens again at the victim
            s.send_multipart(parts)
        assert _wait(lambda: sealed.stats["refused"] >= refused + len(captured))

    try:
        after = _while_reading(victim, [sender], replay)
    finally:
        s.close(linger=0)
    assert ring.digest(bufs[0]) == ring.digest(bufs[1])
    assert all(np.all(b == 3.0) for b in after)


def test_sealing_is_paced_by_the_stream_and_every_frame_arrives_in_order() -> None:
    """A sender with 40 frames for a receiver that is not reading seals only what its stream (libzmq's
    small send window plus the kernel's buffers) takes, keeping the rest unsealed; once the receiver
    reads, the POLLOUT wake-ups seal and send the rest, and every frame opens, in order."""
    from collectives.datalink import SEND_WINDOW, SealedLinks

    ctx: zmq.Context = zmq.Context()
    pollers = [zmq.Poller(), zmq.Poller()]
    kw = dict(max_frame_bytes=2 << 20, rcv_hwm=256, handshake_ms=5000, streams=1, max_batch=64)
    tx = SealedLinks(ctx, pollers[0], "sender", "127.0.0.1", **kw)  # type: ignore[arg-type]
    rx = SealedLinks(ctx, pollers[1], "receiver", "127.0.0.1", **kw)  # type: ignore[arg-type]
    frames, size = 40, 1 << 20
    try:
        tx.on_accept("receiver", rx.on_offer("sender", tx.offer("receiver")), "tcp://127.0.0.1")
        for i in range(frames):
            header = wire.encode(wire.Chunk(1, "w", 0, wire.PHASE_BROADCAST, 0, i, "uint8", size))
            tx.send("receiver", header, np.full(size, i % 251, np.uint8))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # let the sender fill whatever the wire takes
            for sock, _ in pollers[0].poll(20):
                tx.writable(sock)
        sealed_early = tx.sealers["receiver"].counters.get(0, 0)
        assert SEND_WINDOW <= sealed_early < frames // 2, sealed_early
        assert len(tx.queued["receiver"]) == frames - sealed_early - len(tx.stuck)
        got: list[int] = []
        deadline = time.monotonic() + 20.0
        while len(got) < frames and time.monotonic() < deadline:
            for sock, _ in pollers[0].poll(0):
                tx.writable(sock)
            if pollers[1].poll(20):
                for sender, msg, payload, err in rx.drain():
                    assert err is None and sender == "sender" and isinstance(msg, wire.Chunk)
                    assert np.all(np.asarray(payload) == msg.part % 251)
                    got.append(msg.part)
        assert got == list(range(frames))
        assert not tx.queued.get("receiver") and not tx.writers
    finally:
        tx.close()
        rx.close()
        ctx.term()


def test_data_for_an_op_not_started_here_waits_in_the_socket_then_lands_in_its_scratch(inproc: InProcess) -> None:
    """p0 starts a 32 MiB all-reduce long before p1 does (its first chunk: 256 frames of 64 KiB for p1). While
    no op runs there, p1 does not read its data socket: p0's frames wait there and TCP pushes back on p0,
    instead of p1 decrypting the chunk into fresh arrays as early data. When p1 starts, the frames open
    straight into its scratch and the result is exact."""
    from peer.core.probes import PROBE_GRACE_S

    _, peers = form_swarm(inproc, 2, slice_bytes=64 * 1024)
    p0, p1 = peers
    sealed = p1.node.transport.sealed
    assert sealed is not None
    # bandwidth probes are timed on arrival: no holding near an epoch change, nor while one is coming in
    assert _wait(lambda: time.monotonic() - p1.node._epoch_at >= PROBE_GRACE_S and not p1.node.probes.receiving)
    n = 8 << 20  # more than loopback's socket buffers hold
    bufs = [np.full(n, float(i + 1), np.float32) for i in range(2)]
    chunk_bytes = n // 2 * 4
    landed0 = sealed.stats["landed"]
    t = threading.Thread(target=lambda: p0.comm.all_reduce(bufs[0], timeout=30), daemon=True)
    t.start()
    try:
        assert _wait(lambda: sealed.reads_held), "p1 went on reading data for an op it has not started"
        early = p1.node.engine.early_bytes
        assert early < chunk_bytes // 2, early
        assert _wait(lambda: bool(p0.node.transport.sealed and p0.node.transport.sealed.queued.get(p1.id))), \
            "p0's frames should wait unsealed (TCP pushed back)"
        p1.comm.all_reduce(bufs[1], timeout=30)
    finally:
        t.join(30)
    assert all(np.all(b == 3.0) for b in bufs)
    assert p1.node.engine.early_bytes == 0
    frames = 2 * chunk_bytes // (64 * 1024)  # reduce-scatter and all-gather
    assert sealed.stats["landed"] - landed0 >= frames - early // (64 * 1024), "the rest opened into scratch"


def test_data_reads_are_not_held_while_a_bandwidth_probe_may_be_arriving(inproc: InProcess) -> None:
    """Bandwidth probes are timed by their arrival: an idle peer holds its data reads only once every
    member's probe is in (or the grace after the epoch change is over), and never while one is partly in."""
    from peer.core.probes import PROBE_GRACE_S

    _, peers = form_swarm(inproc, 2, slice_bytes=64 * 1024)
    p1 = peers[1].node
    sealed = p1.transport.sealed
    assert sealed is not None
    assert _wait(lambda: sealed.reads_held), "an idle member holds its data reads"
    assert peers[0].id in p1.probes.heard or time.monotonic() - p1._epoch_at >= PROBE_GRACE_S
    p1.call(lambda: p1.probes._rx.update({peers[0].id: (time.perf_counter(), 0, 1)}))  # a probe under way
    assert _wait(lambda: not sealed.reads_held), "reads held while a probe was arriving"
    p1.call(lambda: p1.probes._rx.clear())
    assert _wait(lambda: sealed.reads_held)


def test_after_a_point_to_point_op_an_idle_peer_keeps_reading(inproc: InProcess) -> None:
    """A pipeline stage computes between its sends and receives: the next activation should stream in
    meanwhile, so an idle peer holds its data reads after a collective, but not after send/recv."""
    _, peers = form_swarm(inproc, 2, slice_bytes=64 * 1024)
    p0, p1 = peers
    sealed = p1.node.transport.sealed
    assert sealed is not None
    bufs = [np.full(1000, float(i + 1), np.float32) for i in range(2)]
    run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=30) for p, b in zip(peers, bufs)])
    assert _wait(lambda: sealed.reads_held)
    x, y = np.arange(1000, dtype=np.float32), np.zeros(1000, np.float32)
    run_all([lambda: p0.comm.send(x, p1.id, timeout=30), lambda: p1.comm.recv(y, p0.id, timeout=30)])
    assert np.array_equal(x, y)
    assert _wait(lambda: not sealed.reads_held), "reads held after a point-to-point op"
