"""Key material: a peer's long-lived key pair, the swarm secret, allowlists, and what is derived from them.

Files are small text files, created with mode 0600 (and refused when group/other can read them):

- peer key (``swarmtrain keygen --key FILE``, or created on first run)::

      # swarmtrain peer key: keep private
      public <64 hex>
      secret <64 hex>

- swarm secret (``swarmtrain keygen --secret FILE``): 32 random bytes as 64 hex digits. Whoever holds the
  file may join the swarm; copy it to every machine over a channel you trust (scp).
- allowlist (optional, not secret): one peer per line, ``<64 hex public key> [peer id]``; ``#`` comments.
  A line with an id pins that id to that key.

Keys are X25519 (Curve25519) keys made with ``cryptography``; they are exactly ZeroMQ CURVE keys.
From the secret we derive (HKDF-SHA256, distinct labels) the swarm's CURVE *server* key pair, which every
peer's listening socket uses, so that a joiner needs nothing but the secret and an address; and a MAC key
for ``hello_token``, which proves that a peer's own key belongs to someone holding the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets as _secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from collectives.errors import LocalError

KEY_BYTES = 32
_HEX64 = re.compile(r"[0-9a-f]{64}")
PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class KeyPair:
    public: bytes                      # 32 raw bytes
    secret: bytes = field(repr=False)  # 32 raw bytes; never printed


def keypair_from_secret(secret: bytes) -> KeyPair:
    """The key pair whose private half is ``secret`` (32 bytes; X25519 clamps it)."""
    if len(secret) != KEY_BYTES:
        raise LocalError("a CURVE secret key has 32 bytes")
    priv = X25519PrivateKey.from_private_bytes(secret)
    pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KeyPair(pub, secret)


def generate_keypair() -> KeyPair:
    priv = X25519PrivateKey.generate()
    raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return keypair_from_secret(raw)


def _derive(secret: bytes, label: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"swarmtrain/v1/" + label).derive(secret)


def server_keypair(swarm_secret: bytes) -> KeyPair:
    """The CURVE server key pair every listening socket of the swarm uses (derived from the secret)."""
    return keypair_from_secret(_derive(swarm_secret, b"server-key"))


def hello_token(swarm_secret: bytes, public: bytes) -> bytes:
    """HMAC proving that the holder of ``public`` knows the swarm secret. It is bound to the key, so a
    copied token is useless to anyone who cannot complete a CURVE handshake with that key."""
    return hmac.new(_derive(swarm_secret, b"hello-mac"), b"hello\0" + public, hashlib.sha256).digest()


def check_token(swarm_secret: bytes, public: bytes, token: bytes) -> bool:
    return hmac.compare_digest(hello_token(swarm_secret, public), token)


def new_secret() -> bytes:
    return _secrets.token_bytes(KEY_BYTES)


# ---------------------------------------------------------------- files

def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 (never overwrite); create its directory with mode 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
        os.link(tmp, path)  # fails if path exists: never clobber a key
    except FileExistsError:
        raise LocalError(f"{path} already exists; refusing to overwrite it") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_private(path: Path, what: str) -> list[str]:
    try:
        st = path.stat()
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise LocalError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalError(f"cannot read {what} file {path}: {exc}") from None
    if st.st_mode & 0o077:
        raise LocalError(f"{what} file {path} is readable by others (mode {st.st_mode & 0o777:o}); "
                         f"run: chmod 600 {path}")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _hex_key(value: str, where: str) -> bytes:
    if not _HEX64.fullmatch(value):
        raise LocalError(f"{where}: expected 64 lowercase hex digits")
    return bytes.fromhex(value)


def save_keypair(path: PathLike, kp: KeyPair) -> None:
    _write_private(Path(path).expanduser(), "# swarmtrain peer key: keep private\n"
                               f"public {kp.public.hex()}\nsecret {kp.secret.hex()}\n")


def load_keypair(path: PathLike) -> KeyPair:
    fields = dict(ln.split(None, 1) for ln in _read_private(Path(path).expanduser(), "key") if " " in ln)
    if "public" not in fields or "secret" not in fields:
        raise LocalError(f"{path}: not a swarmtrain key file")
    kp = keypair_from_secret(_hex_key(fields["secret"].strip(), f"{path}: secret"))
    if kp.public != _hex_key(fields["public"].strip(), f"{path}: public"):
        raise LocalError(f"{path}: the public key does not match the secret key")
    return kp


def load_or_create_keypair(path: PathLike) -> KeyPair:
    """This peer's long-lived key pair: loaded from ``path``, or created there on first use."""
    p = Path(path).expanduser()
    if not p.exists():
        try:
            save_keypair(p, generate_keypair())
        except LocalError:
            pass  # another process created it first: load theirs
    return load_keypair(p)


def save_secret(path: PathLike, secret: bytes) -> None:
    _write_private(Path(path).expanduser(), "# swarmtrain swarm secret: whoever holds this file can join the swarm. "
                               "Keep it private (mode 0600).\n" + secret.hex() + "\n")


def load_secret(path: PathLike) -> bytes:
    lines = _read_private(Path(path).expanduser(), "swarm secret")
    if len(lines) != 1:
        raise LocalError(f"{path}: not a swarmtrain secret file")
    return _hex_key(lines[0], str(path))


def load_allowlist(path: PathLike) -> tuple[frozenset[bytes], dict[str, bytes]]:
    """(allowed public keys, peer id -> pinned key). The allowlist is not secret; any mode is accepted."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalError(f"cannot read allowlist {path}: {exc}") from None
    keys: set[bytes] = set()
    pins: dict[str, bytes] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 2:
            raise LocalError(f"{path}:{n}: expected '<public key hex> [peer id]'")
        key = _hex_key(parts[0], f"{path}:{n}")
        keys.add(key)
        if len(parts) == 2:
            if parts[1] in pins and pins[parts[1]] != key:
                raise LocalError(f"{path}:{n}: peer id {parts[1]!r} pinned to two keys")
            pins[parts[1]] = key
    return frozenset(keys), pins
