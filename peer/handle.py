"""Handles that the I/O thread resolves and user threads wait on."""

from __future__ import annotations

import threading
from typing import Any, Callable

from collectives.errors import DeadlineExceeded


class Handle:
    """The outcome of one asynchronous call: a value, or a typed error. ``wait`` always has a deadline."""

    def __init__(self, kind: str, on_timeout: Callable[["Handle"], None] | None = None,
                 grace: float = 0.0) -> None:
        self.kind = kind
        self._event = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._on_timeout = on_timeout
        self._grace = grace
        self.metrics: dict[str, Any] = {}

    def done(self) -> bool:
        return self._event.is_set()

    def resolve(self, value: Any = None) -> None:
        if not self._event.is_set():
            self._value = value
            self._event.set()

    def fail(self, error: BaseException) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    def wait(self, timeout: float) -> Any:
        """Block until resolved or ``timeout`` seconds pass. On expiry the op is asked to abort and gets
        ``grace`` more seconds for its verdict (a commit that raced the deadline still counts)."""
        if not self._event.wait(timeout):
            if self._on_timeout is not None:
                self._on_timeout(self)
                self._event.wait(self._grace)
            if not self._event.is_set():
                raise DeadlineExceeded(f"{self.kind} did not finish within {timeout:.1f}s")
        if self._error is not None:
            raise self._error
        return self._value
