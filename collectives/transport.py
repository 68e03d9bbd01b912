"""The one module that touches sockets: a pyzmq endpoint per peer.

Each peer binds one ROUTER (its address) and opens one DEALER per peer it sends to; a DEALER's routing id
is ``<peer id>/<random>`` (the ROUTER learns who claims to send, and two sockets never collide on one id;
the ROUTER only receives, replies travel on the receiver's own DEALER). A monitored connection that drops
and is then refused means the remote process is gone, reported at once: zmq reports every retried
reconnect alike, and a reset link to a live peer or a partition must not look like a dead process, so a
retry starts a plain non-blocking TCP connect and only ``ECONNREFUSED`` is reported as ``refused``.
Messages to ourselves go through a local queue. Control messages (no payload) travel on their own
connection per neighbour, tensor data on ``streams`` others: a heartbeat never waits behind megabytes.

Security (``collectives.security``): with ``Curve`` the ROUTER is a CURVE server, every control DEALER a
CURVE client, and this module serves ZAP from its poll loop: the policy decides each handshake by the
client key, ``check_sender`` judges every message's claimed id against the connection's key, and a
``Hello`` goes first on every link. Tensor data then travels on a second, plain socket, every frame sealed
under per-link keys agreed over the CURVE links (``collectives.datalink``, ``collectives.aead``). A message
refused for authentication is reported as ``Bad`` with an empty (untrusted) sender.

Bounds (I4): zmq drops a connection whose frame exceeds ``max_frame_bytes`` or whose handshake is not done
within ``handshake_ms``; inbound connections beyond ``max_conns_per_address`` from one address are cut
(``collectives.connlimit``); ``rcv_hwm`` bounds what is queued per sender; every header is decoded by
``collectives.wire`` with its limits; wrong frame counts and invalid sender ids are reported as ``Bad``.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import zmq

from collectives import memory, wire
from collectives.connlimit import ConnLimit, disconnects, monitor_events
from collectives.refusal import RefusalProbes
from collectives.datalink import SealedLinks
from collectives.errors import AuthError, RemoteError, WireError
from collectives.security import DROP, OK, UNPROVEN, Insecure, Security, require_libzmq

log = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 1.0  # a refused-probe that gets no answer by then proves nothing

_MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
                   | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                   | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HANDSHAKE_FAILURES: dict[int, str] = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused by the peer",
                       zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error",
                       zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail"}
_MAX_HELLO_BYTES = 256  # a key on probation may send nothing bigger (a Hello is ~40 bytes)


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 16 * 1024 * 1024 + 64 * 1024
    # messages libzmq holds per inbound connection before it stops reading it (TCP then pushes back; nothing
    # is dropped). In the clear this router carries tensor frames: a deep queue there is memory (64 MiB
    # all-reduce, N = 4: peak 2.8-3.0x the buffer with 256, 2.4x with 4; docs/performance.md)
    rcv_hwm: int = 4
    max_batch: int = 64  # messages handled per poll before timers get a turn
    io_threads: int = 1  # zmq I/O threads (one saturates loopback here; more help only with many streams)
    streams: int = 1     # TCP connections per neighbour for tensor data (fills long fat WAN pipes)
    handshake_ms: int = 10000  # a connection that has not finished its (security) handshake by then is cut
    max_conns_per_address: int = 256  # inbound connections from one IP address at once; the excess is cut
    # freed memory malloc keeps for the next op's frames instead of unmapping it (collectives.memory;
    # process-wide, glibc only; 0 leaves malloc alone)
    retain_freed_bytes: int = 256 * 1024 * 1024


@dataclass
class Received:
    sender: str
    msg: wire.Message
    payload: Any  # zmq.Frame or None


@dataclass
class Bad:
    """A sender (possibly unidentifiable: ``sender == ""``) sent something we refuse."""
    sender: str
    error: RemoteError


@dataclass
class LinkEvent:
    peer: str
    kind: str  # "up" | "down" | "refused" | "auth_failed" (control link) | "data_lost" (a data stream dropped)


Event = Union[Received, Bad, LinkEvent]


@dataclass
class _Link:
    addr: str
    sock: zmq.Socket[Any]          # control messages only (ordered among themselves)
    monitor: zmq.Socket[Any]
    up: bool = False
    handshakes: int = 0
    failures: int = 0
    data: list[zmq.Socket[Any]] = field(default_factory=list)  # tensor data streams (>= 1), used round-robin
    data_monitors: list[zmq.Socket[Any]] = field(default_factory=list)  # their disconnects: data may be lost
    turn: int = 0


@dataclass
class Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    msgs_sent: int = 0
    msgs_received: int = 0
    per_peer_sent: dict[str, int] = field(default_factory=dict)


class Transport:
    # Every payload this transport delivers is a buffer of its own that nobody else references: a zmq frame
    # received over TCP (libzmq allocates one per message), a sealed frame opened into a fresh array or into
    # the landing its op named, a private copy of a message to ourselves. Its receiver may write into it.
    private_payloads = True

    def __init__(self, my_id: str, host: str = "127.0.0.1", port: int = 0, *,
                 security: Security | None = None, limits: Limits | None = None) -> None:
        self.my_id = wire.check_peer_id(my_id)
        self.limits = limits or Limits()
        self.security = security or Insecure()
        require_libzmq(curve=self.security.handshakes)
        memory.retain_freed_buffers(self.limits.retain_freed_bytes)
        self.ctx = zmq.Context(io_threads=self.limits.io_threads)
        self.zap: Optional[zmq.Socket[Any]] = None
        if self.security.handshakes:
            # The ZAP handler must exist before any handshake: without it CURVE accepts every client key.
            self.zap = self.ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind("inproc://zeromq.zap.01")
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        self.router.setsockopt(zmq.RCVHWM, self.limits.rcv_hwm)
        self.router.setsockopt(zmq.HANDSHAKE_IVL, self.limits.handshake_ms)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 0)  # routing ids are unique per socket (see connect)
        self.security.configure_server(self.router)
        bracket = f"[{host}]" if ":" in host else host
        if ":" in host:
            self.router.setsockopt(zmq.IPV6, 1)
        self.router.bind(f"tcp://{bracket}:{port}")
        endpoint = bytes(self.router.getsockopt(zmq.LAST_ENDPOINT)).decode()
        self.addr = wire.check_addr(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        if self.zap is not None:
            self.poller.register(self.zap, zmq.POLLIN)
        # Inbound connections per remote address (I4): counted from the ROUTER's accept/disconnect events.
        self._accepts = self.router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.poller.register(self._accepts, zmq.POLLIN)
        self._listen_ports = {int(endpoint.rsplit(":", 1)[1])}
        # Secure mode: tensor data on a data socket of its own, every frame sealed (collectives.datalink).
        self.sealed: Optional[SealedLinks] = None
        self._data_accepts: Optional[zmq.Socket[Any]] = None
        if self.security.handshakes:
            lim = self.limits
            self.sealed = SealedLinks(self.ctx, self.poller, self.my_id, host, max_frame_bytes=lim.max_frame_bytes,
                                      rcv_hwm=lim.rcv_hwm, handshake_ms=lim.handshake_ms, streams=lim.streams,
                                      max_batch=lim.max_batch)
            self._listen_ports.add(self.sealed.port)
            self._data_accepts = self.sealed.router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
            self.poller.register(self._data_accepts, zmq.POLLIN)
        self.conn_limit = ConnLimit(self.my_id, self._listen_ports, self.limits.max_conns_per_address)
        self.links: dict[str, _Link] = {}
        self._by_monitor: dict[zmq.Socket[Any], str] = {}
        self._local: collections.deque[Received] = collections.deque()
        self._probes = RefusalProbes(self.poller, PROBE_TIMEOUT_S)
        self._refused: list[LinkEvent] = []
        self._data_monitors: dict[zmq.Socket[Any], str] = {}
        self.counters = Counters()
        self.closed = False

    # ------------------------------------------------------------------ links
    def connect(self, peer: str, addr: str) -> None:
        """Open (or re-point) the outbound link to ``peer``."""
        if peer == self.my_id:
            return
        link = self.links.get(peer)
        if link is not None:
            if link.addr == addr:
                return
            self.disconnect(peer)
        sock = self._dealer(peer, addr)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            sock.connect(addr)
            data = [] if self.sealed else [self._dealer(peer, addr) for _ in range(max(1, self.limits.streams))]
            for d in data:
                d.connect(addr)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise WireError(f"cannot connect to {addr!r:.80}: {exc}") from None
        self.links[peer] = _Link(addr, sock, monitor, data=data)
        self._by_monitor[monitor] = peer
        self.poller.register(monitor, zmq.POLLIN)
        for d in data:
            dmon = d.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self.links[peer].data_monitors.append(dmon)
            self._data_monitors[dmon] = peer
            self.poller.register(dmon, zmq.POLLIN)
        hello = self.security.hello()
        if hello is not None:
            for s in (sock, *data):
                s.send(wire.encode(hello))  # queued first: it proves our key before anything else arrives
        if self.sealed is not None and wire.PEER_ID_RE.fullmatch(peer):  # not for a seed link ("@seed")
            sock.send(wire.encode(self.sealed.offer(peer)))
            owed = self.sealed.owed.pop(peer, None)
            if owed is not None:
                sock.send(wire.encode(owed))

    def _dealer(self, peer: str, addr: str) -> zmq.Socket[Any]:
        """One outbound connection; its routing id is unique (``id/random``) so a peer's several streams
        and reconnections never take each other's place at the receiving ROUTER."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{self.my_id}/{secrets.token_hex(4)}".encode())
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.limits.handshake_ms)
        sock.setsockopt(zmq.SNDHWM, 0)  # what we queue is bounded by our own ops
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 0)
        if addr.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)
        self.security.configure_client(sock, peer)
        return sock

    def disconnect(self, peer: str) -> None:
        link = self.links.pop(peer, None)
        if link is None:
            return
        self._by_monitor.pop(link.monitor, None)
        self.poller.unregister(link.monitor)
        link.sock.disable_monitor()
        link.monitor.close(linger=0)
        link.sock.close(linger=0)
        for d, dmon in zip(link.data, link.data_monitors):
            self._data_monitors.pop(dmon, None)
            self.poller.unregister(dmon)
            d.disable_monitor()
            dmon.close(linger=0)
        for d in link.data:
            d.close(linger=0)
        if self.sealed is not None:
            self.sealed.drop(peer)

    @property
    def conns_per_host(self) -> "collections.Counter[str]":
        return self.conn_limit.per_host

    def is_up(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.up

    # ------------------------------------------------------------------ send / receive
    def set_landing(self, landing: Optional[Callable[[str, wire.Chunk], Any]]) -> None:
        """Secure mode: ``landing(sender, chunk)`` may name the buffer an authentic chunk's plaintext is
        decrypted into (``SealedLinks.landing``). In the clear, received frames are zmq's own buffers."""
        if self.sealed is not None:
            self.sealed.landing = landing

    def send(self, peer: str, msg: wire.Message, payload: Any = None) -> None:
        header = wire.encode(msg)
        if peer == self.my_id:  # a private copy, as every received payload is (``private_payloads``)
            frame = None if payload is None else zmq.Frame(bytearray(memoryview(payload).cast("B")))
            self._local.append(Received(self.my_id, msg, frame))
            return
        link = self.links.get(peer)
        if link is None:
            raise KeyError(f"no link to {peer}")
        if payload is None:
            link.sock.send(header, copy=True)
            size = len(header)
        elif self.sealed is not None:
            self.sealed.send(peer, header, payload)
            size = len(header) + memoryview(payload).nbytes
        else:
            # tensor data is spread over the data streams; each message still arrives whole
            link.turn = (link.turn + 1) % len(link.data)
            link.data[link.turn].send_multipart([header, payload], copy=False)
            size = len(header) + memoryview(payload).nbytes
        c = self.counters
        c.bytes_sent += size
        c.msgs_sent += 1
        c.per_peer_sent[peer] = c.per_peer_sent.get(peer, 0) + size

    def hold_data(self, hold: bool) -> None:
        """Secure mode: stop reading sealed tensor data while ``hold`` (``SealedLinks.hold_reads``). In the
        clear, data shares the control socket and is always read."""
        if self.sealed is not None:
            self.sealed.hold_reads(hold)

    def poll(self, timeout_ms: int, extra: Any = None) -> tuple[list[Event], bool]:
        """Wait up to ``timeout_ms``; return (events, extra_ready) where extra is a registered fd."""
        if self._local:
            timeout_ms = 0
        ready = dict(self.poller.poll(timeout_ms))
        events: list[Event] = []
        while self._local:
            events.append(self._local.popleft())
        for sock in list(ready):
            if sock is self.router:
                events.extend(self._drain_router())
            elif sock is self.zap:
                self._serve_zap()
            elif sock is self._accepts or (sock is self._data_accepts and sock is not None):
                self.conn_limit.on_events(sock)
            elif self.sealed is not None and sock is self.sealed.router:
                events.extend(self._drain_sealed())
            elif self.sealed is not None and isinstance(sock, zmq.Socket) and sock in self.sealed.writers:
                self.sealed.writable(sock)
            elif self.sealed is not None and isinstance(sock, zmq.Socket) and sock in self.sealed.monitors:
                events.extend(LinkEvent(p, "data_lost") for p in self.sealed.lost(sock))
            elif isinstance(sock, zmq.Socket) and sock in self._by_monitor:
                events.extend(self._drain_monitor(sock))
            elif isinstance(sock, zmq.Socket) and sock in self._data_monitors:
                events.extend(self._drain_data_monitor(sock))
            elif isinstance(sock, int) and sock in self._probes:
                self._refused_probe(*self._probes.finish(sock))
        self._probes.expire()
        events.extend(self._refused)
        self._refused.clear()
        return events, (extra is not None and extra in ready)

    def _refused_probe(self, peer: str, refused: bool) -> None:
        link = self.links.get(peer)
        if refused and link is not None and not link.up:
            self._refused.append(LinkEvent(peer, "refused"))

    def _drain_router(self) -> Iterator[Event]:
        for _ in range(self.limits.max_batch):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            event = self._parse(frames)
            if event is not None:
                yield event


    def _serve_zap(self) -> None:
        """Answer handshake questions from libzmq (ZAP, RFC 27) with the security policy's decision."""
        assert self.zap is not None
        for _ in range(self.limits.max_batch):
            try:
                req = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [version, request id, domain, address, routing id, mechanism, credentials...]
            if len(req) >= 6 and req[0] == b"1.0":
                ok, reason, user = self.security.zap(req[3].decode("ascii", "replace"), req[5], req[6:],
                                                     time.monotonic())
            else:
                ok, reason, user = False, "malformed ZAP request", ""
            rid = req[1] if len(req) > 1 else b""
            self.zap.send_multipart([b"1.0", rid, b"200" if ok else b"400", reason.encode()[:200],
                                     user.encode(), b""])

    def _parse(self, frames: list[zmq.Frame]) -> Optional[Event]:
        """One received message -> an event, or None when it is consumed (Hello) or silently dropped."""
        ident = frames[0].bytes
        try:
            sender = wire.check_peer_id(ident.split(b"/", 1)[0].decode("ascii"))
        except (UnicodeDecodeError, WireError):
            return Bad("", WireError(f"invalid sender identity {ident[:40]!r}"))
        sec = self.security
        try:
            status = sec.check_sender(frames[1], sender)
        except AuthError as exc:
            return Bad("", exc)
        if status == DROP:
            return None
        try:
            if len(frames) not in (2, 3) or (status == UNPROVEN and len(frames[1]) > _MAX_HELLO_BYTES):
                raise WireError(f"message with {len(frames) - 1} frames" if len(frames) not in (2, 3)
                                else "oversized message before proof")
            msg = wire.decode(frames[1].buffer)
            if isinstance(msg, wire.Hello):
                sec.on_hello(frames[1], sender, msg)
                return None
            if status != OK:
                return Bad("", sec.on_unproven(frames[1]))
            if isinstance(msg, (wire.DataOffer, wire.DataAccept)):
                self._on_data_key(sender, msg)
                return None
            if msg.HAS_PAYLOAD != (len(frames) == 3):
                raise WireError(f"{type(msg).__name__}: wrong payload frame count")
        except AuthError as exc:
            return Bad("", exc)
        except WireError as exc:
            return Bad(sender, exc) if status == OK else Bad("", sec.on_unproven(frames[1]))
        payload = frames[2] if len(frames) == 3 else None
        size = sum(len(f) for f in frames[1:])
        self.counters.bytes_received += size
        self.counters.msgs_received += 1
        return Received(sender, msg, payload)

    def _on_data_key(self, sender: str, msg: Union[wire.DataOffer, wire.DataAccept]) -> None:
        """Key agreement for sealed data frames (``collectives.datalink``), on authenticated control links."""
        if self.sealed is None:
            raise WireError(f"{type(msg).__name__} in insecure mode")
        link = self.links.get(sender)
        try:  # the sender is authenticated: what is wrong here is its fault (WireError blames it)
            if isinstance(msg, wire.DataOffer):
                reply = self.sealed.on_offer(sender, msg)
                if link is None:
                    self.sealed.owe(sender, reply)  # sent when we open our link to the sender
                else:
                    link.sock.send(wire.encode(reply))
            elif link is None or sender not in self.sealed.pending:
                raise WireError("DataAccept for no offer of ours")
            elif self.sealed.pending[sender].key_id == msg.key_id:
                self.sealed.on_accept(sender, msg, link.addr.rsplit(":", 1)[0])
            # else: the answer to an offer we have since replaced (a reconnect); the newer one follows
        except AuthError as exc:
            raise WireError(str(exc)) from None

    def _drain_sealed(self) -> Iterator[Event]:
        assert self.sealed is not None
        for sender, msg, payload, error in self.sealed.drain():
            if error is not None:
                yield Bad(sender, error)
            elif msg is not None:
                self.counters.bytes_received += memoryview(payload).nbytes
                self.counters.msgs_received += 1
                yield Received(sender, msg, payload)

    def _drain_monitor(self, monitor: zmq.Socket[Any]) -> Iterator[LinkEvent]:
        peer = self._by_monitor[monitor]
        link = self.links[peer]
        for ev in monitor_events(monitor):
            kind = ev["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.handshakes += 1
                hello = self.security.hello()
                if link.handshakes > 1 and hello is not None:
                    link.sock.send(wire.encode(hello))  # reconnected: the far end may be a new process
                    if self.sealed is not None and wire.PEER_ID_RE.fullmatch(peer):  # ... with no key for our data
                        link.sock.send(wire.encode(self.sealed.offer(peer)))
            if kind in (zmq.EVENT_CONNECTED, zmq.EVENT_HANDSHAKE_SUCCEEDED):
                if not link.up and (kind == zmq.EVENT_HANDSHAKE_SUCCEEDED or not self.security.handshakes):
                    link.up = True
                    yield LinkEvent(peer, "up")
            elif kind == zmq.EVENT_DISCONNECTED:
                link.up = False
                yield LinkEvent(peer, "down")
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                self._refused_probe(peer, self._probes.start(peer, link.addr))
            else:
                link.failures += 1
                log.log(logging.WARNING if link.failures == 1 else logging.DEBUG,
                        "%s: security handshake with %s (%s) failed (%s): wrong swarm secret, refused key, "
                        "or not a swarmtrain peer?", self.my_id, peer, link.addr, _HANDSHAKE_FAILURES.get(kind, str(kind)))
                yield LinkEvent(peer, "auth_failed")

    def _drain_data_monitor(self, monitor: zmq.Socket[Any]) -> Iterator[LinkEvent]:
        """A data stream dropped: zmq reconnects, but what was in flight on it is lost."""
        peer = self._data_monitors[monitor]
        for _ in range(disconnects(monitor)):
            yield LinkEvent(peer, "data_lost")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._probes.close()
        for peer in list(self.links):
            self.disconnect(peer)
        self.router.disable_monitor()
        self._accepts.close(linger=0)
        self.router.close(linger=0)
        if self.sealed is not None and self._data_accepts is not None:
            self.sealed.router.disable_monitor()
            self._data_accepts.close(linger=0)
            self.sealed.close()
        if self.zap is not None:
            self.zap.close(linger=0)
        self.ctx.term()
