"""collectives.wire: peer ids, addresses, group ids, Chunk fields and op keys are validated."""

from __future__ import annotations

import dataclasses
import random
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectives import wire
from collectives.errors import WireError

from tests.unit.test_wire import ALL_VALID, MESSAGE_CLASSES, assert_wire_error, decode_or_wire_error, header, pack

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- ids, addresses, groups

BAD_PEER_IDS = ["", "x" * 65, "a b", "peer/1", "pe\ner", "\npeer", "\x00", "é", "peer@host", "a,b", " peer"]
BAD_ADDRS = ["", "127.0.0.1:5555", "http://h:1", "tcp://h", "tcp://h:", "tcp://h:123456", "tcp://h: 1",
             "tcp://h:1/x", "ipc:///tmp/sock", "inproc://x", "tcp://" + "h" * 300 + ":1", "\ntcp://h:1",
             "TCP://h:1", "tcp://h h:1"]
BAD_GROUPS = ["", "W", "g" * 41, "a-b", "a_b", "a:b", "g1 ", "é", "G0"]


@pytest.mark.parametrize("bad", BAD_PEER_IDS)
def test_invalid_peer_ids_are_rejected(bad: str) -> None:
    assert_wire_error(lambda: wire.Join(bad, "tcp://h:1", "s"))
    assert_wire_error(lambda: wire.Redirect(bad, "tcp://h:1"))
    assert_wire_error(lambda: wire.EpochUpdate(1, 1, "c", "tcp://h:1", ("ok", bad), ("tcp://h:1", "tcp://h:2"), ""))
    assert_wire_error(lambda: wire.check_peer_id(bad))
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Join.TAG, bad, "tcp://h:1", "s"])))


@pytest.mark.parametrize("bad", BAD_ADDRS)
def test_invalid_addresses_are_rejected(bad: str) -> None:
    assert_wire_error(lambda: wire.Join("p", bad, "s"))
    assert_wire_error(lambda: wire.Redirect("c", bad))
    assert_wire_error(lambda: wire.Rejoin(1, 1, bad, (), ()))
    assert_wire_error(lambda: wire.EpochUpdate(1, 1, "c", "tcp://h:1", ("a", "b"), ("tcp://h:1", bad), ""))
    assert_wire_error(lambda: wire.check_addr(bad))
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Redirect.TAG, "c", bad])))


@pytest.mark.parametrize("bad", BAD_GROUPS)
def test_invalid_group_ids_are_rejected(bad: str) -> None:
    assert_wire_error(lambda: wire.Chunk(1, bad, 0, 0, 0, 0, "float32", 1))
    assert_wire_error(lambda: wire.check_group(bad))
    raw = pack([wire.VERSION, wire.Chunk.TAG, 1, bad, 0, 0, 0, 0, "float32", 1])
    assert_wire_error(lambda: wire.decode(raw))


@pytest.mark.parametrize("kind", ["peer", "addr", "group", "join-decode"])
def test_trailing_newline_is_rejected(kind: str) -> None:
    if kind == "peer":
        assert_wire_error(lambda: wire.check_peer_id("peer\n"))
    elif kind == "addr":
        assert_wire_error(lambda: wire.check_addr("tcp://127.0.0.1:1\n"))
    elif kind == "group":
        assert_wire_error(lambda: wire.Chunk(1, "w\n", 0, 0, 0, 0, "float32", 1))
    else:
        assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Join.TAG, "p", "tcp://h:1\n", "s"])))


@pytest.mark.parametrize("good", ["a", "peer-1", "A.b:c_d-e", "x" * 64, "127.0.0.1:5000"])
def test_valid_peer_ids(good: str) -> None:
    assert wire.check_peer_id(good) == good
    assert wire.decode(wire.encode(wire.Join(good, "tcp://h:1", "s"))).peer_id == good


@pytest.mark.parametrize("good", ["tcp://h:1", "tcp://127.0.0.1:65535", "tcp://[::1]:5555", "tcp://a-b.c_d:0"])
def test_valid_addresses(good: str) -> None:
    assert wire.check_addr(good) == good


def test_check_functions_reject_non_strings() -> None:
    for fn in (wire.check_peer_id, wire.check_addr, wire.check_group):
        for bad in (None, 1, b"peer", ["peer"]):
            assert_wire_error(lambda: fn(bad))  # type: ignore[arg-type]


def test_epoch_update_consistency() -> None:
    assert_wire_error(lambda: wire.EpochUpdate(1, 1, "c", "tcp://h:1", ("a", "b"), ("tcp://h:1",), ""))
    assert_wire_error(lambda: wire.EpochUpdate(1, 1, "c", "tcp://h:1", ("a", "a"), ("tcp://h:1", "tcp://h:2"), ""))
    raw = pack([wire.VERSION, wire.EpochUpdate.TAG, 1, 1, "c", "tcp://h:1", ["a", "a"], ["tcp://h:1"] * 2, ""])
    assert_wire_error(lambda: wire.decode(raw))
    ok = wire.EpochUpdate(1, 1, "c", "tcp://h:1", (), (), "empty")
    assert wire.decode(wire.encode(ok)) == ok


@pytest.mark.parametrize("kind", ["epoch-addr", "epoch-id", "stale-addr", "stale-id"])
def test_coordinator_address_in_epoch_update_and_stale_is_validated(kind: str) -> None:
    if kind == "epoch-addr":
        assert_wire_error(lambda: wire.EpochUpdate(1, 1, "c", "bogus", ("a",), ("tcp://h:1",), ""))
    elif kind == "epoch-id":
        assert_wire_error(lambda: wire.EpochUpdate(1, 1, "bad id", "tcp://h:1", ("a",), ("tcp://h:1",), ""))
    elif kind == "stale-addr":
        assert_wire_error(lambda: wire.Stale(1, 1, "c", "bogus", "r"))
    else:
        assert_wire_error(lambda: wire.Stale(1, 1, "bad id", "tcp://h:1", "r"))


# ---------------------------------------------------------------- Chunk


@pytest.mark.parametrize("field", ["seq", "step", "part", "count"])
@pytest.mark.parametrize("value", [-1, -(2**63)])
def test_chunk_negative_index_is_rejected(field: str, value: int) -> None:
    kwargs = dict(epoch=1, group="w", seq=0, phase=0, step=0, part=0, dtype="float32", count=1)
    kwargs[field] = value
    assert_wire_error(lambda: wire.Chunk(**kwargs))  # type: ignore[arg-type]
    raw = pack([wire.VERSION, wire.Chunk.TAG, *kwargs.values()])
    assert_wire_error(lambda: wire.decode(raw))


@pytest.mark.parametrize("phase", [-1, 5, 6, 99, 2**63 - 1, -(2**63)])
def test_chunk_unknown_phase_is_rejected(phase: int) -> None:
    assert phase not in wire.PHASES
    assert_wire_error(lambda: wire.Chunk(1, "w", 0, phase, 0, 0, "float32", 1))
    raw = pack([wire.VERSION, wire.Chunk.TAG, 1, "w", 0, phase, 0, 0, "float32", 1])
    assert_wire_error(lambda: wire.decode(raw))


@pytest.mark.parametrize("phase", wire.PHASES)
def test_chunk_every_phase_round_trips(phase: int) -> None:
    msg = wire.Chunk(3, "g0123456789abcdef0123", 9, phase, 2, 1, "bfloat16", 1000)
    assert wire.decode(wire.encode(msg)) == msg


# ---------------------------------------------------------------- op keys


def test_op_key_round_trip() -> None:
    assert wire.parse_op_key(wire.op_key(3, "w", 7)) == (3, "w", 7)
    assert wire.parse_op_key(wire.op_key(-1, "gabc", 0)) == (-1, "gabc", 0)
    for bad in ["", "1", "1:w", "1:w:2:3", "a:w:1", "1:w:b", "1::", ":w:1"]:
        assert_wire_error(lambda: wire.parse_op_key(bad))


# ---------------------------------------------------------------- fuzzing


def test_random_bytes_seeded() -> None:
    rnd = random.Random(1234)
    for _ in range(3000):
        raw = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 64)))
        decode_or_wire_error(raw)
    # random bytes behind a plausible prefix (array header, version, tag) reach the field checks
    for _ in range(3000):
        cls = rnd.choice(MESSAGE_CLASSES)
        n = len(dataclasses.fields(cls))
        prefix = bytes([0x90 | (n + 2)]) + pack(wire.VERSION) + pack(cls.TAG)
        raw = prefix + bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 48)))
        decode_or_wire_error(raw)


def test_mutated_valid_messages_seeded() -> None:
    rnd = random.Random(99)
    raws = [wire.encode(m) for m in ALL_VALID if len(wire.encode(m)) < 2000]
    for _ in range(4000):
        raw = bytearray(rnd.choice(raws))
        for _ in range(rnd.randrange(1, 4)):
            kind = rnd.randrange(3)
            pos = rnd.randrange(len(raw))
            if kind == 0:
                raw[pos] = rnd.getrandbits(8)
            elif kind == 1:
                del raw[pos]
            else:
                raw.insert(pos, rnd.getrandbits(8))
            if not raw:
                break
        decode_or_wire_error(bytes(raw))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_decode_arbitrary_bytes(raw: bytes) -> None:
    decode_or_wire_error(raw)


_scalars = (st.integers(min_value=-(2**64) + 1, max_value=2**64 - 1) | st.booleans() | st.none()
            | st.floats(allow_nan=True) | st.text(max_size=40) | st.binary(max_size=40))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=6)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tag=st.sampled_from([c.TAG for c in MESSAGE_CLASSES] + [0, 99]),
       fields=st.lists(_values, max_size=10),
       version=st.sampled_from([wire.VERSION, wire.VERSION, 0, wire.VERSION - 1, wire.VERSION + 1]))
def test_decode_structured_fuzz(tag: int, fields: list, version: int) -> None:
    """Well-formed msgpack arrays with random field values: a Message or WireError, nothing else."""
    try:
        raw = pack([version, tag, *fields])
    except (OverflowError, ValueError, TypeError):
        return
    decode_or_wire_error(raw)


@settings(max_examples=100, deadline=None)
@given(cls=st.sampled_from(MESSAGE_CLASSES), data=st.data())
def test_decode_fuzz_one_field(cls: type, data: st.DataObject) -> None:
    """A valid header with exactly one field replaced by an arbitrary value."""
    obj = header(cls)
    idx = data.draw(st.integers(0, len(obj) - 1))
    obj[idx] = data.draw(_values)
    try:
        raw = pack(obj)
    except (OverflowError, ValueError, TypeError):
        return
    decode_or_wire_error(raw)


@settings(max_examples=150, deadline=None)
@given(term=st.integers(wire.MIN_INT, wire.MAX_INT), epoch=st.integers(wire.MIN_INT, wire.MAX_INT),
       seq=st.integers(0, wire.MAX_INT), commit=st.booleans(), text=st.text(max_size=wire.MAX_STR // 4),
       digest=st.binary(max_size=wire.MAX_BYTES),
       members=st.lists(st.from_regex(wire.PEER_ID_RE, fullmatch=True), max_size=20).map(tuple))
def test_round_trip_property(term: int, epoch: int, seq: int, commit: bool, text: str, digest: bytes,
                             members: tuple) -> None:
    for msg in (wire.Suspect(term, epoch, "peer-1", text),
                wire.OpVerdict(term, epoch, "w", seq, commit, epoch, text),
                wire.OpDone(term, epoch, "gabc", seq, digest, members)):
        back = wire.decode(wire.encode(msg))
        assert back == msg and type(back) is type(msg)
