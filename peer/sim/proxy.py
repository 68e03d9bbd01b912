"""A small delaying TCP proxy that the simulator puts in front of a peer: latency, jitter, a rate limit,
stalls, connection resets, truncation and byte corruption (netem is not available on these machines).

One ``selectors`` loop in one thread serves every route; user threads call the methods below, which run
on the loop thread and return once applied. Each route listens on its own port and forwards every
connection it accepts to the peer's real address (the upstream); the peer advertises the route's address
(``swarmtrain peer --advertise``), so every connection *into* that peer passes through the route.

    proxy = Proxy().start()
    host, port = proxy.add_route("peer1", "127.0.0.1", impair=Impairment(delay_s=0.05, jitter_s=0.01))
    proxy.set_upstream("peer1", "127.0.0.1", 45678)  # may come later: early connections wait for it
    proxy.stall("peer1", 3.0)     # hold every byte for 3 s, both directions (a path stall / blackhole)
    proxy.reset("peer1")          # RST every connection of the route
    proxy.truncate("peer1")       # cut the next chunk towards the peer short, then close (FIN)
    proxy.corrupt("peer1", 3)     # flip one byte in each of the next 3 chunks towards the peer
    proxy.close()

Bounds: each direction of a connection buffers at most ``max_buffer`` bytes (then the proxy stops reading:
back-pressure, as a router queue would); at most ``max_conns`` connections per route. With a delay d the
throughput of one connection is at most max_buffer / d, like a TCP window.

Fidelity: when the upstream refuses a connection (the peer process is gone) the route stops listening, so
connecting peers see "refused" as they would without the proxy. The rate limit applies to bytes towards the
peer (its download), on loopback where tbf cannot separate hosts.
"""

from __future__ import annotations

import errno
import logging
import queue
import random
import selectors
import socket
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Optional

from collectives.errors import DeadlineExceeded, LocalError
from peer.sim.proxy_route import Impairment, RouteStats, _Conn, _Pipe, _Route
from peer.sim.proxy_route import rst as _rst

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
CONTROL_TIMEOUT = 10.0  # a control call that the loop does not apply within this is an error


class Proxy:
    def __init__(self, max_buffer: int = 2 << 20, max_conns: int = 64, connect_timeout: float = 5.0,
                 seed: int = 0) -> None:
        self.max_buffer = max_buffer
        self.max_conns = max_conns
        self.connect_timeout = connect_timeout
        self.rng = random.Random(seed)
        self.routes: dict[str, _Route] = {}
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._cmds: queue.Queue[tuple[Callable[[], Any], list[Any], threading.Event]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmtrain-proxy", daemon=True)
        self.error: Optional[BaseException] = None
        self._interest: dict[socket.socket, int] = {}

    # ------------------------------------------------------------------ control (any thread)
    def start(self) -> "Proxy":
        self._thread.start()
        return self

    def _call(self, fn: Callable[[], Any]) -> Any:
        if not self._thread.is_alive():
            raise RuntimeError(f"proxy loop is not running (error: {self.error!r})")
        box: list[Any] = []
        done = threading.Event()
        self._cmds.put((fn, box, done))
        try:
            self._wake_w.send(b"x")
        except BlockingIOError:
            pass  # the loop is already awake
        if not done.wait(CONTROL_TIMEOUT):
            raise DeadlineExceeded("proxy loop did not apply a command in time")
        if box and isinstance(box[0], Exception):
            raise box[0]
        return box[0] if box else None

    def add_route(self, name: str, listen_host: str, upstream: Optional[tuple[str, int]] = None,
                  impair: Impairment = Impairment()) -> tuple[str, int]:
        """Listen on ``listen_host`` (any free port); returns the address peers should connect to."""
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((listen_host, 0))
        lsock.listen(64)
        lsock.setblocking(False)
        addr = lsock.getsockname()[:2]

        def add() -> None:
            if name in self.routes:
                lsock.close()
                raise LocalError(f"route {name} exists")
            r = _Route(name, lsock, addr, impair, upstream)
            self.routes[name] = r
            self.sel.register(lsock, selectors.EVENT_READ, r)
        self._call(add)
        return addr

    def set_upstream(self, name: str, host: str, port: int) -> None:
        self._call(lambda: setattr(self.routes[name], "upstream", (host, port)))

    def set_impairment(self, name: str, impair: Impairment) -> None:
        self._call(lambda: setattr(self.routes[name], "impair", impair))

    def impairment(self, name: str) -> Impairment:
        return replace(self.routes[name].impair)

    def stall(self, name: str, seconds: float) -> None:
        """Hold every byte of the route, both directions, for ``seconds`` (0 ends a stall now)."""
        def go() -> None:
            self.routes[name].stalled_until = time.monotonic() + seconds if seconds > 0 else 0.0
        self._call(go)

    def reset(self, name: str) -> int:
        """RST every connection of the route now; returns how many."""
        def go() -> int:
            r = self.routes[name]
            n = 0
            for c in list(r.conns):
                self._close_conn(c, rst=True)
                n += 1
            r.stats.resets += n
            return n
        return int(self._call(go))

    def truncate(self, name: str) -> None:
        self._call(lambda: setattr(self.routes[name], "truncate_pending", True))

    def corrupt(self, name: str, count: int = 1) -> None:
        def go() -> None:
            self.routes[name].corrupt_budget += count
        self._call(go)

    def stats(self, name: str) -> RouteStats:
        return replace(self.routes[name].stats)

    def remove_route(self, name: str) -> None:
        def go() -> None:
            r = self.routes.pop(name, None)
            if r is not None:
                for c in list(r.conns):
                    self._close_conn(c, rst=True)
                self._close_listener(r)
        self._call(go)

    def close(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            try:
                self._wake_w.send(b"x")
            except BlockingIOError:
                pass
            self._thread.join(CONTROL_TIMEOUT)
        for r in list(self.routes.values()):
            for c in list(r.conns):
                self._close_conn(c, rst=True)
            self._close_listener(r)
        self.routes.clear()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._refresh_interest(now)
                for key, mask in self.sel.select(self._timeout(now)):
                    self._on_ready(key, mask)
                self._apply_cmds()
                self._service(time.monotonic())
        except Exception as exc:  # the loop must never die silently (I5): kept and re-raised by _call
            log.exception("proxy loop crashed")
            self.error = exc

    def _apply_cmds(self) -> None:
        while True:
            try:
                fn, box, done = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                box.append(fn())
            except Exception as exc:  # handed back to the calling thread
                box.append(exc)
            done.set()

    def _timeout(self, now: float) -> float:
        t = 0.05
        for r in self.routes.values():
            if r.stalled_until > now:
                t = min(t, r.stalled_until - now)
                continue
            for c in r.conns:
                for p in c.pipes:
                    if p.chunks and not p.blocked:
                        t = min(t, max(0.0, p.chunks[0][0] - now, p.not_before - now))
        return max(t, 0.0005)

    def _on_ready(self, key: selectors.SelectorKey, mask: int) -> None:
        data = key.data
        if data is None:  # wake-up pipe
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        elif isinstance(data, _Route):
            self._accept(data)
        else:
            conn, sock = data
            if conn.closed:
                return
            if conn.connecting and sock is conn.up:
                self._finish_connect(conn)
                return
            for p in conn.pipes:
                if mask & selectors.EVENT_WRITE and p.dst is sock:
                    p.blocked = False  # writable again: _service flushes it
                if mask & selectors.EVENT_READ and p.src is sock and not conn.closed:
                    self._read(conn, p)

    def _accept(self, r: _Route) -> None:
        while r.listener is not None:
            try:
                sock, _ = r.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(r.conns) >= self.max_conns:
                _rst(sock)
                r.stats.refused += 1
                continue
            r.stats.accepted += 1
            c = _Conn(r, sock, accepted_at=time.monotonic())
            r.conns.append(c)
            if r.upstream is not None:
                self._connect(c)

    def _connect(self, c: _Conn) -> None:
        assert c.route.upstream is not None
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.up, c.connecting = up, True
        err = up.connect_ex(c.route.upstream)
        if err not in (0, errno.EINPROGRESS):
            self._upstream_failed(c, err)

    def _finish_connect(self, c: _Conn) -> None:
        assert c.up is not None
        err = c.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._upstream_failed(c, err)
            return
        c.connecting = False
        c.pipes = [_Pipe(c.down, c.up, True), _Pipe(c.up, c.down, False)]

    def _upstream_failed(self, c: _Conn, err: int) -> None:
        r = c.route
        self._close_conn(c, rst=True)
        if err == errno.ECONNREFUSED:
            # The peer process is gone: stop listening so connectors see "refused", as without a proxy.
            log.info("proxy route %s: upstream %s refused; closing the listener", r.name, r.upstream)
            self._close_listener(r)

    def _read(self, c: _Conn, p: _Pipe) -> None:
        r = c.route
        room = self.max_buffer - p.queued
        if room <= 0 or p.src_eof or p.close_after_flush:
            return
        try:
            data = p.src.recv(min(room, READ_SIZE))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the other side: pass the reset on
            self._close_conn(c, rst=True)
            return
        if not data:
            p.src_eof = True
            return
        buf = bytearray(data)
        if p.to_peer:
            r.stats.bytes_to_peer += len(buf)
            if r.corrupt_budget > 0:
                i = self.rng.randrange(len(buf))
                buf[i] ^= self.rng.randrange(1, 256)
                r.corrupt_budget -= 1
                r.stats.corrupted += 1
            if r.truncate_pending:
                buf = buf[:self.rng.randrange(len(buf))] if len(buf) > 1 else bytearray()
                r.truncate_pending = False
                r.stats.truncated += 1
                p.close_after_flush = True
        else:
            r.stats.bytes_from_peer += len(buf)
        now = time.monotonic()
        imp = r.impair
        release = now + imp.delay_s + (self.rng.uniform(0, imp.jitter_s) if imp.jitter_s else 0.0)
        release = max(release, p.last_release)
        p.last_release = release
        if buf:
            p.chunks.append((release, memoryview(buf)))
            p.queued += len(buf)

    def _service(self, now: float) -> None:
        """Flush released chunks, propagate EOFs, time out connections still waiting for an upstream."""
        for r in list(self.routes.values()):
            stalled = r.stalled_until > now
            for c in list(r.conns):
                if c.closed:
                    continue
                if c.up is None:
                    if r.upstream is not None:
                        self._connect(c)
                    elif now - c.accepted_at > self.connect_timeout:
                        self._close_conn(c, rst=True)
                    continue
                if c.connecting:
                    if now - c.accepted_at > self.connect_timeout:
                        self._close_conn(c, rst=True)
                    continue
                if stalled:
                    continue
                for p in c.pipes:
                    if not self._flush(c, p, now) or c.closed:
                        break
                if not c.closed and all(p.src_eof and p.dst_shut for p in c.pipes):
                    self._close_conn(c, rst=False)

    def _flush(self, c: _Conn, p: _Pipe, now: float) -> bool:
        r = c.route
        while p.chunks and p.chunks[0][0] <= now and not p.blocked and p.not_before <= now:
            release, view = p.chunks[0]
            n = len(view)
            if p.to_peer and r.impair.rate_bps > 0:
                n = min(n, self._tokens(r, now))
                if n < min(len(view), 4096):  # wait for a useful amount of tokens
                    p.not_before = now + (min(len(view), 4096) - r.tokens) / (r.impair.rate_bps / 8)
                    break
            try:
                sent = p.dst.send(view[:n])
            except (BlockingIOError, InterruptedError):
                p.blocked = True
                break
            except OSError:
                self._close_conn(c, rst=True)
                return False
            if p.to_peer and r.impair.rate_bps > 0:
                r.tokens -= sent
            p.queued -= sent
            if sent == len(view):
                p.chunks.popleft()
            else:
                p.chunks[0] = (release, view[sent:])
                if sent < n:
                    p.blocked = True
                break
        if not p.chunks and p.close_after_flush:
            self._close_conn(c, rst=False)
            return False
        if not p.chunks and p.src_eof and not p.dst_shut:
            try:
                p.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the other side is already gone; the read side will notice
            p.dst_shut = True
        return True

    def _tokens(self, r: _Route, now: float) -> int:
        rate = r.impair.rate_bps / 8
        burst = max(16384.0, rate * 0.005)
        r.tokens = min(burst, r.tokens + (now - r.tokens_at) * rate)
        r.tokens_at = now
        return int(r.tokens)

    def _refresh_interest(self, now: float) -> None:
        want: dict[socket.socket, tuple[int, Any]] = {}
        for r in self.routes.values():
            stalled = r.stalled_until > now
            for c in r.conns:
                if c.closed or c.up is None:
                    continue
                if c.connecting:
                    want[c.up] = (selectors.EVENT_WRITE, (c, c.up))
                    continue
                if stalled:
                    continue
                for p in c.pipes:
                    if not p.src_eof and not p.close_after_flush and p.queued < self.max_buffer:
                        ev = want.get(p.src, (0, None))[0]
                        want[p.src] = (ev | selectors.EVENT_READ, (c, p.src))
                    if p.blocked and p.chunks:
                        ev = want.get(p.dst, (0, None))[0]
                        want[p.dst] = (ev | selectors.EVENT_WRITE, (c, p.dst))
        for sock in list(self._interest):
            if sock not in want:
                try:
                    self.sel.unregister(sock)
                except (KeyError, ValueError):
                    pass  # closed meanwhile
                del self._interest[sock]
        for sock, (ev, data) in want.items():
            if self._interest.get(sock) == ev:
                continue
            if sock in self._interest:
                self.sel.modify(sock, ev, data)
            else:
                self.sel.register(sock, ev, data)
            self._interest[sock] = ev

    # ------------------------------------------------------------------ closing
    def _close_conn(self, c: _Conn, rst: bool) -> None:
        if c.closed:
            return
        c.closed = True
        for s in (c.down, c.up):
            if s is None:
                continue
            if s in self._interest:
                try:
                    self.sel.unregister(s)
                except (KeyError, ValueError):
                    pass  # already gone from the selector
                del self._interest[s]
            if rst:
                _rst(s)
            else:
                s.close()
        if c in c.route.conns:
            c.route.conns.remove(c)

    def _close_listener(self, r: _Route) -> None:
        if r.listener is None:
            return
        try:
            self.sel.unregister(r.listener)
        except (KeyError, ValueError):
            pass  # never registered or already removed
        r.listener.close()
        r.listener = None
