"""The security layer of the transport: who may connect, and which peer id a connection may speak for.

Design (issue 4; the README's "Private swarm" section shows it from the user's side):

- **A swarm is defined by its secret** (``swarmtrain keygen --secret FILE``, 32 random bytes, copied to every
  machine). Optionally an **allowlist** of peer public keys (``--allow FILE``) further restricts who may
  connect, and may pin peer ids to keys.
- **Every peer has a long-lived X25519 key pair** (``--key FILE``, 0600, created on first run). It is the
  peer's CURVE *client* key: every outbound link is a CURVE client authenticated by it.
- **Every listening socket is a CURVE server with the swarm's server key pair**, derived from the secret
  (HKDF). A joiner therefore needs only the secret and an address; a listener without the secret cannot
  complete a handshake (so it cannot pose as a swarm member), and peers of another swarm (another secret)
  fail the handshake. CURVE encrypts and authenticates every frame, with per-connection keys and nonces, so
  captured traffic cannot be read, altered or replayed (a replayed connection fails its handshake).
- **ZAP** (ZeroMQ's authentication hook, RFC 27) decides every incoming handshake by the client's public key
  (``Curve.zap``): banned keys and keys missing from a configured allowlist are refused; keys already proven
  (or allowlisted) are accepted; an unknown key is accepted *on probation* (bounded: a rate per client
  address, a cap on keys awaiting proof, a deadline). On probation the only message accepted is a ``Hello``
  whose token is HMAC(secret, the key): proof that the key's holder knows the secret. The transport sends a
  ``Hello`` first on every link it opens. Anything else from a key on probation is dropped, and a key that
  keeps trying is banned.
- **Peer ids are bound to keys.** ZAP labels each connection with its key (the frame's ``User-Id``); the
  transport reads the claimed id from the routing id and calls ``check_sender`` for every message. An id is
  bound to the first proven key that uses it (or pinned by the allowlist); another key claiming it while the
  binding is in use (``rebind_after_s``) is rejected as impersonation, reported with an untrusted (empty)
  sender so that the real peer is not blamed, and banned.

What this does not stop: a holder of the secret (an insider) can still claim ids nobody has used yet, and
can hurt liveness the way any member can (stall, leave, send garbage and be evicted); pin ids with an
allowlist where that matters. libzmq does not bound the number of parts of one multipart message, so an
insider with a hand-written ZMTP client could make a receiver buffer an unterminated message; strangers
cannot (they never pass the handshake).

``Insecure`` is plain TCP: anyone who can reach a port can read, join and impersonate. It exists only for
benchmarks on trusted networks and says so loudly.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import zmq

from collectives import keys, wire
from collectives.errors import AuthError, LocalError

log = logging.getLogger(__name__)

MIN_LIBZMQ = (4, 3, 5)
ZAP_DOMAIN = b"swarmtrain"

# What check_sender says about a message.
OK = "ok"              # proven key, id bound to it: deliver
UNPROVEN = "unproven"  # key on probation: only a Hello may pass
DROP = "drop"          # banned key: drop silently (its first offence was already reported)


def require_libzmq(curve: bool) -> None:
    """Refuse to run on a libzmq older than 4.3.5 (earlier releases have known pre-auth parser bugs), or
    without CURVE when it is needed."""
    if zmq.zmq_version_info() < MIN_LIBZMQ:
        raise LocalError(f"libzmq {zmq.zmq_version()} is too old: swarmtrain needs >= "
                         f"{'.'.join(map(str, MIN_LIBZMQ))} (install the pinned pyzmq, which bundles it)")
    if curve and not zmq.has("curve"):
        raise LocalError("this libzmq was built without CURVE: cannot encrypt; install the pinned pyzmq")


class Security:
    """A policy: configures every socket the transport opens and judges every received message."""

    handshakes = False  # True when a link is only "up" after a successful security handshake

    def configure_server(self, sock: zmq.Socket[Any]) -> None:
        raise NotImplementedError

    def configure_client(self, sock: zmq.Socket[Any], peer: str) -> None:
        raise NotImplementedError

    def hello(self) -> Optional[wire.Hello]:
        """The message to send first on every new link (None: nothing)."""
        return None

    def zap(self, address: str, mechanism: bytes, credentials: list[bytes], now: float) -> tuple[bool, str, str]:
        """Decide one handshake: (accept, reason, user id for the connection's frames)."""
        return False, "no authentication configured", ""

    def check_sender(self, header_frame: Any, claimed: str) -> str:
        """``OK``, ``UNPROVEN`` or ``DROP`` for a message claiming to come from ``claimed``; raises
        ``AuthError`` when the connection's key may not speak for that id (reported once, then dropped)."""
        raise NotImplementedError

    def on_hello(self, header_frame: Any, claimed: str, msg: wire.Hello) -> None:
        """Check a ``Hello``; raises ``AuthError`` when its token is wrong."""

    def on_unproven(self, header_frame: Any) -> AuthError:
        """A message other than ``Hello`` from a key on probation: the error to report."""
        return AuthError("message before proof of the swarm secret")


class Insecure(Security):
    """No encryption, no authentication: anyone who can reach the port can talk (trusted networks only)."""

    def configure_server(self, sock: zmq.Socket[Any]) -> None:
        return None

    def configure_client(self, sock: zmq.Socket[Any], peer: str) -> None:
        return None

    def check_sender(self, header_frame: Any, claimed: str) -> str:
        return OK


@dataclass(frozen=True)
class AuthLimits:
    """Bounds on what strangers and misbehaving keys can make a peer hold or do."""
    max_known_keys: int = 65536     # proven keys remembered (new keys are refused beyond this)
    max_probation: int = 256        # unknown keys accepted but not yet proven
    probation_s: float = 30.0       # ... which must send a valid Hello within this
    max_unproven_msgs: int = 16     # other messages tolerated from a key on probation before a ban...
    unproven_grace_s: float = 2.0   # ...once it has been on probation this long (a reconnecting client
                                    # flushes its queue before it can re-send its Hello)
    max_bans: int = 4096
    ban_s: float = 300.0
    max_ids_per_key: int = 64       # several local peers may share one key file
    max_bound_ids: int = 65536
    rebind_after_s: float = 600.0   # an id unused this long may be claimed by another proven key
    new_keys_burst: float = 64.0    # per client address: handshakes by unknown keys (token bucket)
    new_keys_per_s: float = 8.0
    max_addresses: int = 4096       # client addresses with a token bucket

    def __post_init__(self) -> None:
        if min(self.max_known_keys, self.max_probation, self.max_bans, self.max_ids_per_key,
               self.max_bound_ids, self.max_addresses) < 1:
            raise LocalError("AuthLimits: every table needs room for at least one entry")
        if self.probation_s <= 0 or self.ban_s <= 0 or self.new_keys_per_s <= 0:
            raise LocalError("AuthLimits: durations and rates must be positive")


class Curve(Security):
    """CURVE encryption, ZAP admission by swarm secret (and optional allowlist), ids bound to keys."""

    handshakes = True

    def __init__(self, me: keys.KeyPair, swarm_secret: bytes, *, allow: Optional[frozenset[bytes]] = None,
                 pins: Optional[dict[str, bytes]] = None, limits: Optional[AuthLimits] = None,
                 owner: str = "") -> None:
        require_libzmq(curve=True)
        if len(swarm_secret) != keys.KEY_BYTES:
            raise LocalError("the swarm secret has 32 bytes")
        self.me = me
        self.owner = owner  # for log lines
        self.limits = limits or AuthLimits()
        self._secret = swarm_secret
        self._server = keys.server_keypair(swarm_secret)
        self._hello = wire.Hello(keys.hello_token(swarm_secret, me.public))
        self._allow = None if allow is None else frozenset(k.hex() for k in allow)
        self._pins = {pid: k.hex() for pid, k in (pins or {}).items()}
        self._known: set[str] = set(self._allow or ())
        self._probation: dict[str, list[float]] = {}       # key -> [since, unproven messages]
        self._banned: collections.OrderedDict[str, float] = collections.OrderedDict()  # key -> until
        self._ids: dict[str, list[Any]] = {}                # peer id -> [key, last used]
        self._key_ids: dict[str, set[str]] = {}
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()
        self.stats: collections.Counter[str] = collections.Counter()

    # ------------------------------------------------------------------ sockets
    def configure_server(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._server.secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self._server.public)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def configure_client(self, sock: zmq.Socket[Any], peer: str) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self._server.public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.me.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.me.secret)

    def hello(self) -> wire.Hello:
        return self._hello

    # ------------------------------------------------------------------ handshakes (ZAP)
    def zap(self, address: str, mechanism: bytes, credentials: list[bytes], now: float) -> tuple[bool, str, str]:
        ok, reason, kid = self._zap(address, mechanism, credentials, now)
        self.stats["zap_accepted" if ok else "zap_refused"] += 1
        if not ok:
            log.debug("%s: refused handshake from %s: %s", self.owner, address[:64], reason)
        return ok, reason, kid

    def _zap(self, address: str, mechanism: bytes, credentials: list[bytes], now: float) -> tuple[bool, str, str]:
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != keys.KEY_BYTES:
            return False, "CURVE required", ""
        kid = credentials[0].hex()
        if self._is_banned(kid, now):
            return False, "banned", ""
        if self._allow is not None:
            return (True, "allowlisted", kid) if kid in self._allow else (False, "not on the allowlist", "")
        if kid in self._known:
            return True, "known", kid
        self._expire_probation(now)
        if kid not in self._probation:
            if not self._take_token(address, now):
                return False, "too many new keys from this address", ""
            if len(self._probation) >= self.limits.max_probation:
                return False, "too many unproven keys", ""
            self._probation[kid] = [now, 0.0]
        return True, "probation", kid

    def _take_token(self, address: str, now: float) -> bool:
        lim = self.limits
        bucket = self._buckets.pop(address, None) or [lim.new_keys_burst, now]
        bucket[0] = min(lim.new_keys_burst, bucket[0] + (now - bucket[1]) * lim.new_keys_per_s)
        bucket[1] = now
        self._buckets[address] = bucket  # most recently used last
        while len(self._buckets) > lim.max_addresses:
            self._buckets.popitem(last=False)
        if bucket[0] < 1.0:
            return False
        bucket[0] -= 1.0
        return True

    def _expire_probation(self, now: float) -> None:
        for kid in [k for k, (since, _) in self._probation.items() if now - since > self.limits.probation_s]:
            del self._probation[kid]

    def _is_banned(self, kid: str, now: float) -> bool:
        until = self._banned.get(kid)
        if until is None:
            return False
        if now < until:
            return True
        del self._banned[kid]
        return False

    def _ban(self, kid: str, now: float, why: str) -> None:
        log.warning("%s: banning key %s… for %.0fs: %s", self.owner, kid[:16], self.limits.ban_s, why)
        self.stats["bans"] += 1
        self._probation.pop(kid, None)
        self._banned.pop(kid, None)
        self._banned[kid] = now + self.limits.ban_s
        while len(self._banned) > self.limits.max_bans:
            self._banned.popitem(last=False)

    # ------------------------------------------------------------------ messages
    @staticmethod
    def _key_of(header_frame: Any) -> str:
        try:
            kid = header_frame.get("User-Id")
        except (zmq.ZMQError, AttributeError, TypeError):
            kid = ""
        if not isinstance(kid, str) or len(kid) != 2 * keys.KEY_BYTES:
            raise AuthError("message without an authenticated key")
        return kid

    def check_sender(self, header_frame: Any, claimed: str) -> str:
        kid = self._key_of(header_frame)
        now = time.monotonic()
        if self._is_banned(kid, now):
            self.stats["dropped"] += 1
            return DROP
        if kid in self._known:
            self._bind(claimed, kid, now)
            return OK
        if kid in self._probation:
            return UNPROVEN
        # accepted on probation once, but the probation expired without proof
        self._ban(kid, now, "probation expired without proof of the swarm secret")
        raise AuthError("unproven key")

    def _bind(self, claimed: str, kid: str, now: float) -> None:
        pinned = self._pins.get(claimed)
        if pinned is not None:
            if pinned != kid:
                self._impersonation(claimed, kid, now, "pinned to another key")
            return
        bound = self._ids.get(claimed)
        if bound is not None:
            if bound[0] == kid:
                bound[1] = now
                return
            if now - bound[1] < self.limits.rebind_after_s:
                self._impersonation(claimed, kid, now, "bound to another key")
        ids = self._key_ids.setdefault(kid, set())
        if len(ids) >= self.limits.max_ids_per_key or (bound is None and len(self._ids) >= self.limits.max_bound_ids):
            raise AuthError(f"too many peer ids for one key (claimed {claimed!r})")
        if bound is not None:  # an idle binding taken over
            self._key_ids.get(bound[0], set()).discard(claimed)
        self._ids[claimed] = [kid, now]
        ids.add(claimed)

    def _impersonation(self, claimed: str, kid: str, now: float, why: str) -> None:
        self.stats["impersonation"] += 1
        self._ban(kid, now, f"claimed peer id {claimed!r}, which is {why}")
        raise AuthError(f"key {kid[:16]}… claimed peer id {claimed!r}, which is {why}")

    def on_hello(self, header_frame: Any, claimed: str, msg: wire.Hello) -> None:
        kid = self._key_of(header_frame)
        now = time.monotonic()
        if not keys.check_token(self._secret, bytes.fromhex(kid), msg.token):
            self.stats["bad_hello"] += 1
            self._ban(kid, now, "wrong join token")
            raise AuthError("Hello with a wrong token (not a holder of the swarm secret)")
        if kid not in self._known:
            if len(self._known) >= self.limits.max_known_keys:
                raise AuthError("too many keys known; refusing a new one")
            self._probation.pop(kid, None)
            self._known.add(kid)
            self.stats["proven"] += 1
        self._bind(claimed, kid, now)

    def on_unproven(self, header_frame: Any) -> AuthError:
        kid = self._key_of(header_frame)
        entry = self._probation.get(kid)
        self.stats["unproven"] += 1
        if entry is not None:
            entry[1] += 1
            now = time.monotonic()
            if entry[1] > self.limits.max_unproven_msgs and now - entry[0] > self.limits.unproven_grace_s:
                self._ban(kid, now, "kept sending before proving the swarm secret")
        return AuthError("message before proof of the swarm secret (Hello)")
