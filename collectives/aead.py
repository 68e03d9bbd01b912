"""Sealed data frames for secure mode: tensor data on plain TCP, every frame AEAD-encrypted.

libzmq's CURVE moves ~0.24 GB/s per stream on this machine; AES-256-GCM from ``cryptography`` (AES-NI) runs
at ~2.8 GB/s per core. So in secure mode control messages stay on CURVE (authenticated, encrypted) and
tensor data travels on separate plain TCP connections, each frame sealed here. Nothing here is home-made
cryptography: X25519, HKDF-SHA256 and AES-256-GCM (ChaCha20-Poly1305 where the CPU lacks AES) all come
from ``cryptography``; this module only decides what gets bound to what.

Keys, per direction. The sender A picks a fresh ephemeral X25519 key and sends ``DataOffer(key_id, pub)``
to B over its CURVE link, where B's transport attributes it to A's authenticated key (ids are bound to
keys, ``collectives.security``). B answers with its own ephemeral key in ``DataAccept`` over *its* CURVE
link to A. Both derive ``HKDF(X25519(a, b), info = label | A | B | key_id | pubA | pubB)``: a key known
only to the two authenticated peers, used only for frames from A to B. Every new offer (a new link, a
reconnect, a restarted process) makes a new key, so a (key, nonce) pair is never used twice.

Frames. ``[prefix, sealed header, sealed payload]``; the prefix (plaintext) is ``key_id (4) | stream (4) |
counter (8)``. The header is sealed with nonce ``stream | 2c``, the payload with ``stream | 2c + 1``, and
the prefix is the associated data of both, so nothing can be cut, swapped or moved between frames. A
receiver accepts a frame only when both open under the sender's key, and only with a counter above the
last one it accepted on that stream: tampered, forged (unauthenticated), replayed and reordered frames
are refused. A gap (frames lost when a TCP connection dropped) is allowed; the ops that lost data abort
on the dropped connection (``data_lost``) as in the clear.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from collectives.errors import AuthError, LocalError

TAG_BYTES = 16
PREFIX = struct.Struct(">IIQ")  # key id, stream, frame counter
PREFIX_BYTES = PREFIX.size
MAX_COUNTER = 2**62             # far beyond any link's life; a sender past it must re-key
_LABEL = b"swarmtrain/v1/data-frames\0"


def _cipher_name() -> str:
    """AES-256-GCM where the CPU has AES instructions, else ChaCha20-Poly1305 (constant time in software)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read(1 << 16)
    except OSError:
        return "aesgcm"  # not Linux: OpenSSL picks its fastest AES code path
    return "aesgcm" if " aes " in flags or " aes\n" in flags else "chacha20poly1305"


CIPHER = _cipher_name()  # what this peer offers; the receiver of an offer uses the offered one
CIPHERS = ("aesgcm", "chacha20poly1305")


def _aead(key: bytes, cipher: str) -> Any:
    if cipher not in CIPHERS:
        raise AuthError(f"unknown data cipher {cipher!r:.40}")
    return AESGCM(key) if cipher == "aesgcm" else ChaCha20Poly1305(key)


def new_ephemeral() -> tuple[X25519PrivateKey, bytes]:
    priv = X25519PrivateKey.generate()
    return priv, priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive_key(priv: X25519PrivateKey, peer_public: bytes, sender: str, receiver: str, key_id: int,
               sender_public: bytes, receiver_public: bytes, cipher: str = CIPHER) -> bytes:
    """The key of frames from ``sender`` to ``receiver`` (both ends compute the same bytes)."""
    if len(peer_public) != 32:
        raise AuthError("an X25519 public key has 32 bytes")
    try:
        shared = priv.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:  # an all-zero shared secret (a low-order point): refuse
        raise AuthError("degenerate X25519 public key") from None
    info = b"".join([_LABEL, cipher.encode(), b"\0", sender.encode(), b"\0", receiver.encode(), b"\0",
                     key_id.to_bytes(4, "big"), sender_public, receiver_public])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _nonce(stream: int, counter: int) -> bytes:
    return stream.to_bytes(4, "big") + counter.to_bytes(8, "big")


@dataclass
class Sealer:
    """The sending end of one direction: seals frames with per-stream counters."""
    key_id: int
    key: bytes = field(repr=False)
    cipher: str = CIPHER
    counters: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._aead = _aead(self.key, self.cipher)

    def seal(self, stream: int, header: bytes, payload: Any) -> tuple[bytes, bytes, np.ndarray]:
        """(prefix, sealed header, sealed payload); the payload is read once, written once (encrypt_into)."""
        c = self.counters.get(stream, 0) + 1
        if c >= MAX_COUNTER:
            raise LocalError("data frame counter exhausted: re-key the link")
        self.counters[stream] = c
        prefix = PREFIX.pack(self.key_id, stream, c)
        sealed_header = self._aead.encrypt(_nonce(stream, 2 * c), header, prefix)
        mv = memoryview(payload).cast("B")
        out = np.empty(mv.nbytes + TAG_BYTES, np.uint8)  # not zero-filled: encrypt_into writes every byte
        self._aead.encrypt_into(_nonce(stream, 2 * c + 1), mv, prefix, out)
        return prefix, sealed_header, out


@dataclass
class Opener:
    """The receiving end of one direction: opens frames, refuses replays and reordering."""
    key_id: int
    key: bytes = field(repr=False)
    cipher: str = CIPHER
    last: dict[int, int] = field(default_factory=dict)  # stream -> last counter accepted
    max_streams: int = 64

    def __post_init__(self) -> None:
        self._aead = _aead(self.key, self.cipher)

    def open(self, prefix: bytes, sealed_header: Any, sealed_payload: Any,
             dest: Optional[Callable[[bytes, int], Any]] = None) -> tuple[bytes, Any]:
        """(header, payload) of an authentic, fresh frame; ``AuthError`` for anything else.

        ``dest(header, nbytes)``, called once the header is authentic, may name a writable buffer of exactly
        ``nbytes`` for the plaintext (where its reader wants it: no fresh allocation, no later copy); None
        means a fresh array. A payload that fails authentication may have left bytes in that buffer (the
        caller offers only buffers that no authentic data occupies yet)."""
        key_id, stream, c = parse_prefix(prefix)
        if key_id != self.key_id:
            raise AuthError("data frame under another key")
        if stream >= self.max_streams:
            raise AuthError(f"data frame on stream {stream} (at most {self.max_streams})")
        if c <= self.last.get(stream, 0):
            raise AuthError(f"replayed or reordered data frame (counter {c} after {self.last.get(stream, 0)})")
        mv = memoryview(sealed_payload).cast("B")
        if mv.nbytes < TAG_BYTES:
            raise AuthError("sealed payload shorter than its tag")
        try:
            header = self._aead.decrypt(_nonce(stream, 2 * c), bytes(sealed_header), prefix)
        except InvalidTag:
            raise AuthError("data frame fails authentication (tampered, or not from this peer)") from None
        nbytes = mv.nbytes - TAG_BYTES
        out: Any = dest(header, nbytes) if dest is not None else None
        if out is None:
            out = np.empty(nbytes, np.uint8)
        target = memoryview(out).cast("B")
        if target.nbytes != nbytes or target.readonly:
            raise LocalError(f"landing buffer of {target.nbytes} bytes for a {nbytes}-byte payload")
        try:
            self._aead.decrypt_into(_nonce(stream, 2 * c + 1), mv, prefix, target)
        except InvalidTag:
            raise AuthError("data frame fails authentication (tampered, or not from this peer)") from None
        self.last[stream] = c  # only an authentic frame moves the window (a forgery cannot block a stream)
        return header, out


def parse_prefix(prefix: Any) -> tuple[int, int, int]:
    raw = bytes(prefix)
    if len(raw) != PREFIX_BYTES:
        raise AuthError(f"data frame prefix of {len(raw)} bytes")
    key_id, stream, c = PREFIX.unpack(raw)
    return int(key_id), int(stream), int(c)


@dataclass
class Pending:
    """An offer we sent and whose answer has not come: the ephemeral private key waits here."""
    key_id: int
    priv: X25519PrivateKey
    public: bytes
    sent_at: float


def accept_offer(me: str, peer: str, key_id: int, peer_public: bytes,
                 cipher: str = CIPHER) -> tuple[Opener, bytes]:
    """Answer ``peer``'s offer: the opener for its frames to us, and our ephemeral public key to send back."""
    priv, public = new_ephemeral()
    key = derive_key(priv, peer_public, peer, me, key_id, peer_public, public, cipher)
    return Opener(key_id, key, cipher), public


def finish_offer(me: str, peer: str, pending: Pending, peer_public: bytes,
                 cipher: str = CIPHER) -> Sealer:
    """Our offer was accepted: the sealer for our frames to ``peer``."""
    key = derive_key(pending.priv, peer_public, me, peer, pending.key_id, pending.public, peer_public, cipher)
    return Sealer(pending.key_id, key, cipher)


__all__ = ["Sealer", "Opener", "Pending", "accept_offer", "finish_offer", "new_ephemeral", "parse_prefix",
           "CIPHER", "CIPHERS", "PREFIX_BYTES", "TAG_BYTES"]
