"""The JSON event lines that local peer processes write to stdout, read as they come.

Raw non-blocking reads under one selector: a buffered ``readline()`` would keep lines that already left the
pipe where ``select()`` cannot see them. Every wait is bounded. Used by the simulator's harnesses (the
examples' local swarms, the pipeline bench) and by the process tests."""

from __future__ import annotations

import json
import os
import selectors
import time
from typing import Any, Callable, Optional

from peer.sim.procs import Proc


class EventStream:
    """Every added process's events, in arrival order, each tagged ``"peer"`` with the process's name.
    ``strict``: a line that is not a JSON object raises (tests); else it is skipped (harnesses, which also
    read what a crashing child printed). Subclasses react to each event in ``on_event``."""

    def __init__(self, strict: bool = False) -> None:
        self.sel = selectors.DefaultSelector()
        self.events: list[dict[str, Any]] = []
        self.eof: set[str] = set()        # processes whose stdout closed
        self.strict = strict

    def add(self, proc: Proc) -> Proc:
        assert proc.popen.stdout is not None, "start the process with stdout=PIPE"
        fd = proc.popen.stdout.fileno()
        os.set_blocking(fd, False)
        self.sel.register(fd, selectors.EVENT_READ, (proc.name, bytearray()))
        return proc

    def poll(self, timeout: float) -> None:
        for key, _ in self.sel.select(timeout):
            name, buf = key.data
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                self.sel.unregister(key.fd)
                self.eof.add(name)
                continue
            buf.extend(chunk)
            while b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                self._line(name, line)

    def _line(self, name: str, line: bytes) -> None:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            if self.strict:
                raise
            return
        if not isinstance(e, dict) or not isinstance(e.get("event"), str):
            if self.strict:
                raise ValueError(f"{name}: not an event: {line[:200]!r}")
            return
        e["peer"] = name
        self.events.append(e)
        self.on_event(e)

    def on_event(self, e: dict[str, Any]) -> None:
        """Called for each event as it arrives (after it is recorded)."""

    every = 0.1   # seconds per poll while waiting in ``until``

    def until(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll until ``cond()`` holds; ``TimeoutError`` (with ``explain()``) after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}{self.explain()}")
            self.poll(self.every)

    def explain(self) -> str:
        """Appended to a timeout's message (e.g. each process's last events)."""
        return ""

    def of(self, kind: str, peer: Optional[str] = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind and (peer is None or e["peer"] == peer)]

    def committed(self) -> int:
        """Steps committed so far, by any peer's ``step`` events."""
        return max((e["step"] + 1 for e in self.of("step") if e.get("committed")), default=0)

    def close(self) -> None:
        self.sel.close()
