"""The delaying TCP proxy (peer.sim.proxy) in-process, against a loopback echo server."""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest

from collectives.transport import Transport
from peer.sim.proxy import Impairment, Proxy


class Echo:
    """A loopback echo server on port 0; every connection handled by its own daemon thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._echo, args=(c,), daemon=True).start()

    def _echo(self, c: socket.socket) -> None:
        c.settimeout(10)
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)
        except OSError:
            pass  # reset by the proxy: what some tests want
        finally:
            c.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    e = Echo()
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy(seed=1).start()
    try:
        yield p
    finally:
        p.close()


def _connect(addr: tuple[str, int]) -> socket.socket:
    c = socket.create_connection(addr, timeout=5)
    c.settimeout(5)
    return c


def _recv_exact(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        d = c.recv(n - len(out))
        if not d:
            break
        out += d
    return out


@pytest.mark.timeout(30)
def test_forwards_bytes_both_ways_and_waits_for_a_late_upstream(proxy: Proxy, echo: Echo) -> None:
    addr = proxy.add_route("p", "127.0.0.1")
    c = _connect(addr)  # accepted before the upstream is known: held, not dropped
    time.sleep(0.2)
    proxy.set_upstream("p", *echo.addr)
    payload = bytes(range(256)) * 4096  # 1 MiB
    t = threading.Thread(target=c.sendall, args=(payload,))
    t.start()
    assert _recv_exact(c, len(payload)) == payload
    t.join(5)
    c.close()
    st = proxy.stats("p")
    assert st.bytes_to_peer == len(payload) and st.accepted == 1


@pytest.mark.timeout(30)
def test_delay_and_jitter_add_latency_but_keep_order(proxy: Proxy, echo: Echo) -> None:
    addr = proxy.add_route("p", "127.0.0.1", echo.addr, Impairment(delay_s=0.05, jitter_s=0.02))
    c = _connect(addr)
    t0 = time.monotonic()
    c.sendall(b"x")
    assert c.recv(1) == b"x"
    rtt = time.monotonic() - t0
    assert 0.1 <= rtt < 0.5, rtt  # 50 ms each way, plus up to 20 ms jitter each way
    msg = b"".join(i.to_bytes(4, "big") for i in range(5000))
    for i in range(0, len(msg), 100):
        c.sendall(msg[i:i + 100])
    assert _recv_exact(c, len(msg)) == msg
    c.close()


@pytest.mark.timeout(30)
def test_rate_limit_towards_the_peer(proxy: Proxy, echo: Echo) -> None:
    addr = proxy.add_route("p", "127.0.0.1", echo.addr, Impairment(rate_bps=20e6))
    c = _connect(addr)
    payload = b"r" * (2 << 20)
    t0 = time.monotonic()
    t = threading.Thread(target=c.sendall, args=(payload,))
    t.start()
    assert len(_recv_exact(c, len(payload))) == len(payload)
    mbit = len(payload) * 8 / (time.monotonic() - t0) / 1e6
    t.join(5)
    c.close()
    assert 14 < mbit < 23, mbit


@pytest.mark.timeout(30)
def test_stall_holds_bytes_then_releases_them(proxy: Proxy, echo: Echo) -> None:
    addr = proxy.add_route("p", "127.0.0.1", echo.addr)
    c = _connect(addr)
    proxy.stall("p", 0.6)
    t0 = time.monotonic()
    c.sendall(b"hello")
    assert _recv_exact(c, 5) == b"hello"
    assert time.monotonic() - t0 >= 0.55
    c.close()


@pytest.mark.timeout(30)
def test_reset_truncate_corrupt(proxy: Proxy, echo: Echo) -> None:
    addr = proxy.add_route("p", "127.0.0.1", echo.addr)
    c = _connect(addr)
    c.sendall(b"a")
    assert c.recv(1) == b"a"
    assert proxy.reset("p") == 1
    with pytest.raises(ConnectionResetError):
        c.sendall(b"b" * 100000)
        c.recv(10)
    c.close()

    c = _connect(addr)
    proxy.corrupt("p", 1)
    c.sendall(b"\x00" * 1000)
    got = _recv_exact(c, 1000)
    assert len(got) == 1000 and sum(1 for b in got if b) == 1  # exactly one byte flipped
    proxy.truncate("p")
    c.sendall(b"z" * 1000)
    assert len(_recv_exact(c, 1000)) < 1000  # cut short, then closed
    c.close()
    st = proxy.stats("p")
    assert (st.resets, st.corrupted, st.truncated) == (1, 1, 1)


@pytest.mark.timeout(30)
def test_refused_upstream_closes_the_listener(proxy: Proxy) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused, and the port stays ours
    dead = s.getsockname()
    try:
        _check_refused_route(proxy, dead)
    finally:
        s.close()


def _check_refused_route(proxy: Proxy, dead: tuple[str, int]) -> None:
    """The first connection is accepted and then reset (the proxy learns only then that the upstream is
    gone); after that the route refuses, like the dead peer itself, so connecting peers notice at once."""
    addr = proxy.add_route("p", "127.0.0.1", dead)
    deadline = time.monotonic() + 5
    while True:
        try:
            c = _connect(addr)
        except ConnectionRefusedError:
            break
        except ConnectionResetError:
            pass  # reset while connecting: the proxy was quicker than our connect() call
        else:
            with c:
                try:
                    assert c.recv(10) == b"", "bytes from a dead upstream"
                except ConnectionResetError:
                    pass  # the expected reset
        assert time.monotonic() < deadline, "the route kept accepting after its upstream refused"
        time.sleep(0.05)
    assert proxy.stats("p").accepted >= 1


@pytest.mark.timeout(30)
def test_buffers_are_bounded(echo: Echo) -> None:
    p = Proxy(max_buffer=64 * 1024, max_conns=2, seed=1).start()
    try:
        addr = p.add_route("p", "127.0.0.1", echo.addr)
        p.stall("p", 2.0)  # nothing moves: the proxy may hold at most max_buffer per direction
        c = _connect(addr)
        c.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                sent += c.send(b"q" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
        held = sum(pp.queued for r in p.routes.values() for cc in r.conns for pp in cc.pipes)
        assert held <= 64 * 1024
        assert sent < 16 << 20  # back-pressure reached the sender (socket buffers only)
        extra = [_connect(addr)]  # the second connection is within max_conns
        try:  # the third exceeds it: accepted, then reset, which can reach us while connect() still returns
            extra.append(_connect(addr))
        except ConnectionResetError:
            pass
        deadline = time.monotonic() + 5
        while p.stats("p").refused < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.stats("p").refused >= 1 and p.stats("p").accepted == 2
        for x in [c, *extra]:
            x.close()
    finally:
        p.close()


def _link_events(t: Transport, seconds: float) -> list[tuple[str, str]]:
    from collectives.transport import LinkEvent

    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        events, _ = t.poll(50)
        out += [(e.peer, e.kind) for e in events if isinstance(e, LinkEvent)]
    return out


@pytest.mark.timeout(30)
def test_a_reset_connection_to_a_live_peer_is_not_reported_as_refused(proxy: Proxy) -> None:
    """zmq says CONNECT_RETRIED for every scheduled reconnect; only a probe's ECONNREFUSED means 'gone'.
    (The soak found live peers evicted as dead after a reset.)"""

    a, b = Transport("a"), Transport("b")
    try:
        host, port = proxy.add_route("b", "127.0.0.1")
        bhost, bport = b.addr.removeprefix("tcp://").rsplit(":", 1)
        proxy.set_upstream("b", bhost, int(bport))
        a.connect("b", f"tcp://{host}:{port}")
        assert ("b", "up") in _link_events(a, 1.0)
        assert proxy.reset("b") >= 1
        after = _link_events(a, 2.0)
        assert ("b", "down") in after and ("b", "up") in after and ("b", "refused") not in after
        b.close()  # the process is gone: now the route refuses, and that is reported
        assert ("b", "refused") in _link_events(a, 3.0)
    finally:
        a.close()
        b.close()
