"""The secure data path of one transport: sealed tensor frames on plain TCP connections.

In secure mode a peer has its CURVE control socket (its address) and one more plain ROUTER, its *data
socket*, on the same host; every frame on it is sealed by ``collectives.aead`` under a key agreed over
the authenticated CURVE links (``DataOffer`` / ``DataAccept``, which carry the data socket's port). The
data socket accepts connections from anyone, and a frame that does not open under its claimed sender's
key, or is not fresh, is refused as ``AuthError`` with an untrusted sender (nobody is blamed for a
stranger's bytes). Data for a peer whose key is not agreed yet waits here (bounded by the ops that made
it, as zmq's send queue is), and goes out once the answer arrives.

Sealing is paced: a frame is sealed (a fresh ciphertext buffer) only when its stream has room, i.e. libzmq
holds at most ``SEND_WINDOW`` sealed messages per stream (its send high-water mark; the poll loop waits for
``POLLOUT``). Without that, a peer that sends a whole chunk at once holds every sealed copy until the wire
drains (measured: 40-52 MiB of sealed frames at once per peer in a 64 MiB all-reduce). Until then the
frame waits here as the caller's buffer, by reference, as a zero-copy send in the clear does.

No sockets of the control plane live here; ``collectives.transport`` drives this object from its poll
loop and turns what ``drain`` returns into its events.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from typing import Any, Callable, Iterator, Optional

import zmq

from collectives import aead, wire
from collectives.connlimit import disconnects
from collectives.errors import AuthError, RemoteError, WireError

log = logging.getLogger(__name__)
MAX_KEYS_PER_PEER = 2  # the current key and the one before (frames sealed under it may still be in flight)
MAX_SENDERS = 4096     # senders whose keys we keep (the least recently keyed are forgotten beyond this)
SEND_WINDOW = 2        # sealed messages libzmq may queue per data stream (its SNDHWM; one more is on the wire)
RECV_WINDOW = 4        # sealed messages libzmq may hold per inbound data connection before it stops reading


class SealedLinks:
    def __init__(self, ctx: "zmq.Context[Any]", poller: zmq.Poller, my_id: str, host: str, *, max_frame_bytes: int,
                 rcv_hwm: int, handshake_ms: int, streams: int, max_batch: int) -> None:
        self.ctx, self.poller, self.my_id = ctx, poller, my_id
        self.streams_per_peer = max(1, streams)
        self.max_batch = max_batch
        self.handshake_ms = handshake_ms
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        # a sealed frame is the plaintext plus its tag; the header and prefix are frames of their own
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes + aead.TAG_BYTES)
        # few sealed frames wait per connection: past that libzmq stops reading it, TCP pushes back, and
        # the sender's paced sealing waits (bounded memory at both ends; ``pump``)
        self.router.setsockopt(zmq.RCVHWM, min(rcv_hwm, RECV_WINDOW))
        self.router.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 0)
        bracket = f"[{host}]" if ":" in host else host
        if ":" in host:
            self.router.setsockopt(zmq.IPV6, 1)
        self.router.bind(f"tcp://{bracket}:0")
        self.port = int(self.router.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
        # a specific bound address is where others reach the data socket (network namespaces, a control
        # address behind a proxy); a wildcard bind means "the host of my advertised address"
        self.host = "" if host in ("0.0.0.0", "::", "*", "") else bracket
        poller.register(self.router, zmq.POLLIN)
        self.reads_held = False  # ``hold_reads``
        self.sealers: dict[str, aead.Sealer] = {}
        self.openers: collections.OrderedDict[str, collections.OrderedDict[int, aead.Opener]] = \
            collections.OrderedDict()
        self.pending: dict[str, aead.Pending] = {}
        self.queued: dict[str, collections.deque[tuple[bytes, Any]]] = {}  # not sealed yet, in order
        self.stuck: dict[zmq.Socket[Any], list[Any]] = {}  # sealed, refused by a full stream: goes first
        self.writers: dict[zmq.Socket[Any], str] = {}      # streams registered for POLLOUT -> their peer
        self.socks: dict[str, list[zmq.Socket[Any]]] = {}
        self.endpoint: dict[str, str] = {}
        self.monitors: dict[zmq.Socket[Any], str] = {}
        self.turn: dict[str, int] = {}
        self.owed: collections.OrderedDict[str, wire.DataAccept] = collections.OrderedDict()  # to peers we
        # have no link to yet: sent when we open one (bounded like the keys)
        self._key_id = secrets.randbelow(2**31)
        self.stats: collections.Counter[str] = collections.Counter()
        # where the plaintext of an authentic chunk should go (the op that will read it offers a slice of
        # its scratch, ``ring.AllReduce.landing``); None: a fresh array per frame
        self.landing: Optional[Callable[[str, wire.Chunk], Any]] = None

    # ------------------------------------------------------------------ key agreement
    def offer(self, peer: str) -> wire.DataOffer:
        """A new key for our frames to ``peer`` (sent on every new or re-established control link)."""
        self._key_id = (self._key_id + 1) % 2**32
        priv, public = aead.new_ephemeral()
        self.pending[peer] = aead.Pending(self._key_id, priv, public, time.monotonic())
        return wire.DataOffer(self._key_id, public, aead.CIPHER)

    def on_offer(self, peer: str, msg: wire.DataOffer) -> wire.DataAccept:
        opener, public = aead.accept_offer(self.my_id, peer, msg.key_id, msg.public, msg.cipher)
        keys = self.openers.pop(peer, None) or collections.OrderedDict()
        self.openers[peer] = keys  # most recently keyed last
        keys[msg.key_id] = opener
        while len(self.openers) > MAX_SENDERS:
            self.openers.popitem(last=False)
        while len(keys) > MAX_KEYS_PER_PEER:
            keys.popitem(last=False)
        self.stats["keys_accepted"] += 1
        return wire.DataAccept(msg.key_id, public, self.host, self.port)

    def owe(self, peer: str, reply: wire.DataAccept) -> None:
        self.owed.pop(peer, None)
        self.owed[peer] = reply
        while len(self.owed) > MAX_SENDERS:
            self.owed.popitem(last=False)

    def on_accept(self, peer: str, msg: wire.DataAccept, host: str) -> None:
        """``peer`` answered our offer: seal with the new key, (re)connect to its data socket, send what
        waited."""
        pending = self.pending.get(peer)
        if pending is None or pending.key_id != msg.key_id:
            raise AuthError(f"DataAccept for key {msg.key_id}, which we did not offer")
        del self.pending[peer]
        self.sealers[peer] = aead.finish_offer(self.my_id, peer, pending, msg.public, aead.CIPHER)
        endpoint = f"tcp://{msg.host}:{msg.port}" if msg.host else f"{host}:{msg.port}"
        if self.endpoint.get(peer) != endpoint:
            self._close_streams(peer)
            self.endpoint[peer] = endpoint
            self.socks[peer] = [self._stream(peer, endpoint) for _ in range(self.streams_per_peer)]
        self.pump(peer)

    def _stream(self, peer: str, endpoint: str) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{self.my_id}/{secrets.token_hex(4)}".encode())
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.handshake_ms)
        sock.setsockopt(zmq.SNDHWM, SEND_WINDOW)  # sealing waits for room (``pump``)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if endpoint.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitors[monitor] = peer
        self.poller.register(monitor, zmq.POLLIN)
        sock.connect(endpoint)
        return sock

    # ------------------------------------------------------------------ frames
    def send(self, peer: str, header: bytes, payload: Any) -> None:
        """Queue a frame for ``peer`` (the payload by reference: the caller does not write it again) and
        seal what its streams have room for."""
        self.queued.setdefault(peer, collections.deque()).append((header, payload))
        self.pump(peer)

    def pump(self, peer: str) -> None:
        """Seal and send ``peer``'s queued frames, round robin over its streams, while the next stream has
        room; then wait for ``POLLOUT`` on it (``writable``)."""
        sealer, socks, queue = self.sealers.get(peer), self.socks.get(peer), self.queued.get(peer)
        if sealer is None or not socks:
            return  # no key or no stream yet: on_accept pumps
        while True:
            turn = (self.turn.get(peer, 0) + 1) % len(socks)
            sock = socks[turn]
            parts = self.stuck.pop(sock, None)
            if parts is None:
                if not queue:
                    break
                if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLOUT:
                    self._wait_writable(sock, peer)
                    return
                header, payload = queue.popleft()
                prefix, sealed_header, sealed = sealer.seal(turn, header, payload)
                parts = [prefix, sealed_header, sealed.data]
            try:
                sock.send_multipart(parts, zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.stuck[sock] = parts  # sealed with this stream's next counter: it must go first here
                self._wait_writable(sock, peer)
                return
            self.turn[peer] = turn
        if not queue:
            self.queued.pop(peer, None)
        for sock in socks:
            self._stop_waiting(sock)

    def writable(self, sock: zmq.Socket[Any]) -> None:
        """The poll loop saw ``POLLOUT`` on a stream we wait for."""
        peer = self.writers.get(sock)
        if peer is not None:
            self._stop_waiting(sock)
            self.pump(peer)

    def _wait_writable(self, sock: zmq.Socket[Any], peer: str) -> None:
        if sock not in self.writers:
            self.writers[sock] = peer
            self.poller.register(sock, zmq.POLLOUT)

    def _stop_waiting(self, sock: zmq.Socket[Any]) -> None:
        if self.writers.pop(sock, None) is not None:
            self.poller.unregister(sock)

    def hold_reads(self, hold: bool) -> None:
        """Stop (``hold``) or resume reading the data socket (the driver's rule: ``Node._hold_early_data``).
        While held, what a peer that runs ahead sends for the next op waits in libzmq's receive queue
        (RECV_WINDOW frames per connection) and in TCP, which pushes back on the sender's paced sealing,
        instead of being opened into fresh arrays as early data; once the op runs, it is opened straight
        into its scratch (``landing``). Nothing is dropped, and the control plane (CURVE) is not affected."""
        if hold != self.reads_held:
            self.reads_held = hold
            self.poller.modify(self.router, 0 if hold else zmq.POLLIN)
            self.stats["reads_held" if hold else "reads_resumed"] += 1

    def drain(self) -> Iterator[tuple[str, Optional[wire.Message], Any, Optional[RemoteError]]]:
        """(sender, message, payload, None) per authentic frame; (sender or "", None, None, error) else."""
        for _ in range(self.max_batch):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            yield self._open(frames)

    def _open(self, frames: list[zmq.Frame]) -> tuple[str, Optional[wire.Message], Any, Optional[RemoteError]]:
        ident = frames[0].bytes
        try:
            sender = wire.check_peer_id(ident.split(b"/", 1)[0].decode("ascii"))
        except (UnicodeDecodeError, WireError):
            return "", None, None, AuthError(f"data frame with an invalid sender identity {ident[:40]!r}")
        if len(frames) != 4:
            self.stats["refused"] += 1
            return "", None, None, AuthError(f"data frame with {len(frames) - 1} parts")
        try:
            key_id = aead.parse_prefix(frames[1].bytes)[0]
            keys = self.openers.get(sender)
            opener = keys.get(key_id) if keys is not None else None
            if opener is None:
                raise AuthError(f"data frame claiming {sender!r} under a key we did not agree")
            decoded: list[wire.Message] = []  # the header, if the lander decoded it already
            lander = self._lander(sender, self.landing, decoded) if self.landing is not None else None
            header, payload = opener.open(frames[1].bytes, frames[2].buffer, frames[3].buffer, lander)
        except AuthError as exc:
            self.stats["refused"] += 1
            return "", None, None, exc
        try:  # authentic from here: a malformed message is the sender's fault
            msg = decoded[0] if decoded else wire.decode(header)
            if not msg.HAS_PAYLOAD:
                raise WireError(f"{type(msg).__name__} on the data socket")
        except WireError as exc:
            return sender, None, None, exc
        self.stats["opened"] += 1
        return sender, msg, payload, None

    def _lander(self, sender: str, landing: Callable[[str, wire.Chunk], Any],
                decoded: list[wire.Message]) -> Callable[[bytes, int], Any]:
        """``Opener.open``'s ``dest``: decodes the (authentic) header once, into ``decoded``, and asks
        ``landing`` where an all-reduce chunk goes."""
        def dest(header: bytes, nbytes: int) -> Any:
            try:
                msg = wire.decode(header)
            except WireError:
                return None  # refused after opening, as before
            decoded.append(msg)
            if not isinstance(msg, wire.Chunk):
                return None
            buf = landing(sender, msg)
            if buf is not None and memoryview(buf).nbytes != nbytes:
                return None  # the header's size is wrong: the ring refuses it from a fresh array
            if buf is not None:
                self.stats["landed"] += 1
            return buf
        return dest

    def lost(self, monitor: zmq.Socket[Any]) -> Iterator[str]:
        """Peers whose data stream dropped (what was in flight on it is gone)."""
        peer = self.monitors[monitor]
        for _ in range(disconnects(monitor)):
            yield peer

    # ------------------------------------------------------------------ teardown
    def _close_streams(self, peer: str) -> None:
        mons = [m for m, p in self.monitors.items() if p == peer]
        for mon in mons:
            del self.monitors[mon]
            self.poller.unregister(mon)
        for sock in self.socks.pop(peer, []):
            self._stop_waiting(sock)
            self.stuck.pop(sock, None)
            sock.disable_monitor()
            sock.close(linger=0)
        for mon in mons:
            mon.close(linger=0)
        self.endpoint.pop(peer, None)

    def drop(self, peer: str) -> None:
        """Forget our sending side to ``peer`` (its key, streams, queued frames). Its keys for frames *to us*
        stay: the sender decides when to re-key (on its next new control link), and a member we dropped
        (evicted, then admitted again) may keep sending under the key it has."""
        self.sealers.pop(peer, None)
        self.pending.pop(peer, None)
        self.queued.pop(peer, None)
        self._close_streams(peer)

    def close(self) -> None:
        for peer in list(self.socks):
            self._close_streams(peer)
        if not self.reads_held:  # held reads are not registered
            self.poller.unregister(self.router)
        self.router.close(linger=0)
