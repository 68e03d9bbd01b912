"""Start, signal and clean up local peer processes (used by the demo, the benchmark and the tests).

Every process started here is killed and reaped by ``close()`` (also on exceptions, via the context
manager), so nothing outlives its owner.

Secure by default: the first use creates a swarm secret in the work dir (``swarm.secret``, mode 0600), and
every process gets ``--secret`` and its own key file (``<name>.key``, created on first run and kept, so a
restarted process keeps its identity). ``insecure=True`` passes ``--insecure`` instead (benchmarks).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Optional

from collectives import keys
from collectives.errors import DeadlineExceeded

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[str]
    addr: str = ""
    record: Optional[Path] = None
    stderr_path: Optional[Path] = None
    lines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def hostport(self) -> str:
        return self.addr.removeprefix("tcp://")


class LocalProcs:
    def __init__(self, workdir: Path, python: str = sys.executable, insecure: bool = False) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.procs: dict[str, Proc] = {}
        self.insecure = insecure
        self.secret_file = self.workdir / "swarm.secret"
        if not insecure and not self.secret_file.exists():
            keys.save_secret(self.secret_file, keys.new_secret())

    def security_args(self, name: str) -> list[str]:
        """The security flags every process started here gets (``extra`` args given later override them)."""
        if self.insecure:
            return ["--insecure"]
        return ["--secret", str(self.secret_file), "--key", str(self.key_file(name))]

    def key_file(self, name: str) -> Path:
        return self.workdir / f"{name}.key"

    def __enter__(self) -> "LocalProcs":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, name: str, module: str, args: list[str], stdin: int = subprocess.DEVNULL) -> Proc:
        """``python -m module args`` in the work dir, stderr to ``<name>.log``; tracked for clean-up."""
        stderr_path = self.workdir / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        err: IO[str] = open(stderr_path, "a", encoding="utf-8")
        try:
            popen = subprocess.Popen([self.python, "-m", module, *args], stdout=subprocess.PIPE, stderr=err,
                                     stdin=stdin, text=True, env=env, cwd=str(self.workdir))
        finally:
            err.close()
        proc = Proc(name, popen, stderr_path=stderr_path)
        self.procs[name] = proc
        return proc

    def _spawn(self, name: str, args: list[str], ready_timeout: float) -> Proc:
        proc = self.start(name, "peer", args)
        line = self._read_line(proc, ready_timeout)
        if line.get("event") != "listening":
            raise RuntimeError(f"{name} did not start: {line}; log: {self.log_tail(name)}")
        proc.addr = line["addr"]
        return proc

    def _read_line(self, proc: Proc, timeout: float) -> dict[str, Any]:
        assert proc.popen.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.popen.stdout, selectors.EVENT_READ)
        try:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"{proc.name}: no output within {timeout:.0f}s; "
                                           f"log: {self.log_tail(proc.name)}")
                if sel.select(left):
                    raw = proc.popen.stdout.readline()
                    if not raw:
                        raise RuntimeError(f"{proc.name} exited (rc={proc.popen.poll()}); "
                                           f"log: {self.log_tail(proc.name)}")
                    obj = json.loads(raw)
                    proc.lines.append(obj)
                    return obj
        finally:
            sel.close()

    def coordinator(self, name: str = "coordinator", extra: Optional[list[str]] = None,
                    ready_timeout: float = 30.0) -> Proc:
        return self._spawn(name, ["coordinator", "--id", name, *self.security_args(name), *(extra or [])],
                           ready_timeout)

    def peer(self, name: str, join: list[str], extra: Optional[list[str]] = None, record: bool = True,
             ready_timeout: float = 30.0) -> Proc:
        args = ["peer", "--id", name, *self.security_args(name)]
        if join:
            args += ["--join", ",".join(join)]
        rec = self.workdir / f"{name}.jsonl" if record else None
        if rec is not None:
            args += ["--record", str(rec)]
        proc = self._spawn(name, [*args, *(extra or [])], ready_timeout)
        proc.record = rec
        return proc

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.alive:
            proc.popen.send_signal(sig)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.alive:
            proc.popen.kill()
        proc.popen.wait(timeout=10)

    def wait_done(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for a peer's final 'done' line and exit."""
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(proc, max(0.1, deadline - time.monotonic()))
            if line.get("event") == "done":
                proc.popen.wait(timeout=max(1.0, deadline - time.monotonic()))
                return line

    def until(self, name: str, event: str, timeout: float) -> dict[str, Any]:
        """Read a process's JSON lines (all kept in its ``lines``) until one with this ``event``."""
        proc = self.procs[name]
        deadline = time.monotonic() + timeout
        while True:
            line = self._read_line(proc, max(0.1, deadline - time.monotonic()))
            if line.get("event") == event:
                return line

    def drain(self, name: str) -> list[dict[str, Any]]:
        """After a process exited (e.g. SIGKILLed): its remaining complete JSON lines, appended to its
        ``lines`` (a line cut short by the kill is left out)."""
        proc = self.procs[name]
        if proc.alive or proc.popen.stdout is None:
            raise RuntimeError(f"{name} is still running")
        complete = proc.popen.stdout.read().split("\n")[:-1]   # the last piece has no newline: cut short
        out = [json.loads(line) for line in complete if line.strip()]
        proc.lines.extend(out)
        return out

    def records(self, names: Optional[list[str]] = None) -> list[dict[str, Any]]:
        out = []
        for name, proc in self.procs.items():
            if names is not None and name not in names:
                continue
            if proc.record is not None and proc.record.exists():
                for line in proc.record.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        try:
                            out.append(json.loads(line))
                        except json.JSONDecodeError:
                            pass  # the last line of a SIGKILLed peer may be cut short
        return out

    def log_tail(self, name: str, n: int = 2000) -> str:
        proc = self.procs.get(name)
        if proc is None or proc.stderr_path is None or not proc.stderr_path.exists():
            return ""
        return proc.stderr_path.read_text(encoding="utf-8", errors="replace")[-n:]

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.alive:
                try:
                    proc.popen.send_signal(signal.SIGCONT)
                    proc.popen.kill()
                except ProcessLookupError:
                    pass  # exited between the check and the kill
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
