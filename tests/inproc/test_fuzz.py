"""Fuzzing (issue 4): hostile frames at every message handler; typed errors only, honest peers keep going,
memory stays bounded.

- ``test_decode_and_parse_give_typed_errors_only``: hypothesis drives the bounded decoder and a live secure
  transport's parser with random, truncated, mistyped and deeply nested frames.
- ``test_live_peers_survive_an_authenticated_fuzzer``: three real peer processes (one of them also the
  coordinator) all-reduce while an *authenticated* fuzzer (it holds the swarm secret: an insider, the only
  kind of sender whose frames reach the handlers) sends thousands of generated and mutated messages of every
  type, oversized frames and wrong frame counts to a coordinator-holding peer and to a plain member, while
  strangers pour random bytes into every port and throwaway keys send forged Hellos. Then: every process is
  alive with no untyped failure in its log, the honest peers committed ops after the fuzzing with parity,
  and the target's memory grew by less than a bound.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectives import keys, wire
from collectives.errors import RemoteError, WireError
from collectives.security import Curve
from collectives.transport import Bad, Received, Transport
from peer.sim.history import check_records
from peer.sim.procs import LocalProcs
from tests import attack
from tests.helpers import FAST_ARGS

MESSAGE_CLASSES = sorted(wire._REGISTRY.values(), key=lambda c: c.TAG)
DTYPES = ["float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8", "uint16", "object", "", "f4"]

# ---------------------------------------------------------------- generators


def _good(rng: random.Random, typ: Any, name: str, epoch: int) -> Any:
    """A value of the declared type, often plausible (near the current epoch, real ids), often extreme."""
    if getattr(typ, "__origin__", None) is tuple:
        n = rng.choice([0, 1, 2, 5, 50, wire.MAX_ITEMS + 1])
        return [_good(rng, typ.__args__[0], name, epoch) for _ in range(n)]
    if typ is int:
        return rng.choice([0, 1, -1, epoch, epoch + 1, max(0, epoch - 1), rng.randint(0, 70), wire.MAX_INT,
                           wire.MIN_INT, rng.randint(wire.MIN_INT, wire.MAX_INT)])
    if typ is bool:
        return rng.random() < 0.5
    if typ is float:
        return rng.choice([0.0, -1.0, 1e6, 1e300, float("inf"), float("nan")])
    if typ is bytes:
        return rng.randbytes(rng.choice([0, 1, 16, 32, 64, wire.MAX_BYTES, wire.MAX_BYTES + 1]))
    if "id" in name or name in ("members", "member_ids"):
        return rng.choice(["target", "h0", "h1", "ghost", "", "x" * 65, "a/b", rng.randbytes(4).hex()])
    if "addr" in name:
        return rng.choice(["tcp://127.0.0.1:1", f"tcp://127.0.0.1:{rng.randint(1, 65535)}", "tcp://[::1]:9",
                           "ipc:///tmp/x", "tcp://" + "h" * 300 + ":1", ""])
    if name == "group":
        return rng.choice(["w", "p" + rng.randbytes(4).hex(), rng.randbytes(3).hex(), "W", "", "g" * 41])
    if name == "dtype":
        return rng.choice(DTYPES)
    if name == "swarm":
        return rng.choice(["default", "other", ""])
    return rng.choice(["", "protocol: x", "é" * 10, "x" * (wire.MAX_STR + 1), rng.randbytes(8).hex()])


def _wrong(rng: random.Random, depth: int = 0) -> Any:
    """A value of a random (usually wrong) type, possibly nested."""
    kinds: list[Callable[[], Any]] = [
        lambda: None, lambda: 1.5, lambda: "s", lambda: b"b", lambda: True, lambda: -(2**63),
        lambda: 2**64 - 1, lambda: {"k": 1}, lambda: {1: 2},
        lambda: [_wrong(rng, depth + 1) for _ in range(rng.randint(0, 3))] if depth < 4 else [],
        lambda: msgpack.ExtType(rng.randint(0, 127), b"ext"),
    ]
    return rng.choice(kinds)()


def random_message(rng: random.Random, epoch: int, skip_tags: tuple[int, ...] = (wire.Hello.TAG,)) -> list[bytes]:
    """Frames of one message of a random type: fields mostly well typed, some not; right frame count mostly."""
    cls = rng.choice([c for c in MESSAGE_CLASSES if c.TAG not in skip_tags])
    types = wire._field_types(cls)
    values = [_good(rng, types[f.name], f.name, epoch) if rng.random() < 0.85 else _wrong(rng)
              for f in dataclasses.fields(cls)]
    if rng.random() < 0.05:
        values = values[:-1] if values and rng.random() < 0.5 else values + [0]
    version = wire.VERSION if rng.random() < 0.97 else rng.choice([0, 2, "1", None])
    header = msgpack.packb([version, cls.TAG, *values], use_bin_type=True)
    frames = [header]
    if cls.HAS_PAYLOAD != (rng.random() < 0.05):
        frames.append(rng.randbytes(rng.choice([0, 1, 3, 4, 8, 400, 4096, 65536])))
    return frames


def mutated(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    """Damage a message: truncate, flip, splice, nest deeply, bloat, or replace with random bytes."""
    h = frames[0]
    kind = rng.randrange(10)
    if kind == 0:
        h = h[:rng.randint(0, max(0, len(h) - 1))]
    elif kind == 1:
        b = bytearray(h)
        for _ in range(rng.randint(1, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        h = bytes(b)
    elif kind == 2:
        cut = rng.randint(0, len(h))
        h = h[:cut] + rng.randbytes(rng.randint(1, 32)) + h[cut:]
    elif kind == 3:
        h = b"\x91" * rng.choice([100, 1000, 60000]) + b"\xc0"  # [[[[...]]]]
    elif kind == 4:
        h = b"\xdd" + (2**31).to_bytes(4, "big") + b"\x00" * 16  # claims a 2-billion-item array
    elif kind == 5:
        h = b"\xc6" + (2**31).to_bytes(4, "big")  # claims a 2 GB bin
    elif kind == 6:
        h = rng.randbytes(rng.choice([1, 7, 100, 5000]))
    elif kind == 7:
        h = b"\x92\x01" + msgpack.packb(wire.Heartbeat.TAG) + b"\x00" * (wire.MAX_HEADER_BYTES + 10)
    elif kind == 8:
        return [h] + [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(2, 5))]
    else:
        return [b""] if rng.random() < 0.5 else [h, b"", b""]
    return [h, *frames[1:]]


def _forges_hello(frames: list[bytes]) -> bool:
    """A frame list that would decode as a Hello (the fuzzer must not get its own key banned by accident)."""
    try:
        return isinstance(wire.decode(frames[0]), wire.Hello)
    except WireError:
        return False


# ---------------------------------------------------------------- unit level: decoder and parser

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=40)


@pytest.mark.timeout(120)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tag=st.sampled_from([c.TAG for c in MESSAGE_CLASSES] + [0, 99, -1]),
       fields=st.lists(msgpack_values, max_size=10), junk=st.binary(max_size=200), depth=st.integers(0, 3000))
def test_decode_and_parse_give_typed_errors_only(tag: int, fields: list[Any], junk: bytes, depth: int) -> None:
    raws = [msgpack.packb([wire.VERSION, tag, *fields], use_bin_type=True), junk,
            b"\x91" * depth + msgpack.packb([wire.VERSION, tag, *fields], use_bin_type=True)]
    for raw in raws:
        try:
            msg = wire.decode(raw)
        except WireError:
            continue
        assert type(msg) in wire._REGISTRY.values()


@pytest.fixture(scope="module")
def secure_pair() -> Any:
    secret = keys.new_secret()
    a = Transport("fz", security=Curve(keys.generate_keypair(), secret))
    b = Transport("tgt", security=Curve(keys.generate_keypair(), secret))
    a.connect("tgt", b.addr)
    yield a, b
    a.close()
    b.close()


@pytest.mark.timeout(120)
def test_transport_parser_on_thousands_of_hostile_frames(secure_pair: Any) -> None:
    """Every frame list yields a Received or a Bad carrying a typed RemoteError; poll never raises."""
    a, b = secure_pair
    rng = random.Random(7)
    sent = 0
    events: list[Any] = []
    for i in range(3000):
        frames = random_message(rng, 3)
        if rng.random() < 0.5:
            frames = mutated(rng, frames)
        if _forges_hello(frames):
            continue
        a.links["tgt"].sock.send_multipart(frames)
        sent += 1
        if i % 200 == 0:
            for t in (a, b):
                evs, _ = t.poll(5)
                if t is b:
                    events += evs
    deadline = time.monotonic() + 20
    while len(events) < sent and time.monotonic() < deadline:
        for t in (a, b):
            evs, _ = t.poll(20)
            if t is b:
                events += evs
    assert len(events) == sent, (len(events), sent)
    for e in events:
        assert isinstance(e, (Received, Bad)), e
        if isinstance(e, Bad):
            assert isinstance(e.error, RemoteError) and e.sender == "fz"
    assert sum(isinstance(e, Received) for e in events) > 50  # plenty were well formed and got through
    assert b.security.stats["bans"] == 0  # nothing here forged a Hello


# ---------------------------------------------------------------- live: real peers under fire

def _log_failures(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "Traceback" in ln or "crashed" in ln or "untyped" in ln]


@pytest.mark.timeout(150)
def test_live_peers_survive_an_authenticated_fuzzer(procs: LocalProcs) -> None:
    elems, run_s = 20_000, 22.0
    common = ["--elems", str(elems), "--duration", str(run_s), *FAST_ARGS]
    target = procs.peer("target", [], ["--bootstrap", "--max-early-mb", "32", *common])
    h0 = procs.peer("h0", [target.hostport], common)
    h1 = procs.peer("h1", [target.hostport], common)
    deadline = time.monotonic() + 30      # warm up: the swarm forms and all-reduces
    while not [r for r in procs.records() if r.get("committed") and len(r["members"]) == 3]:
        assert time.monotonic() < deadline, "the three peers never all-reduced together"
        time.sleep(0.1)
    rss0 = attack.rss_bytes(target.popen.pid)
    secret = keys.load_secret(procs.secret_file)
    fuzzer = Transport("fuzz", security=Curve(keys.generate_keypair(), secret))
    stop = threading.Event()

    def strangers() -> None:  # random bytes into every listening port, throughout
        rng = random.Random(11)
        while not stop.is_set():
            for p in (target, h0, h1):
                attack.raw_send(p.addr, rng.randbytes(rng.randint(1, 3000)) if rng.random() < 0.5 else
                                attack.zmtp_greeting(b"CURVE") + rng.randbytes(200), read_for=0.01)

    noise = threading.Thread(target=strangers, daemon=True)
    noise.start()
    sent = forged_hellos = 0
    fuzz_t0 = time.time()
    try:
        fuzzer.connect("target", target.addr)
        fuzzer.connect("h1", h1.addr)
        rng = random.Random(2024)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            for _ in range(100):
                frames = random_message(rng, epoch=rng.randint(0, 6))
                if rng.random() < 0.5:
                    frames = mutated(rng, frames)
                if _forges_hello(frames):
                    continue
                fuzzer.links[rng.choice(["target", "h1"])].sock.send_multipart(frames, copy=False)
                sent += 1
            if rng.random() < 0.02:  # oversized: the receiver's zmq cuts the connection; we reconnect
                fuzzer.links["target"].sock.send(b"\x00" * (17 << 20))
            if rng.random() < 0.05:  # a forged Hello from a throwaway key: refused, that key banned
                throwaway = Transport("eve", security=Curve(keys.generate_keypair(), secret))
                forged = wire.Hello(keys.hello_token(secret, keys.generate_keypair().public))  # another key's
                throwaway.security._hello = forged  # type: ignore[attr-defined]
                throwaway.connect("target", target.addr)
                throwaway.send("target", wire.Heartbeat(1, 1))
                t_end = time.monotonic() + 0.3
                while time.monotonic() < t_end:
                    throwaway.poll(20)
                throwaway.close()
                forged_hellos += 1
            fuzzer.poll(5)  # our monitor: re-send Hello after a reconnect
    finally:
        stop.set()
        noise.join(10)
        fuzzer.close()
    fuzz_t1 = time.time()
    time.sleep(1.0)
    rss1 = attack.rss_bytes(target.popen.pid)
    assert sent > 3000
    for name in ("target", "h0", "h1"):
        assert procs.procs[name].alive, f"{name} died: {procs.log_tail(name)}"
    done = {n: procs.wait_done(n, run_s + 60) for n in ("target", "h0", "h1")}
    assert all(d["committed"] > 0 for d in done.values()), done
    for name in ("target", "h0", "h1"):
        log = procs.procs[name].stderr_path.read_text(encoding="utf-8", errors="replace")  # type: ignore[union-attr]
        assert not _log_failures(log), (name, _log_failures(log)[:5])
    target_log = procs.log_tail("target", 10**8)
    assert target_log.count("bad message from") > 100, "the fuzz never reached the target's handlers"
    assert forged_hellos == 0 or target_log.count("wrong join token") >= 1, "forged Hellos must be refused"
    records = procs.records()
    summary = check_records(records, elems=elems)
    assert summary["parity_violations"] == 0 and summary["partial_commits"] == 0, summary
    assert summary["unrestored_buffers"] == 0 and summary["reference_mismatches"] == 0, summary
    after = [r for r in records if r.get("committed") and r["t"] > fuzz_t1 and len(r["members"]) == 3]
    during = [r for r in records if r.get("committed") and fuzz_t0 < r["t"] < fuzz_t1]
    assert after, "the honest swarm made no progress after the fuzzing"
    assert during, "the honest swarm made no progress during the fuzzing"
    growth = rss1 - rss0
    print(f"fuzz: {sent} messages, target RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB, "
          f"{len(during)} ops committed during, {len(after)} after")
    assert growth < 160 * 2**20, f"target memory grew by {growth / 2**20:.0f} MiB"


def test_generators_cover_every_message_type() -> None:
    rng = random.Random(1)
    tags = set()
    for _ in range(2000):
        frames = random_message(rng, 1, skip_tags=())
        tags.add(msgpack.unpackb(frames[0], raw=False, strict_map_key=False)[1])
    assert tags == {c.TAG for c in MESSAGE_CLASSES}
    assert Path(__file__).exists()
