"""Attack tooling for the security and fuzz tests: a recording TCP relay, raw CURVE clients that bypass our
transport, ZMTP byte strings, a pickle whose unpickling would create a file, and an in-process swarm former.

Loopback only (127.0.0.1, port 0); every helper has a deadline.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import zmq
from zmq.utils.monitor import recv_monitor_message

from collectives import keys
from peer import Swarm
from tests.helpers import form_swarm, run_all


def hostport(addr: str) -> tuple[str, int]:
    host, port = addr.removeprefix("tcp://").rsplit(":", 1)
    return host.strip("[]"), int(port)


def wait_until(cond: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Relay:
    """A TCP relay on 127.0.0.1:0 to ``upstream`` that records what clients send (``c2s``) and receive."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.addr = f"127.0.0.1:{self.lsock.getsockname()[1]}"
        self.c2s = bytearray()
        self.s2c = bytearray()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            self._socks += [client, server]
            for src, dst, buf in ((client, server, self.c2s), (server, client, self.s2c)):
                t = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            buf += data
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the other pump

    def close(self) -> None:
        self._stop.set()
        self.lsock.close()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(2)


def curve_client(ctx: zmq.Context, addr: str, server_public: bytes, me: keys.KeyPair,
                 routing_id: bytes) -> tuple[zmq.Socket, zmq.Socket]:
    """A raw CURVE DEALER (no Hello, nothing of our transport) and its monitor socket."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, routing_id)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, me.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, me.secret)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    monitor = sock.get_monitor_socket()
    sock.connect(addr)
    return sock, monitor


def monitor_events(monitor: zmq.Socket, seconds: float) -> set[int]:
    """Every monitor event kind seen within ``seconds``."""
    seen: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if monitor.poll(50):
            seen.add(recv_monitor_message(monitor)["event"])
    return seen


def zmtp_greeting(mechanism: bytes = b"CURVE", as_server: bool = False) -> bytes:
    """A ZMTP 3.0 greeting (64 bytes)."""
    return (b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\x00")
            + bytes([int(as_server)]) + b"\x00" * 31)


def zmtp_command(name: bytes, body: bytes) -> bytes:
    data = bytes([len(name)]) + name + body
    return (bytes([0x04, len(data)]) if len(data) < 256 else b"\x06" + struct.pack(">Q", len(data))) + data


def zmtp_ready_null(socket_type: bytes = b"DEALER", identity: bytes = b"p0") -> bytes:
    props = (bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) + socket_type
             + bytes([8]) + b"Identity" + struct.pack(">I", len(identity)) + identity)
    return zmtp_command(b"READY", props)


def zmtp_frame(data: bytes, more: bool = False) -> bytes:
    flag = 0x01 if more else 0x00
    if len(data) < 256:
        return bytes([flag, len(data)]) + data
    return bytes([flag | 0x02]) + struct.pack(">Q", len(data)) + data


def raw_send(addr: str, data: bytes, read_for: float = 0.3) -> bytes:
    """Connect, send ``data``, read whatever comes back for ``read_for`` seconds, close."""
    got = bytearray()
    with socket.create_connection(hostport(addr), timeout=5) as s:
        try:
            s.sendall(data)
        except OSError:
            return bytes(got)  # the peer cut us off: fine
        s.settimeout(0.05)
        deadline = time.monotonic() + read_for
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
    return bytes(got)


class _Canary:
    """Unpickling this calls ``open(path, "w")``: the file appears if anything ever unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def canary_pickle(path: Path) -> bytes:
    data = pickle.dumps(_Canary(path), protocol=2)
    assert b"open" in data
    return data


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


form = form_swarm  # a standalone coordinator and n admitted peers p0..


def all_reduce_ok(peers: list[Swarm], timeout: float = 20.0) -> None:
    """Every peer all-reduces ones; each must get len(peers)."""
    import numpy as np

    bufs = [np.ones(1000, np.float32) for _ in peers]
    res = run_all([lambda p=p, b=b: p.comm.all_reduce(b, timeout=timeout) for p, b in zip(peers, bufs)])
    bad = [r for r in res if isinstance(r, Exception)]
    assert not bad, bad
    assert all(float(b[0]) == len(peers) and float(b[-1]) == len(peers) for b in bufs)


def secret_of(path: Optional[str] = None) -> bytes:
    return keys.load_secret(path or os.environ["SWARMTRAIN_SECRET"])
