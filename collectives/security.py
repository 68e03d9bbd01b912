"""The security seam of the transport.

A ``Security`` policy configures every socket the transport opens and checks that the id a message claims
matches the authenticated identity of its connection. ``Insecure`` is plain TCP (the only policy until the
security issue lands; it must only be used on trusted networks).
"""

from __future__ import annotations

from typing import Any

import zmq


class Security:
    handshakes = False  # True when a link is only "up" after a successful security handshake

    def configure_server(self, sock: zmq.Socket) -> None:
        raise NotImplementedError

    def configure_client(self, sock: zmq.Socket, peer: str) -> None:
        raise NotImplementedError

    def check_sender(self, header_frame: Any, claimed: str) -> None:
        """Raise ``WireError`` when the connection's authenticated identity is not ``claimed``."""
        raise NotImplementedError


class Insecure(Security):
    """No encryption, no authentication: anyone who can reach the port can talk."""

    def configure_server(self, sock: zmq.Socket) -> None:
        return None

    def configure_client(self, sock: zmq.Socket, peer: str) -> None:
        return None

    def check_sender(self, header_frame: Any, claimed: str) -> None:
        return None
