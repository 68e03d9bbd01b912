"""Every message on the wire, and the one place they are encoded and decoded.

A message is a zmq multipart: ``[header]`` or ``[header, payload]``. The header is msgpack
``[VERSION, TAG, field0, field1, ...]`` — a flat array of scalars or flat arrays of scalars, never maps,
never nested deeper than two levels. Decoding is bounded (header size, string/bytes/array lengths) and
every field is type- and range-checked before a message object exists. Tensor payloads are raw bytes whose
dtype and element count travel in the header (``Chunk``) and are checked against the byte count. Nothing
from a peer is ever unpickled.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Union, get_type_hints

import msgpack

from collectives.errors import WireError
from collectives.wire_ids import ADDR_RE as ADDR_RE, GROUP_RE as GROUP_RE, PEER_ID_RE as PEER_ID_RE
from collectives.wire_ids import check_addr as check_addr, check_group as check_group
from collectives.wire_ids import check_peer_id as check_peer_id, clip as clip
from collectives.wire_ids import op_key as op_key, parse_op_key as parse_op_key

# Peers of different versions refuse each other's messages. 2: Stale carries refused_epoch. 3: a small
# all-reduce runs in one step (PHASE_DIRECT, ``ring.direct``): members must agree on which ops do.
VERSION = 3
MAX_HEADER_BYTES = 64 * 1024
MAX_STR = 1024
MAX_BYTES = 4096
MAX_ITEMS = 4096
MAX_INT = 2**63 - 1
MIN_INT = -(2**63)

# Collective phases carried by Chunk.
PHASE_REDUCE_SCATTER = 0
PHASE_ALL_GATHER = 1
PHASE_BROADCAST = 2
PHASE_P2P = 3
PHASE_DIRECT = 4  # a small all-reduce in one step: step = the sender's rank (``ring.DirectAllReduce``)
PHASES = (PHASE_REDUCE_SCATTER, PHASE_ALL_GATHER, PHASE_BROADCAST, PHASE_P2P, PHASE_DIRECT)


class Message:
    """Base class: subclasses are frozen dataclasses with a unique TAG."""

    TAG: ClassVar[int] = -1
    HAS_PAYLOAD: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            _check_value(type(self).__name__, f.name, _field_types(type(self))[f.name], getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Message-specific checks beyond field types (override)."""


_REGISTRY: dict[int, type[Message]] = {}
_TYPES: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    types = _TYPES.get(cls)
    if types is None:
        types = get_type_hints(cls)
        _TYPES[cls] = types
    return types


def register(cls: type[Message]) -> type[Message]:
    if cls.TAG in _REGISTRY:
        raise RuntimeError(f"duplicate wire tag {cls.TAG}")
    _REGISTRY[cls.TAG] = cls
    return cls


def _check_scalar(where: str, typ: type, value: Any) -> None:
    if typ is int:
        if type(value) is not int or not MIN_INT <= value <= MAX_INT:
            raise WireError(f"{where}: expected int, got {type(value).__name__}")
    elif typ is bool:
        if type(value) is not bool:
            raise WireError(f"{where}: expected bool, got {type(value).__name__}")
    elif typ is float:
        if type(value) is not float:
            raise WireError(f"{where}: expected float, got {type(value).__name__}")
    elif typ is str:
        if type(value) is not str or len(value) > MAX_STR or len(value.encode("utf-8", "surrogatepass")) > MAX_STR:
            raise WireError(f"{where}: expected str of at most {MAX_STR} UTF-8 bytes")
    elif typ is bytes:
        if type(value) is not bytes or len(value) > MAX_BYTES:
            raise WireError(f"{where}: expected bytes of at most {MAX_BYTES}")
    else:  # pragma: no cover - programming error in a message definition
        raise TypeError(f"unsupported wire type {typ}")


def _check_value(cls_name: str, name: str, typ: Any, value: Any) -> None:
    where = f"{cls_name}.{name}"
    origin = getattr(typ, "__origin__", None)
    if origin is tuple:
        item_type = typ.__args__[0]
        if type(value) is not tuple or len(value) > MAX_ITEMS:
            raise WireError(f"{where}: expected a tuple of at most {MAX_ITEMS} items")
        for item in value:
            _check_scalar(where, item_type, item)
    else:
        _check_scalar(where, typ, value)


def encode(msg: Message) -> bytes:
    """Header bytes of ``msg`` (payload frames travel separately)."""
    values = [getattr(msg, f.name) for f in dataclasses.fields(msg)]  # type: ignore[arg-type]
    raw = msgpack.packb([VERSION, msg.TAG, *[list(v) if isinstance(v, tuple) else v for v in values]],
                        use_bin_type=True)
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"{type(msg).__name__} header too large ({len(raw)} bytes)")
    return bytes(raw)


def decode(raw: Union[bytes, memoryview]) -> Message:
    """Parse and validate one header. Raises ``WireError`` on anything unexpected."""
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header too large ({len(raw)} bytes)")
    try:
        obj = msgpack.unpackb(
            raw, raw=False, use_list=True, strict_map_key=True,
            max_str_len=MAX_STR, max_bin_len=MAX_BYTES, max_array_len=MAX_ITEMS,
            max_map_len=0, max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise WireError(f"undecodable header: {exc}") from None
    if type(obj) is not list or len(obj) < 2:
        raise WireError("header is not [version, tag, ...]")
    if obj[0] != VERSION or type(obj[0]) is not int:
        raise WireError(f"unsupported wire version {obj[0]!r:.20}")
    cls = _REGISTRY.get(obj[1]) if type(obj[1]) is int else None
    if cls is None:
        raise WireError(f"unknown message tag {obj[1]!r:.20}")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if len(obj) - 2 != len(fields):
        raise WireError(f"{cls.__name__}: expected {len(fields)} fields, got {len(obj) - 2}")
    types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for f, value in zip(fields, obj[2:]):
        if type(value) is list:
            if getattr(types[f.name], "__origin__", None) is not tuple:
                raise WireError(f"{cls.__name__}.{f.name}: unexpected array")
            value = tuple(value)
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except WireError:
        raise
    except (TypeError, ValueError) as exc:
        raise WireError(f"{cls.__name__}: {exc}") from None


# ---------------------------------------------------------------- membership (peer <-> coordinator)

@register
@dataclass(frozen=True)
class Join(Message):
    """A peer asks to join; ``addr`` is where its own socket listens."""
    TAG = 1
    peer_id: str
    addr: str
    swarm: str

    def validate(self) -> None:
        check_peer_id(self.peer_id)
        check_addr(self.addr)


@register
@dataclass(frozen=True)
class Redirect(Message):
    """'I am not the coordinator; ask this one.'"""
    TAG = 2
    coord_id: str
    coord_addr: str

    def validate(self) -> None:
        check_peer_id(self.coord_id)
        check_addr(self.coord_addr)


@register
@dataclass(frozen=True)
class Welcome(Message):
    """Join accepted as *pending*; admission happens at the next topology update."""
    TAG = 3
    term: int
    epoch: int
    coord_id: str

    def validate(self) -> None:
        check_peer_id(self.coord_id)


@register
@dataclass(frozen=True)
class Heartbeat(Message):
    TAG = 4
    term: int
    epoch: int


@register
@dataclass(frozen=True)
class HeartbeatAck(Message):
    TAG = 5
    term: int
    epoch: int
    pending: int


@register
@dataclass(frozen=True)
class Stale(Message):
    """'You are not a member of my epoch (evicted, or your term is over): rejoin.'

    ``refused_epoch``: the epoch named by the message this answers, or -1 (it refuses a Join, or answers no
    one message). A joining or pending peer (epoch 0) ignores one above 0: it refuses a message of the
    peer's former membership, queued while it was cut off and delivered before its Join."""
    TAG = 6
    term: int
    epoch: int
    coord_id: str
    coord_addr: str
    reason: str
    refused_epoch: int = -1

    def validate(self) -> None:
        check_peer_id(self.coord_id)
        check_addr(self.coord_addr)


@register
@dataclass(frozen=True)
class Leave(Message):
    TAG = 7
    term: int
    epoch: int


@register
@dataclass(frozen=True)
class EpochUpdate(Message):
    """A new epoch: the ordered member list (the ring) and who coordinates it."""
    TAG = 8
    term: int
    epoch: int
    coord_id: str
    coord_addr: str
    member_ids: tuple[str, ...]
    member_addrs: tuple[str, ...]
    reason: str

    def validate(self) -> None:
        check_peer_id(self.coord_id)
        check_addr(self.coord_addr)
        if len(self.member_ids) != len(self.member_addrs):
            raise WireError("EpochUpdate: ids and addrs differ in length")
        if len(set(self.member_ids)) != len(self.member_ids):
            raise WireError("EpochUpdate: duplicate member")
        for pid, addr in zip(self.member_ids, self.member_addrs):
            check_peer_id(pid)
            check_addr(addr)


@register
@dataclass(frozen=True)
class TopologyVote(Message):
    TAG = 9
    term: int
    epoch: int


@register
@dataclass(frozen=True)
class TopologyDone(Message):
    """The vote for ``epoch`` completed; ``new_epoch`` is current (an EpochUpdate precedes it if changed)."""
    TAG = 10
    term: int
    epoch: int
    new_epoch: int


@register
@dataclass(frozen=True)
class OpDone(Message):
    """'My part of op (epoch, group, seq) is complete; my result digest is ...' (commit request)."""
    TAG = 11
    term: int
    epoch: int
    group: str
    seq: int
    digest: bytes
    members: tuple[str, ...]  # the group's ring (empty for the world group "w")

    def validate(self) -> None:
        _check_op(self.group, self.seq, self.members)


@register
@dataclass(frozen=True)
class OpFail(Message):
    """'Op (epoch, group, seq) cannot complete here' (deadline, bad input): asks for an abort verdict."""
    TAG = 12
    term: int
    epoch: int
    group: str
    seq: int
    reason: str
    members: tuple[str, ...]

    def validate(self) -> None:
        _check_op(self.group, self.seq, self.members)


@register
@dataclass(frozen=True)
class OpVerdict(Message):
    """The one verdict of an op. ``pending`` (joiners waiting) is identical for every member."""
    TAG = 13
    term: int
    epoch: int
    group: str
    seq: int
    commit: bool
    pending: int
    reason: str

    def validate(self) -> None:
        _check_op(self.group, self.seq, ())


@register
@dataclass(frozen=True)
class Suspect(Message):
    """'I lost my connection to / got garbage from this member.'"""
    TAG = 14
    term: int
    epoch: int
    suspect_id: str
    reason: str

    def validate(self) -> None:
        check_peer_id(self.suspect_id)


@register
@dataclass(frozen=True)
class Rejoin(Message):
    """Sent to the successor after the coordinator died: my view, and the verdicts I hold."""
    TAG = 15
    term: int
    last_epoch: int
    addr: str
    committed: tuple[str, ...]
    awaiting: tuple[str, ...]

    def validate(self) -> None:
        check_addr(self.addr)


# ---------------------------------------------------------------- collective data (peer <-> peer)

@register
@dataclass(frozen=True)
class Chunk(Message):
    """One slice of tensor data for op (epoch, group, seq); payload = ``count`` elements of ``dtype``."""
    TAG = 20
    HAS_PAYLOAD = True
    epoch: int
    group: str
    seq: int
    phase: int
    step: int
    part: int
    dtype: str
    count: int

    def validate(self) -> None:
        check_group(self.group)
        if self.phase not in PHASES:
            raise WireError(f"Chunk: unknown phase {self.phase}")
        if self.step < 0 or self.part < 0 or self.count < 0 or self.seq < 0:
            raise WireError("Chunk: negative index")


@register
@dataclass(frozen=True)
class P2PAck(Message):
    """Receiver confirms a point-to-point transfer (the sender's op completes on this)."""
    TAG = 21
    epoch: int
    group: str
    seq: int

    def validate(self) -> None:
        _check_op(self.group, self.seq, ())


# ---------------------------------------------------------------- link security (transport <-> transport)

@register
@dataclass(frozen=True)
class Hello(Message):
    """First message on every new link in secure mode: ``token`` = HMAC(swarm secret, sender's CURVE public
    key), proving that the key's holder knows the swarm secret (see ``collectives.security``). Consumed by
    the transport; the node never sees it."""
    TAG = 30
    token: bytes

    def validate(self) -> None:
        if len(self.token) != 32:
            raise WireError("Hello: token must have 32 bytes")


@register
@dataclass(frozen=True)
class DataOffer(Message):
    """Secure mode, on the CURVE control link: my frames to you are sealed under the key from my ephemeral
    X25519 key and yours (``collectives.aead``). ``DataAccept`` answers (on the answerer's own link) with its
    key and its data socket's port. Both are consumed by the transport."""
    TAG = 31
    key_id: int
    public: bytes
    cipher: str

    def validate(self) -> None:
        if not 0 <= self.key_id < 2**32 or len(self.public) != 32 or self.cipher not in ("aesgcm", "chacha20poly1305"):
            raise WireError("DataOffer: bad key id, key or cipher")


@register
@dataclass(frozen=True)
class DataAccept(Message):
    TAG = 32
    key_id: int
    public: bytes
    host: str  # where the data socket listens ("": the host of the answerer's address)
    port: int

    def validate(self) -> None:
        if not 0 <= self.key_id < 2**32 or len(self.public) != 32 or not 0 < self.port < 65536:
            raise WireError("DataAccept: bad key id, key or port")
        if self.host:
            check_addr(f"tcp://{self.host}:1")


@register
@dataclass(frozen=True)
class BwProbe(Message):
    """Part ``part`` of ``parts`` of a bandwidth probe (payload: filler bytes), sent after an epoch change."""
    TAG = 22
    HAS_PAYLOAD = True
    epoch: int
    part: int
    parts: int

    def validate(self) -> None:
        if not 0 <= self.part < self.parts <= 64:
            raise WireError("BwProbe: bad part numbers")


@register
@dataclass(frozen=True)
class BwReport(Message):
    """To the coordinator: measured bandwidth (bytes/s) from ``sender_id`` to me."""
    TAG = 23
    term: int
    epoch: int
    sender_id: str
    bytes_per_s: float

    def validate(self) -> None:
        check_peer_id(self.sender_id)
        if not 0.0 < self.bytes_per_s < 1e13:
            raise WireError("BwReport: implausible bandwidth")


def _check_op(group: str, seq: int, members: tuple[str, ...]) -> None:
    check_group(group)
    if seq < 0:
        raise WireError("negative op sequence number")
    for m in members:
        check_peer_id(m)
