"""Refused-probes: is anything listening at a peer's address? A non-blocking TCP connect whose answer
arrives in the transport's poll. ``ECONNREFUSED`` proves the peer's process is gone (nothing listens);
silence proves nothing (a partition or a slow host) and expires after ``timeout_s``."""

from __future__ import annotations

import errno
import socket
import time

import zmq


class RefusalProbes:
    def __init__(self, poller: zmq.Poller, timeout_s: float = 1.0) -> None:
        self.poller = poller
        self.timeout_s = timeout_s
        self.probes: dict[int, tuple[str, socket.socket, float]] = {}  # fd -> (peer, socket, deadline)

    def __contains__(self, fd: object) -> bool:
        return fd in self.probes

    def start(self, peer: str, addr: str) -> bool:
        """Start a probe of ``addr`` (``tcp://host:port``); True when it was refused at once."""
        if any(p == peer for p, _, _ in self.probes.values()):
            return False
        host, _, port = addr.removeprefix("tcp://").rpartition(":")
        host = host.strip("[]")
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except (OSError, ValueError):
            return False  # a name, not an address: no probe (silence is still detected by heartbeats)
        family, _, _, _, sockaddr = info[0]
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            return err == errno.ECONNREFUSED
        self.probes[s.fileno()] = (peer, s, time.monotonic() + self.timeout_s)
        self.poller.register(s.fileno(), zmq.POLLOUT)
        return False

    def _end(self, fd: int) -> tuple[str, socket.socket]:
        peer, s, _ = self.probes.pop(fd)
        self.poller.unregister(fd)
        return peer, s

    def finish(self, fd: int) -> tuple[str, bool]:
        """The probe on ``fd`` has an answer: (peer, refused)."""
        peer, s = self._end(fd)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        s.close()
        return peer, err == errno.ECONNREFUSED

    def expire(self) -> None:
        now = time.monotonic()
        for fd, (_, _, deadline) in list(self.probes.items()):
            if now > deadline:  # no answer: a partition or a slow host, not a refusal
                self._end(fd)[1].close()

    def close(self) -> None:
        for fd in list(self.probes):
            self._end(fd)[1].close()
