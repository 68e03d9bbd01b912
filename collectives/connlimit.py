"""Inbound connections per remote address (I4), counted from a ROUTER's accept/disconnect monitor events;
those beyond the limit are cut at once. Used by ``collectives.transport`` for its listening sockets; its
monitor helpers also serve the transport's links and ``collectives.datalink``'s data streams."""

from __future__ import annotations

import collections
import logging
import os
import socket
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)


def monitor_events(monitor: Any) -> list[dict[str, Any]]:
    """Every event queued on a zmq socket monitor, without blocking."""
    evs = []
    while True:
        try:
            evs.append(recv_monitor_message(monitor, zmq.NOBLOCK))
        except zmq.Again:
            return evs


def disconnects(monitor: Any) -> int:
    """How many disconnects are queued on a socket monitor (its other events are dropped)."""
    return sum(ev["event"] == zmq.EVENT_DISCONNECTED for ev in monitor_events(monitor))


class ConnLimit:
    def __init__(self, owner: str, listen_ports: set[int], max_per_address: int) -> None:
        self.owner = owner
        self.listen_ports = listen_ports  # shared with the transport (it adds its data socket's port)
        self.max_per_address = max_per_address
        self._conn_host: dict[int, str] = {}  # fd -> remote host, for accepted connections
        self.per_host: collections.Counter[str] = collections.Counter()

    def on_events(self, monitor: Any) -> None:
        """Track inbound connections per remote host; cut those beyond ``max_conns_per_address``.

        zmq reports an accepted connection by its fd. We look at the socket through a duplicate fd (never
        closing zmq's own), and cut an excess connection with ``shutdown``, which zmq then sees as a normal
        disconnect. An accept whose disconnect is already queued is skipped (its fd may have been reused)."""
        evs = monitor_events(monitor)
        for i, ev in enumerate(evs):
            fd = ev["value"]
            if ev["event"] == zmq.EVENT_DISCONNECTED:
                host = self._conn_host.pop(fd, None)
                if host is not None:
                    self.per_host[host] -= 1
                    if self.per_host[host] <= 0:
                        del self.per_host[host]
            elif not any(e["value"] == fd and e["event"] == zmq.EVENT_DISCONNECTED for e in evs[i + 1:]):
                self._admit(fd)

    def _admit(self, fd: int) -> None:
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            return  # already gone
        try:
            if s.getsockname()[1] not in self.listen_ports:
                return  # the fd was reused by another socket: not ours to judge
            host = str(s.getpeername()[0])
            self._conn_host[fd] = host
            self.per_host[host] += 1
            if self.per_host[host] > self.max_per_address:
                log.warning("%s: more than %d connections from %s; cutting one", self.owner,
                            self.max_per_address, host[:64])
                s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the connection closed while we looked: its disconnect event follows
        finally:
            s.close()
