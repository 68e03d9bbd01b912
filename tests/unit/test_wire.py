"""collectives.wire: every message round-trips; anything malformed is refused with WireError (and only that)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

import msgpack
import pytest

from collectives import wire
from collectives.errors import WireError

pytestmark = pytest.mark.timeout(60)

MESSAGE_CLASSES = sorted(wire._REGISTRY.values(), key=lambda c: c.TAG)

PEER_FIELDS = {"peer_id", "coord_id", "suspect_id", "sender_id"}
ADDR_FIELDS = {"addr", "coord_addr"}
GROUP_FIELDS = {"group"}


# ---------------------------------------------------------------- helpers


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_tuple(typ: Any) -> bool:
    return getattr(typ, "__origin__", None) is tuple


def sample_value(cls: type, name: str, typ: Any, variant: int = 0) -> Any:
    """A valid value for field ``name`` of ``cls`` (variant 0: ordinary, 1: extremes/edge values)."""
    if is_tuple(typ):
        if name == "member_ids":
            return ("peer-a", "b.1", "C:2") if variant == 0 else tuple(f"p{i}" for i in range(50))
        if name == "member_addrs":
            return (("tcp://127.0.0.1:5000", "tcp://host-b:1", "tcp://[::1]:65535") if variant == 0
                    else tuple(f"tcp://10.0.0.{i}:{4000 + i}" for i in range(50)))
        if name == "members":
            return ("peer-a", "peer-b") if variant == 0 else ()
        return ("1:w:3", "2:gabc:0") if variant == 0 else ()
    if typ is bool:
        return variant == 0
    if typ is bytes:
        if cls in (wire.Hello, wire.DataOffer, wire.DataAccept):  # a 32-byte HMAC token / X25519 key
            return bytes(32) if variant == 0 else b"\xff" * 32
        return b"\x00\x01\xff" if variant == 0 else bytes(range(256)) * 16  # exactly MAX_BYTES
    if typ is float:
        return 1e6 if variant == 0 else 5.0
    if typ is int:
        if cls is wire.BwProbe and name in ("part", "parts"):
            return {("part", 0): 1, ("parts", 0): 8, ("part", 1): 0, ("parts", 1): 64}[(name, variant)]
        if cls is wire.Chunk and name == "phase":
            return wire.PHASE_ALL_GATHER if variant == 0 else wire.PHASE_P2P
        if cls is wire.Chunk and name in ("step", "part", "count", "seq"):
            return 3 if variant == 0 else wire.MAX_INT
        if name == "seq":
            return 5 if variant == 0 else 0
        if cls in (wire.DataOffer, wire.DataAccept) and name in ("key_id", "port"):
            return 7 if variant == 0 else (2**32 - 1 if name == "key_id" else 65535)
        return 7 if variant == 0 else (wire.MIN_INT if name == "epoch" else wire.MAX_INT)
    if typ is str:
        if name in PEER_FIELDS:
            return "peer-1" if variant == 0 else "x" * 64
        if cls is wire.DataAccept and name == "host":
            return "127.0.0.1" if variant == 0 else ""
        if name in ADDR_FIELDS:
            return "tcp://127.0.0.1:5555" if variant == 0 else "tcp://[fe80::1]:1"
        if name in GROUP_FIELDS:
            return "w" if variant == 0 else "g" + "0" * 39
        if name == "dtype":
            return "float32"
        if name == "swarm":
            return "my swarm" if variant == 0 else ""
        if name == "cipher":
            return "aesgcm" if variant == 0 else "chacha20poly1305"
        return "some reason" if variant == 0 else "r" * wire.MAX_STR
    raise AssertionError(f"no sample for {cls.__name__}.{name}: {typ}")


def sample(cls: type, variant: int = 0, **override: Any) -> wire.Message:
    kwargs = {f.name: sample_value(cls, f.name, field_types(cls)[f.name], variant)
              for f in dataclasses.fields(cls)}
    kwargs.update(override)
    return cls(**kwargs)


def header(cls: type, variant: int = 0) -> list[Any]:
    """The decoded msgpack list of a valid message of ``cls`` (to be mutated by tests)."""
    return msgpack.unpackb(wire.encode(sample(cls, variant)), raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def assert_wire_error(fn: Callable[[], Any]) -> WireError:
    """``fn`` must raise WireError; any other exception type fails the test (as an error, with traceback)."""
    try:
        result = fn()
    except WireError as exc:
        return exc
    raise AssertionError(f"expected WireError, got a result: {result!r:.200}")


def decode_or_wire_error(raw: bytes) -> None:
    """The decode contract: a Message, or WireError. Anything else propagates and fails the test."""
    try:
        msg = wire.decode(raw)
    except WireError:
        return
    assert isinstance(msg, wire.Message)
    assert type(msg) in wire._REGISTRY.values()
    # whatever decodes must re-encode to an equivalent message
    assert wire.decode(wire.encode(msg)) == msg


ALL_VALID = [sample(cls, v) for cls in MESSAGE_CLASSES for v in (0, 1)]
ALL_VALID_IDS = [f"{type(m).__name__}-{i % 2}" for i, m in enumerate(ALL_VALID)]


# ---------------------------------------------------------------- round trips


def test_registry_is_consistent() -> None:
    assert len(wire._REGISTRY) >= 17
    for tag, cls in wire._REGISTRY.items():
        assert cls.TAG == tag
        assert issubclass(cls, wire.Message)
        assert dataclasses.is_dataclass(cls)
    assert [c for c in MESSAGE_CLASSES if c.HAS_PAYLOAD] == [wire.Chunk, wire.BwProbe]


def test_duplicate_tag_registration_is_refused() -> None:
    @dataclasses.dataclass(frozen=True)
    class Dup(wire.Message):
        TAG = wire.Heartbeat.TAG
        term: int

    with pytest.raises(RuntimeError):
        wire.register(Dup)
    assert wire._REGISTRY[wire.Heartbeat.TAG] is wire.Heartbeat


@pytest.mark.parametrize("msg", ALL_VALID, ids=ALL_VALID_IDS)
def test_round_trip_every_message(msg: wire.Message) -> None:
    raw = wire.encode(msg)
    assert isinstance(raw, bytes)
    assert len(raw) <= wire.MAX_HEADER_BYTES
    back = wire.decode(raw)
    assert type(back) is type(msg)
    assert back == msg
    for f in dataclasses.fields(msg):
        a, b = getattr(msg, f.name), getattr(back, f.name)
        assert type(a) is type(b), f.name
    assert wire.encode(back) == raw
    # a zero-copy frame (memoryview) decodes the same
    assert wire.decode(memoryview(raw)) == msg
    assert wire.decode(bytearray(raw)) == msg
    # the header is [VERSION, TAG, fields...]
    obj = msgpack.unpackb(raw, raw=False)
    assert obj[0] == wire.VERSION and obj[1] == msg.TAG and len(obj) == 2 + len(dataclasses.fields(msg))


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_messages_are_frozen(cls: type) -> None:
    msg = sample(cls)
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, name, getattr(msg, name))


def test_round_trip_unicode_strings() -> None:
    msg = wire.Stale(1, 2, "coord", "tcp://h:1", "naïve — 日本語 ✓")
    assert wire.decode(wire.encode(msg)) == msg


def test_string_limit_counts_utf8_bytes_on_both_sides() -> None:
    assert_wire_error(lambda: wire.Suspect(1, 2, "peer-1", "é" * 600))  # 600 chars, 1200 UTF-8 bytes
    msg = wire.Suspect(1, 2, "peer-1", "é" * 512)  # exactly 1024 bytes
    assert wire.decode(wire.encode(msg)) == msg
    clipped = wire.clip("é" * 600)
    assert len(clipped.encode()) <= 500 and wire.Suspect(1, 2, "p", clipped).reason == clipped


# ---------------------------------------------------------------- truncation, size, framing


@pytest.mark.parametrize("msg", ALL_VALID, ids=ALL_VALID_IDS)
def test_every_prefix_is_rejected(msg: wire.Message) -> None:
    raw = wire.encode(msg)
    step = 1 if len(raw) < 600 else 7  # the big variants: every 7th prefix plus the last few
    cuts = set(range(0, len(raw), step)) | set(range(max(0, len(raw) - 16), len(raw)))
    for i in sorted(cuts):
        assert_wire_error(lambda: wire.decode(raw[:i]))


@pytest.mark.parametrize("msg", ALL_VALID[::3], ids=ALL_VALID_IDS[::3])
def test_trailing_bytes_are_rejected(msg: wire.Message) -> None:
    raw = wire.encode(msg)
    for extra in (b"\x00", b"\xc0", raw):
        assert_wire_error(lambda: wire.decode(raw + extra))


def test_empty_header_is_rejected() -> None:
    assert_wire_error(lambda: wire.decode(b""))
    assert_wire_error(lambda: wire.decode(memoryview(b"")))


def test_oversized_header_is_rejected() -> None:
    assert_wire_error(lambda: wire.decode(b"\x00" * (wire.MAX_HEADER_BYTES + 1)))
    # a well-formed msgpack header that is just too big
    ids = [f"p{i:05d}" + "x" * 50 for i in range(1200)]
    big = pack([wire.VERSION, wire.EpochUpdate.TAG, 1, 1, "c", "tcp://h:1", ids, ["tcp://h:1"] * 1200, "r"])
    assert len(big) > wire.MAX_HEADER_BYTES
    assert_wire_error(lambda: wire.decode(big))


def test_encode_refuses_an_oversized_header() -> None:
    n = 2000
    msg = wire.EpochUpdate(1, 1, "c", "tcp://h:1", tuple(f"p{i:05d}" + "x" * 50 for i in range(n)),
                           tuple(f"tcp://host-{i:05d}.example:{i + 1}" for i in range(n)), "big")
    assert_wire_error(lambda: wire.encode(msg))


# ---------------------------------------------------------------- version, tag, field count


@pytest.mark.parametrize("version", [0, 1, 2, 4, -1, 255, 2**63 - 1, True, False, 3.0, "3", b"\x03", None, [3], {}])
def test_wrong_version_is_rejected(version: Any) -> None:
    obj = header(wire.Heartbeat)
    obj[0] = version
    assert_wire_error(lambda: wire.decode(pack(obj)))


UNKNOWN_TAGS = [0, -1, 16, 17, 18, 19, 29, 99, 2**32, 2**63 - 1, -(2**63), 2**64 - 1]


@pytest.mark.parametrize("tag", UNKNOWN_TAGS + [True, 1.0, 20.0, "20", b"\x14", None, [20], {}])
def test_unknown_tag_is_rejected(tag: Any) -> None:
    if type(tag) is int:
        assert tag not in wire._REGISTRY
    obj = header(wire.Heartbeat)
    obj[1] = tag
    assert_wire_error(lambda: wire.decode(pack(obj)))


@pytest.mark.parametrize("raw_obj", [[], [1], [wire.VERSION], ["x"], [None, None]])
def test_too_short_header_is_rejected(raw_obj: list) -> None:
    assert_wire_error(lambda: wire.decode(pack(raw_obj)))


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_wrong_field_count_is_rejected(cls: type) -> None:
    obj = header(cls)
    n = len(dataclasses.fields(cls))
    for k in range(0, n):
        assert_wire_error(lambda: wire.decode(pack(obj[:2 + k])))
    for extra in ([0], ["x"], [0, 0]):
        assert_wire_error(lambda: wire.decode(pack(obj + extra)))


@pytest.mark.parametrize("top", [1, "x", b"x", None, True, 1.5, {}, {"a": 1}, {1: 2}])
def test_non_list_header_is_rejected(top: Any) -> None:
    assert_wire_error(lambda: wire.decode(pack(top)))


# ---------------------------------------------------------------- field types


WRONG_FOR = {
    int: ["1", True, False, 1.0, float("nan"), None, b"\x01", [1], {}, {"a": 1}, 2**64 - 1],
    str: [1, 0, True, b"peer-1", None, 1.5, ["peer-1"], {}, {"a": "b"}],
    bool: [1, 0, "true", b"\x01", None, 1.0, [True], {}],
    bytes: ["abc", 1, True, None, [1, 2], {}, 0.5],
    float: [1, True, "1.0", None, b"\x01", [1.0], {}],
}
WRONG_FOR_TUPLE = ["peer-1", 1, True, None, b"ab", {}, {"a": 1}, [1], [True], [None], [b"x"], [["peer-1"]],
                   [[]], ["ok", ["nested"]], [{"a": 1}]]


def _type_cases() -> list[tuple[type, int, Any]]:
    cases = []
    for cls in MESSAGE_CLASSES:
        types = field_types(cls)
        for idx, f in enumerate(dataclasses.fields(cls)):
            typ = types[f.name]
            bad = WRONG_FOR_TUPLE if is_tuple(typ) else WRONG_FOR[typ]
            for value in bad:
                cases.append((cls, idx, value))
    return cases


TYPE_CASES = _type_cases()


@pytest.mark.parametrize("cls,idx,value", TYPE_CASES,
                         ids=[f"{c.__name__}-{i}-{type(v).__name__}{n}" for n, (c, i, v) in enumerate(TYPE_CASES)])
def test_wrong_field_type_is_rejected(cls: type, idx: int, value: Any) -> None:
    obj = header(cls)
    obj[2 + idx] = value
    assert_wire_error(lambda: wire.decode(pack(obj)))


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: c.__name__)
def test_nested_array_where_scalar_expected_is_rejected(cls: type) -> None:
    obj = header(cls)
    types = field_types(cls)
    for idx, f in enumerate(dataclasses.fields(cls)):
        mutated = list(obj)
        if is_tuple(types[f.name]):
            mutated[2 + idx] = [list(obj[2 + idx])] if obj[2 + idx] else [[]]
        else:
            mutated[2 + idx] = [obj[2 + idx]]
        assert_wire_error(lambda: wire.decode(pack(mutated)))


def test_bool_does_not_pass_as_int() -> None:
    assert_wire_error(lambda: wire.Heartbeat(True, 1))
    assert_wire_error(lambda: wire.Heartbeat(1, False))
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Heartbeat.TAG, True, 1])))
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Chunk.TAG, 1, "w", 0, True, 0, 0, "float32", 1])))
    # ...and an int does not pass as a bool
    assert_wire_error(lambda: wire.OpVerdict(1, 1, "w", 0, 1, 0, ""))  # type: ignore[arg-type]
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.OpVerdict.TAG, 1, 1, "w", 0, 1, 0, ""])))


def test_int_range_is_checked() -> None:
    ok = wire.Heartbeat(wire.MAX_INT, wire.MIN_INT)
    assert wire.decode(wire.encode(ok)) == ok
    assert_wire_error(lambda: wire.Heartbeat(wire.MAX_INT + 1, 0))
    assert_wire_error(lambda: wire.Heartbeat(0, wire.MIN_INT - 1))
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Heartbeat.TAG, 2**64 - 1, 0])))
    assert_wire_error(lambda: wire.decode(pack([wire.VERSION, wire.Heartbeat.TAG, 2**63, 0])))


def test_constructor_rejects_wrong_python_types() -> None:
    assert_wire_error(lambda: wire.Heartbeat("1", 2))  # type: ignore[arg-type]
    assert_wire_error(lambda: wire.Heartbeat(1.0, 2))  # type: ignore[arg-type]
    assert_wire_error(lambda: wire.Welcome(1, 2, b"coord"))  # type: ignore[arg-type]
    assert_wire_error(lambda: wire.OpDone(1, 1, "w", 0, "digest", ()))  # type: ignore[arg-type]
    assert_wire_error(lambda: wire.OpDone(1, 1, "w", 0, b"d", ["a"]))  # type: ignore[arg-type]  # list, not tuple
    assert_wire_error(lambda: wire.OpDone(1, 1, "w", 0, b"d", ("a", 1)))  # type: ignore[arg-type]
    assert_wire_error(lambda: wire.OpDone(1, 1, "w", 0, bytearray(b"d"), ()))  # type: ignore[arg-type]


# ---------------------------------------------------------------- limits


def test_string_limit() -> None:
    ok = wire.Suspect(1, 1, "p", "a" * wire.MAX_STR)
    assert wire.decode(wire.encode(ok)) == ok
    assert_wire_error(lambda: wire.Suspect(1, 1, "p", "a" * (wire.MAX_STR + 1)))
    raw = pack([wire.VERSION, wire.Suspect.TAG, 1, 1, "p", "a" * (wire.MAX_STR + 1)])
    assert_wire_error(lambda: wire.decode(raw))
    # an over-long string in a field the message does not even have a use for
    raw = pack([wire.VERSION, wire.Heartbeat.TAG, 1, "a" * 5000])
    assert_wire_error(lambda: wire.decode(raw))


def test_bytes_limit() -> None:
    ok = wire.OpDone(1, 1, "w", 0, b"\x01" * wire.MAX_BYTES, ())
    assert wire.decode(wire.encode(ok)) == ok
    assert_wire_error(lambda: wire.OpDone(1, 1, "w", 0, b"\x01" * (wire.MAX_BYTES + 1), ()))
    raw = pack([wire.VERSION, wire.OpDone.TAG, 1, 1, "w", 0, b"\x01" * (wire.MAX_BYTES + 1), []])
    assert_wire_error(lambda: wire.decode(raw))


def test_array_limit() -> None:
    ok = wire.OpDone(1, 1, "w", 0, b"", tuple("p" for _ in range(wire.MAX_ITEMS)))
    assert wire.decode(wire.encode(ok)) == ok
    assert_wire_error(lambda: wire.OpDone(1, 1, "w", 0, b"", tuple("p" for _ in range(wire.MAX_ITEMS + 1))))
    raw = pack([wire.VERSION, wire.OpDone.TAG, 1, 1, "w", 0, b"", ["p"] * (wire.MAX_ITEMS + 1)])
    assert_wire_error(lambda: wire.decode(raw))
    # the header array itself
    raw = pack([wire.VERSION, wire.Heartbeat.TAG] + [0] * (wire.MAX_ITEMS + 1))
    assert_wire_error(lambda: wire.decode(raw))


def test_strings_inside_arrays_are_limited() -> None:
    raw = pack([wire.VERSION, wire.OpDone.TAG, 1, 1, "w", 0, b"", ["a" * (wire.MAX_STR + 1)]])
    assert_wire_error(lambda: wire.decode(raw))


# ---------------------------------------------------------------- maps, ext types, nesting


@pytest.mark.parametrize("raw", [
    pack({}),
    pack({"version": 1, "tag": 4}),
    pack([wire.VERSION, wire.Heartbeat.TAG, {"a": 1}, 1]),
    pack([wire.VERSION, wire.Heartbeat.TAG, {}, 1]),
    pack([wire.VERSION, wire.OpDone.TAG, 1, 1, "w", 0, b"", [{}]]),
    pack([wire.VERSION, wire.OpDone.TAG, 1, 1, "w", 0, b"", {"a": "b"}]),
    b"\x80",  # fixmap, 0 entries
    b"\x81\xa1a\x01",  # fixmap, 1 entry
    b"\xde\xff\xff",  # map16 with 65535 entries, truncated
    b"\xdf\xff\xff\xff\xff",  # map32, huge, truncated
    b"\x81\x91\x01\x01",  # map with an array as key
], ids=lambda r: r[:12].hex())
def test_msgpack_maps_are_rejected(raw: bytes) -> None:
    assert_wire_error(lambda: wire.decode(raw))


@pytest.mark.parametrize("raw", [
    pack(msgpack.ExtType(5, b"abc")),
    pack([wire.VERSION, wire.Heartbeat.TAG, msgpack.ExtType(1, b"\x00" * 8), 1]),
    b"\x94\x01\x04\xd6\xff\x00\x00\x00\x00\x01",  # a timestamp ext where an int is expected
    b"\x94\x01\x04\xc7\x00\x05\x01",  # ext8 of length 0
    b"\x94\x01\x04\xc1\x01",  # 0xc1 is never used
], ids=lambda r: r[:12].hex())
def test_ext_types_and_reserved_bytes_are_rejected(raw: bytes) -> None:
    assert_wire_error(lambda: wire.decode(raw))


@pytest.mark.parametrize("depth", [3, 100, 1000, 10000])
def test_deeply_nested_lists_are_rejected_without_crash(depth: int) -> None:
    nested = b"\x91" * depth + b"\x01"  # [[[...[1]...]]]
    assert_wire_error(lambda: wire.decode(nested))
    # nested where a field should be
    prefix = bytes([0x94]) + pack(wire.VERSION) + pack(wire.Heartbeat.TAG)
    assert_wire_error(lambda: wire.decode(prefix + nested + b"\x01"))
    # nested inside a tuple field
    prefix = bytes([0x98]) + b"".join(pack(v) for v in [wire.VERSION, wire.OpDone.TAG, 1, 1, "w", 0, b""])
    assert_wire_error(lambda: wire.decode(prefix + b"\x91" + nested))
    # nested maps
    assert_wire_error(lambda: wire.decode(b"\x81\x00" * depth + b"\x01"))


def test_deeply_nested_list_from_msgpack_packer() -> None:
    """Build the depth-10000 list with msgpack's own Packer (array headers), not a hand-written prefix."""
    packer = msgpack.Packer()
    raw = b"".join(packer.pack_array_header(1) for _ in range(10000)) + packer.pack(None)
    assert_wire_error(lambda: wire.decode(raw))
