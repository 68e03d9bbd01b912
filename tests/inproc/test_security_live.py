"""Security (issue 4), live: attacks on in-process peers over loopback (real sockets, secure by default).

The attacker tools are in ``tests/attack.py``. Every test is time-limited.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.utils.z85

from collectives import keys, wire
from collectives.security import Curve
from collectives.transport import Bad, Limits, Received, Transport
from peer import Timeouts
from peer.config import SecurityConfig
from tests import attack
from tests.helpers import InProcess

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- live attacks

def _pair(security_a: Any, security_b: Any) -> tuple[Transport, Transport]:
    return Transport("a", security=security_a), Transport("b", security=security_b)


def _pump(ts: list[Transport], seconds: float) -> list[Any]:
    """Poll transports (ZAP and monitors need it); return what the last one received."""
    got: list[Any] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for t in ts:
            events, _ = t.poll(10)
            if t is ts[-1]:
                got += events
    return got


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "insecure"])
def test_traffic_is_encrypted_on_the_wire(secure: bool) -> None:
    secret = keys.new_secret()
    mk = (lambda: Curve(keys.generate_keypair(), secret)) if secure else (lambda: None)
    a, b = _pair(mk(), mk())
    relay = attack.Relay(attack.hostport(b.addr))
    data_relay = None
    if b.sealed is not None:  # secure: tensor data goes to b's data socket; watch that wire too
        data_relay = attack.Relay(("127.0.0.1", b.sealed.port))
        b.sealed.port = int(data_relay.addr.rsplit(":", 1)[1])  # what b's DataAccept tells a
        b.connect("a", a.addr)  # as members do: b answers a's key offer on its own authenticated link
    try:
        marker = b"PLAINTEXT-MARKER-" * 64
        a.connect("b", f"tcp://{relay.addr}")
        a.send("b", wire.Suspect(1, 1, "somebody", "reason: " + marker[:200].decode()))
        a.send("b", wire.Chunk(1, "w", 0, wire.PHASE_P2P, 0, 0, "uint8", len(marker)), marker)
        got = _pump([a, b], 1.5)
        received = [e for e in got if isinstance(e, Received)]
        assert len(received) == 2, got  # control and data travel on separate connections: any order
        chunk = next(e for e in received if isinstance(e.msg, wire.Chunk))
        assert bytes(memoryview(chunk.payload)) == marker
        assert (marker[:32] in relay.c2s) is (not secure), "CURVE must hide the bytes; plain TCP shows them"
        if data_relay is not None:
            assert len(data_relay.c2s) > len(marker), "the tensor data went over the data socket"
            assert marker[:32] not in data_relay.c2s, "sealed data frames must hide the bytes"
    finally:
        relay.close()
        if data_relay is not None:
            data_relay.close()
        a.close()
        b.close()


@pytest.mark.timeout(90)
def test_random_bytes_into_every_listening_port(inproc: InProcess) -> None:
    coord, peers = attack.form(inproc, 3)
    rng = random.Random(4)
    attacks = [
        lambda: rng.randbytes(rng.randint(1, 4096)),
        lambda: b"\xff" * 10000,
        lambda: attack.zmtp_greeting(b"CURVE") + rng.randbytes(rng.randint(0, 2000)),
        lambda: attack.zmtp_greeting(b"NULL") + attack.zmtp_ready_null(identity=b"p0")
        + attack.zmtp_frame(wire.encode(wire.Leave(1, 1))),  # a plaintext Leave claiming to be p0
        lambda: attack.zmtp_greeting(b"PLAIN") + rng.randbytes(300),
        lambda: attack.zmtp_greeting(b"CURVE") + attack.zmtp_command(b"HELLO", rng.randbytes(194)),
        lambda: attack.zmtp_greeting(b"CURVE")[:rng.randint(1, 63)],
        lambda: b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03" + rng.randbytes(2000),
    ]
    members = list(peers[0].members)
    for node in [coord, *peers]:
        for _ in range(3):
            for make in attacks:
                attack.raw_send(node.addr, make(), read_for=0.02)
    for node in [coord, *peers]:
        assert node.node.error is None and node.node._thread.is_alive()
    assert all(p.members == members for p in peers), "nobody may be evicted by garbage from strangers"
    attack.all_reduce_ok(peers)
    for node in [coord, *peers]:
        assert node.node.transport.counters.msgs_received > 0
        assert not [e for e in node.node.events if e[1] == "bad_input" and "Leave" in e[2]]


def test_stranger_without_the_secret_cannot_join(inproc: InProcess, tmp_path: Path) -> None:
    coord = inproc.coordinator()
    other = tmp_path / "other.secret"
    keys.save_secret(other, keys.new_secret())
    quick = Timeouts.local(heartbeat_timeout=1.5, coordinator_timeout=1.5, join_timeout=3.0)
    stranger = inproc.peer("stranger", [coord.addr.removeprefix("tcp://")], timeouts=quick,
                           limits=Limits(handshake_ms=1000),
                           security=SecurityConfig(secret_file=str(other), key_file=str(tmp_path / "s.key")))
    with pytest.raises(Exception) as err:
        stranger.wait_admitted(8)
    assert type(err.value).__name__ in ("StaleError", "DeadlineExceeded")
    assert coord.node.coord is not None and not coord.node.coord.pending and not coord.node.coord.members
    assert coord.node.transport.counters.msgs_received == 0  # not one byte got through
    # a genuine peer still joins
    ok = inproc.peer("ok", [coord.addr.removeprefix("tcp://")])
    ok.wait_admitted(10)


def test_unknown_key_that_knows_the_server_key_gets_nothing_in(inproc: InProcess) -> None:
    """Worst case: the attacker learned the swarm's server public key, but not the secret."""
    coord, peers = attack.form(inproc, 2)
    ctx = zmq.Context()
    try:
        server_pub = keys.server_keypair(attack.secret_of()).public
        mallory = keys.generate_keypair()
        sock, mon = attack.curve_client(ctx, coord.addr, server_pub, mallory, b"mallory/1")
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in attack.monitor_events(mon, 1.0)  # accepted on probation
        join = wire.encode(wire.Join("mallory", "tcp://127.0.0.1:1", "default"))
        for burst in range(2):  # dropped at once; banned once it keeps on past the grace period
            for _ in range(40):
                sock.send(join)
                sock.send(wire.encode(wire.Leave(1, 1)))
            time.sleep(1.0 if burst else 2.2)
        core = coord.node.coord
        assert core is not None and "mallory" not in core.pending and "mallory" not in core.members
        assert coord.node.transport.security.stats["bans"] >= 1
        # banned: a new connection with that key is refused at the handshake
        sock2, mon2 = attack.curve_client(ctx, coord.addr, server_pub, mallory, b"mallory/2")
        assert zmq.EVENT_HANDSHAKE_FAILED_AUTH in attack.monitor_events(mon2, 1.5)
        for s in (sock, mon, sock2, mon2):
            s.close(linger=0)
        attack.all_reduce_ok(peers)
    finally:
        ctx.destroy(linger=0)


def test_allowlist_refuses_an_unlisted_key_at_the_handshake(inproc: InProcess) -> None:
    listed = {pid: keys.load_or_create_keypair(inproc.keydir / f"{pid}.key") for pid in ("coord", "p0", "p1")}
    allow = inproc.keydir / "allow"
    allow.write_text("".join(f"{k.public.hex()} {pid}\n" for pid, k in listed.items()))

    def sec(pid: str) -> SecurityConfig:
        return SecurityConfig(key_file=str(inproc.keydir / f"{pid}.key"), allow_file=str(allow))

    coord = inproc.coordinator(security=sec("coord"))
    entry = coord.addr.removeprefix("tcp://")
    p0, p1 = (inproc.peer(p, [entry], security=sec(p)) for p in ("p0", "p1"))
    p0.wait_admitted(10)
    p1.wait_admitted(10)
    attack.all_reduce_ok([p0, p1])
    quick = Timeouts.local(heartbeat_timeout=1.5, coordinator_timeout=1.5, join_timeout=3.0)
    outsider = inproc.peer("outsider", [entry], timeouts=quick, limits=Limits(handshake_ms=1000),
                           security=sec("outsider"))  # it has the secret, but its key is not listed
    with pytest.raises(Exception):
        outsider.wait_admitted(8)
    assert "outsider" not in coord.node.coord.pending  # type: ignore[union-attr]
    assert coord.node.transport.security.stats["zap_refused"] >= 1
    assert sorted(p0.members) == ["p0", "p1"]


def test_valid_key_impersonating_another_peer_is_rejected(inproc: InProcess) -> None:
    coord, peers = attack.form(inproc, 2)
    p0, p1 = peers
    epoch, term, members = p0.epoch, p0.node.term, list(p0.members)
    # mallory holds the secret (an insider with a key of its own) and claims to be p1
    mallory = Transport("p1", security=Curve(keys.generate_keypair(), attack.secret_of()))
    try:
        mallory.connect("coord", coord.addr)
        mallory.connect("p0", p0.addr)
        mallory.send("coord", wire.Leave(term, epoch))                                 # would evict p1
        mallory.send("coord", wire.Suspect(term, epoch, "p0", "protocol: lies"))       # would evict p0
        mallory.send("coord", wire.Join("p1", mallory.addr, "default"))
        mallory.send("p0", wire.Chunk(epoch, "w", 0, wire.PHASE_REDUCE_SCATTER, 0, 0, "float32", 2),
                     np.zeros(2, np.float32))
        mallory.send("p0", wire.EpochUpdate(term + 5, epoch + 5, "p1", mallory.addr, ("p1",), (mallory.addr,),
                                            "hijack"))
        _pump([mallory], 1.0)
        assert p0.members == p1.members == members and p0.epoch == epoch
        assert coord.node.coord is not None and coord.node.coord.members == members
        assert coord.node.transport.security.stats["impersonation"] >= 1
        assert p0.node.transport.security.stats["impersonation"] >= 1
        attack.all_reduce_ok(peers)
        # and it is now banned: a new link with that key fails its handshake
        mallory.connect("coord2", coord.addr)
        kinds = [e.kind for e in _pump([mallory], 1.5) if hasattr(e, "kind")]
        assert "auth_failed" in kinds and "up" not in kinds
    finally:
        mallory.close()


def test_insider_that_is_not_a_member_cannot_hijack_membership(inproc: InProcess) -> None:
    """A valid key under its own id, not a member: its EpochUpdate/Stale with a higher term are ignored."""
    coord, peers = attack.form(inproc, 2)
    p0 = peers[0]
    members = list(p0.members)
    eve = Transport("eve", security=Curve(keys.generate_keypair(), attack.secret_of()))
    try:
        eve.connect("p0", p0.addr)
        eve.send("p0", wire.EpochUpdate(99, 99, "eve", eve.addr, ("eve", "p0"), (eve.addr, p0.addr), "hijack"))
        eve.send("p0", wire.Stale(99, 99, "eve", eve.addr, "you are stale"))
        eve.send("p0", wire.Rejoin(99, 1, eve.addr, (), ()))
        _pump([eve], 1.0)
        assert p0.state == "member" and p0.members == members and p0.node.coord_id == "coord"
        attack.all_reduce_ok(peers)
    finally:
        eve.close()


def test_replayed_session_bytes_deliver_nothing(inproc: InProcess) -> None:
    coord = inproc.coordinator()
    relay = attack.Relay(attack.hostport(coord.addr))
    try:
        joiner = inproc.peer("j", [relay.addr])
        joiner.wait_admitted(10)
        time.sleep(0.5)  # a few heartbeats through the relay
        joiner.close()
        attack.wait_until(lambda: not coord.node.coord.members, 5, "the leave")  # type: ignore[union-attr]
        recorded = bytes(relay.c2s)
        assert len(recorded) > 500 and b"Join" not in recorded
        before = coord.node.transport.counters.msgs_received
        for _ in range(3):  # replay the whole client->server stream on fresh connections
            attack.raw_send(coord.addr, recorded, read_for=0.5)
        time.sleep(0.5)
        assert coord.node.transport.counters.msgs_received == before, "a replayed message was delivered"
        assert not coord.node.coord.members and not coord.node.coord.pending  # type: ignore[union-attr]
    finally:
        relay.close()


def test_replayed_and_old_epoch_messages_from_a_member_change_nothing(inproc: InProcess) -> None:
    coord, peers = attack.form(inproc, 3)
    p0 = peers[0]
    members = list(p0.members)
    x = [np.full(500, float(i + 1), np.float32) for i in range(3)]
    m = attack.run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=20) for p, b in zip(peers, x)])
    epoch, seq = m[0]["epoch"], m[0]["seq"]
    done = p0.node.engine.committed
    # p0 (genuinely) re-sends messages of the finished op, and of an older epoch
    stale = [wire.OpFail(p0.node.term, epoch, "w", seq, "replayed", ()),
             wire.OpDone(p0.node.term, epoch, "w", seq, b"\x00" * 32, ()),
             wire.OpFail(p0.node.term, epoch - 1, "w", 0, "old epoch", ())]
    for msg in stale:
        p0.node.call(p0.node.transport.send, "coord", msg)
    chunk = wire.Chunk(epoch, "w", seq, wire.PHASE_REDUCE_SCATTER, 0, 0, "float32", 10)
    p0.node.call(p0.node.transport.send, "p1", chunk, np.full(10, 1e9, np.float32))
    time.sleep(0.5)
    assert p0.node.engine.committed == done
    y = [np.full(500, float(i + 1), np.float32) for i in range(3)]
    attack.run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=20) for p, b in zip(peers, y)])
    assert all(float(b[0]) == 6.0 for b in x + y) and all(p.members == members for p in peers)


def test_pickle_payloads_are_never_unpickled(inproc: InProcess, tmp_path: Path) -> None:
    canary = tmp_path / "CANARY"
    bomb = attack.canary_pickle(canary)
    coord, peers = attack.form(inproc, 2)
    p0 = peers[0]
    eve = Transport("eve", security=Curve(keys.generate_keypair(), attack.secret_of()))
    try:
        for who, addr in (("p0", p0.addr), ("coord", coord.addr)):
            eve.connect(who, addr)
            sock = eve.links[who].sock
            pad = bomb + b"\x00" * (-len(bomb) % 4)
            e = p0.epoch
            sock.send_multipart([bomb])                                       # as a header
            sock.send_multipart([wire.encode(wire.Heartbeat(1, e)), bomb])     # as a stray payload
            sock.send_multipart([wire.encode(wire.Chunk(e, "w", 0, 0, 0, 0, "float32", len(pad) // 4)), pad])
            sock.send_multipart([wire.encode(wire.Chunk(e + 1, "w", 0, 0, 0, 0, "uint8", len(bomb))), bomb])
            sock.send_multipart([wire.encode(wire.OpDone(1, e, "w", 0, bomb[:4096], ()))])
            sock.send_multipart([b"\x93\x01\x14" + bomb])                     # inside a msgpack array
            sock.send_multipart([bytes([0xc7, len(bomb) % 256, 1]) + bomb])   # as a msgpack ext type
        p0.node.call(p0.node.transport.send, "p1",  # even from a member (early data for a later epoch)
                     wire.Chunk(p0.epoch + 1, "w", 50, 0, 0, 0, "uint8", len(bomb)), bomb)
        _pump([eve], 1.0)
        attack.all_reduce_ok(peers)
        assert not canary.exists(), "something unpickled peer data"
        assert not any(n.node.error for n in [coord, *peers])
    finally:
        eve.close()
    assert not canary.exists()


def test_no_unpickling_code_in_the_library() -> None:
    root = Path(__file__).resolve().parents[2]
    banned = ("import pickle", "from pickle", "cPickle", "dill", "torch.load", "allow_pickle=True", "marshal.loads")
    # the builtins eval/exec, not a method of that name (``module.eval()`` puts a torch module in eval mode)
    builtins = re.compile(r"(?<![\w.])(eval|exec)\(")
    for pkg in ("collectives", "peer", "recovery"):
        for path in (root / pkg).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            hits = [b for b in banned if b in text] + [m.group(0) for m in builtins.finditer(text)]
            assert not hits, f"{path}: {hits}"
    assert builtins.search("x = eval(s)") and not builtins.search("model.eval()")


def test_handshake_deadline_cuts_silent_connections() -> None:
    t = Transport("target", security=Curve(keys.generate_keypair(), keys.new_secret()),
                  limits=Limits(handshake_ms=300))
    try:
        import socket

        with socket.create_connection(attack.hostport(t.addr), timeout=5) as s:
            s.sendall(attack.zmtp_greeting(b"CURVE")[:11])  # a partial greeting, then silence
            s.settimeout(0.1)
            t0 = time.monotonic()
            closed = False
            while time.monotonic() - t0 < 3.0 and not closed:
                t.poll(10)
                try:
                    closed = s.recv(4096) == b"" or closed
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
            assert closed, "a silent half-open connection must be cut after handshake_ms"
            assert time.monotonic() - t0 < 2.0
    finally:
        t.close()


def test_connections_per_address_are_capped() -> None:
    import socket

    t = Transport("target", security=Curve(keys.generate_keypair(), keys.new_secret()),
                  limits=Limits(max_conns_per_address=4, handshake_ms=5000))
    conns = []
    try:
        for _ in range(10):
            conns.append(socket.create_connection(attack.hostport(t.addr), timeout=5))
            t.poll(20)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:
            t.poll(20)
        alive = 0
        for c in conns:
            c.settimeout(0.2)
            data = b""
            try:
                while True:
                    chunk = c.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                alive += 1  # still open (waiting for our handshake)
            except OSError:
                pass  # reset: cut
        assert alive == 4, f"{alive} connections left open from one address (limit 4)"
        assert t.conns_per_host["127.0.0.1"] == 4
        for c in conns:
            c.close()
        t0 = time.monotonic()
        while t.conns_per_host and time.monotonic() - t0 < 3.0:
            t.poll(20)
        assert not t.conns_per_host, "closed connections must be uncounted"
    finally:
        for c in conns:
            c.close()
        t.close()


def test_malformed_frames_from_an_authenticated_peer_are_typed_errors() -> None:
    secret = keys.new_secret()
    a, b = _pair(Curve(keys.generate_keypair(), secret), Curve(keys.generate_keypair(), secret))
    try:
        a.connect("b", b.addr)
        sock = a.links["b"].sock
        hb = wire.encode(wire.Heartbeat(1, 1))
        deep = b"\x91" * 30000 + b"\x00"
        for frames in ([hb, b"x", b"y"], [hb, b"x", b"y", b"z"], [b""], [deep], [hb[:-1]], [b"\xc1"],
                       [wire.encode(wire.Chunk(1, "w", 0, 0, 0, 0, "float32", 1))], [b"\x81\xa1a\x01"],
                       [b"\x00" * (wire.MAX_HEADER_BYTES + 1)]):
            sock.send_multipart(frames)
        sock.send(hb)
        got = _pump([a, b], 1.0)
        bad = [e for e in got if isinstance(e, Bad)]
        good = [e for e in got if isinstance(e, Received)]
        assert len(bad) == 9 and all(e.sender == "a" and type(e.error).__name__ == "WireError" for e in bad)
        assert len(good) == 1 and isinstance(good[0].msg, wire.Heartbeat)
    finally:
        a.close()
        b.close()


def test_join_with_security_works_through_the_cli_harness(procs: Any) -> None:
    """The process harness runs secure: a secret in the work dir, a 0600 key file per process."""
    coord = procs.coordinator(extra=Timeouts.local().cli_args())
    procs.peer("a", [coord.hostport], ["--ops", "3", "--elems", "1000"])
    procs.peer("b", [coord.hostport], ["--ops", "3", "--elems", "1000"])
    for n in ("a", "b"):
        assert procs.wait_done(n, 30)["committed"] == 3
    for n in ("coordinator", "a", "b"):
        assert procs.key_file(n).stat().st_mode & 0o777 == 0o600
    assert procs.secret_file.stat().st_mode & 0o777 == 0o600
