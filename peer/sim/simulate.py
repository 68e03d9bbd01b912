"""``swarmtrain simulate``: rehearse a swarm on one machine before renting any.

A coordinator and N peer processes run a workload (repeated all-reduces, or the timed ``bench``); each
peer lives on its own emulated host — a network namespace with tbf-shaped links (``peer.sim.netns``) — or,
without root, on loopback (said so in the output). With ``--proxy`` every peer sits behind the delaying
proxy (``peer.sim.proxy``), which adds latency and jitter and injects resets, truncation and corrupted bytes.
Faults come from a schedule file or a seeded random plan (``peer.sim.faults``). Everything is recorded in
``RUN/history.jsonl`` and the invariants are checked on that record alone (``peer.history.check_history``;
rerun offline with ``python -m peer.sim.history RUN/history.jsonl``).

    swarmtrain simulate --peers 4 --duration 60 --link 100mbit --churn --seed 1
    swarmtrain simulate --peers 4 --workload bench --mb 64 --link 100mbit --json
    swarmtrain simulate --peers 3 --proxy --delay 40ms --schedule faults.json --png run.png

Every namespace, link, proxy socket and process the run creates is removed when it ends, also on an
exception, SIGINT or SIGTERM (try/finally; ``peer.sim.netns`` adds an atexit backstop).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

from collectives.errors import DeadlineExceeded, LocalError
from peer.sim import faults as F
from peer.sim.history import check_history, load_history, merge_ops
from peer.sim.netns import Fabric, LinkSpec, NetnsError, parse_rate, probe
from peer.sim.procs import LocalProcs, Proc
from peer.sim.proxy import Impairment, Proxy
from peer.sim.net import LoopbackNet, NetnsNet
from peer.sim.report import build_report

from peer.sim.config import SIM_ARGS, PeerState, SimConfig  # noqa: F401  (SIM_ARGS, SimConfig re-exported)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- the run
class Simulation:
    def __init__(self, cfg: SimConfig, say: Optional[Callable[[str], None]] = None) -> None:
        self.cfg = cfg
        self.say = say or (lambda text: None)
        self.workdir = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="swarmtrain-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rng = random.Random(cfg.seed)
        self.peers: dict[str, PeerState] = {}
        self.timers: list[tuple[float, str, Callable[[], None]]] = []
        self.next_index = 0
        self.t0 = 0.0
        self.t_end = 0.0
        self.ending = False
        self.coord: Optional[Proc] = None
        self.proxy: Optional[Proxy] = None
        self.net: Any = None
        self.lp: Optional[LocalProcs] = None
        self.hist_path = self.workdir / "history.jsonl"
        self._hist: Optional[IO[str]] = None
        self.fabric_suffix = ""
        self.bench: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ history
    def _record(self, obj: dict[str, Any]) -> None:
        assert self._hist is not None
        self._hist.write(json.dumps(obj) + "\n")
        self._hist.flush()

    def _peer_event(self, name: str, state: str, t: Optional[float] = None, **kw: Any) -> None:
        self._record({"type": "peer", "t": t or time.time(), "peer": name, "state": state, **kw})

    def _fault(self, kind: str, who: str, detail: str = "", t: Optional[float] = None, **kw: Any) -> None:
        """Record a fault; ``t``: when it struck, if that was before now (a kill waits for the reaping)."""
        self._record({"type": "fault", "t": t or time.time(), "kind": kind, "who": who, "detail": detail, **kw})
        self.say(f"{kind} {who} {detail}".rstrip())

    # ------------------------------------------------------------------ set-up
    def _make_net(self) -> Any:
        want = self.cfg.network
        if want in ("auto", "netns"):
            ok, why = probe()
            if ok:
                fab = Fabric.create()
                self.fabric_suffix = fab.suffix
                return NetnsNet(fab, self.workdir, sys.executable)
            if want == "netns":
                raise NetnsError(f"cannot use network namespaces: {why}")
            self.say(f"network namespaces unavailable ({why}): falling back to loopback + proxy")
            return LoopbackNet(self.proxy, why)
        return LoopbackNet(self.proxy, "")

    @contextlib.contextmanager
    def _spawning_with(self, python: Optional[str]) -> Iterator[None]:
        assert self.lp is not None
        old = self.lp.python
        if python is not None:
            self.lp.python = python
        try:
            yield
        finally:
            self.lp.python = old

    def _entry(self) -> list[str]:
        out = [self.coord.hostport] if self.coord is not None and self.coord.alive else []
        out += [p.proc.hostport for p in self.peers.values() if not p.down and not p.stopped][:3]
        return out

    def _start_coordinator(self) -> None:
        assert self.lp is not None
        ip, python = self.net.add("coord", LinkSpec())
        extra = ["--host", ip, *self.cfg.timeout_args]
        with self._spawning_with(python):
            self.coord = self.lp.coordinator("coordinator", extra=extra)
        self.say(f"coordinator on {self.coord.addr}")

    def _start_peer(self, name: str) -> PeerState:
        assert self.lp is not None
        cfg = self.cfg
        link = cfg.peer_links.get(name, cfg.link)
        ip, python = self.net.add(name, link)
        for (a, b), bps in cfg.paths.items():
            other = b if a == name else a if b == name else None
            if other is not None and other in self.peers:
                self.net.set_path(name, other, bps)
        if cfg.workload == "bench":
            args = ["--workload", "bench", "--expect", str(cfg.peers), "--ops", str(cfg.bench_ops),
                    "--warmup", str(cfg.bench_warmup)]
            if cfg.ring_order != "measured":
                args.append("--no-bandwidth-probes")  # keep the join order
        else:
            # The simulator stops peers with SIGTERM at the end of the window; --duration is a safety net.
            end = self.t_end or time.time() + cfg.duration
            args = ["--duration", f"{end - time.time() + 60:.0f}", "--pause", str(cfg.pause)]
        args += ["--host", ip, "--elems", str(cfg.elems), *cfg.timeout_args]
        if self.proxy is not None:
            host, port = self.proxy.add_route(name, self.net.proxy_host,
                                              impair=Impairment(cfg.delay_s, cfg.jitter_s))
            args += ["--advertise", f"{host}:{port}"]
        with self._spawning_with(python):
            proc = self.lp.peer(name, self._entry(), args, record=cfg.workload != "bench")
        if self.proxy is not None:
            bound = proc.lines[0].get("bound", "").removeprefix("tcp://")
            bhost, _, bport = bound.rpartition(":")
            self.proxy.set_upstream(name, bhost, int(bport))
        self.net.after_start(name, link)
        st = PeerState(name, proc, time.time())
        self.peers[name] = st
        self._peer_event(name, "up", addr=proc.addr, link=link.describe())
        return st

    def _new_name(self) -> str:
        name = f"peer{self.next_index}"
        self.next_index += 1
        return name

    # ------------------------------------------------------------------ faults
    def live(self) -> list[PeerState]:
        return [p for p in self.peers.values() if not (p.down or p.stopped or p.cut or p.leaving)]

    def _pick(self, kind: str) -> Optional[PeerState]:
        live = [p for p in self.live() if time.time() - p.up_at > 1.0]
        if kind in F.DISRUPTIVE and len(self.live()) <= 2:
            return None
        return self.rng.choice(live) if live else None

    def _acting_coordinator(self) -> Optional[PeerState]:
        best: tuple[float, Optional[PeerState]] = (0.0, None)
        for p in self.live():
            rec = p.proc.record
            if rec is None or not rec.exists():
                continue
            with open(rec, "rb") as f:
                f.seek(max(0, rec.stat().st_size - 8192))
                tail = f.read().decode("utf-8", "replace").splitlines()[1:]
            for line in reversed(tail):
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("committed"):
                    if r.get("coordinator") and r["t"] > best[0]:
                        best = (r["t"], p)
                    break
        return best[1]

    def apply(self, f: F.Fault) -> None:
        """Carry out one fault now (resolving a missing target); undo steps go on the timer list."""
        kind = f.kind
        if kind == "join" or (f.peer == "" and kind in F.DISRUPTIVE and len(self.live()) <= 2):
            if len([p for p in self.peers.values() if not p.down]) >= (self.cfg.max_peers or self.cfg.peers + 2):
                self._fault("skipped", "", f"{kind}: swarm is at its size limit")
                return
            name = self._new_name()
            self._start_peer(name)
            self._fault("join", name, "" if kind == "join" else f"(instead of {kind}: only 2 live peers)")
            return
        if kind == "kill_coordinator":
            if self.coord is not None and self.coord.alive:
                assert self.lp is not None
                t = time.time()
                self.lp.kill(self.coord.name)
                self._fault(kind, "coordinator", "standalone coordinator (SIGKILL)", t=t)
                return
            target = self._acting_coordinator()
            if target is None or len(self.live()) <= 2:
                self._fault("skipped", "", "kill_coordinator: no acting coordinator with >2 live peers")
                return
            self._kill(target, kind, "peer holding the coordinator role (SIGKILL)")
            return
        target = self.peers.get(f.peer) if f.peer else self._pick(kind)
        # A named peer may be hit while stopped or cut off (e.g. stall, then kill: surely mid-op); a stall
        # or partition needs a running, connected one.
        busy = target is not None and ((kind in ("stall", "leave") and target.stopped) or
                                       (kind == "partition" and target.cut))
        if target is None or target.down or target.leaving or busy:
            self._fault("skipped", f.peer, f"{kind}: target not live")
            return
        name = target.name
        if kind == "kill":
            self._kill(target, kind, "SIGKILL")
        elif kind == "stall":
            target.proc.popen.send_signal(signal.SIGSTOP)
            target.stopped = True
            self._peer_event(name, "stopped")
            self._fault(kind, name, f"SIGSTOP for {f.seconds:g}s")
            self._later(f.seconds, f"SIGCONT {name}", lambda: self._resume(target))
        elif kind == "leave":
            target.leaving = True
            target.proc.popen.send_signal(signal.SIGTERM)
            self._fault(kind, name, "SIGTERM: leaves after its current op")
        elif kind == "partition":
            self.net.partition(name, True)
            target.cut = True
            self._peer_event(name, "cut")
            self._fault(kind, name, f"{'cable pulled' if self.net.mode == 'netns' else 'proxy holds bytes'} "
                                    f"for {f.seconds:g}s")
            self._later(f.seconds, f"heal {name}", lambda: self._heal(target))
        elif kind == "slow":
            normal = self.cfg.peer_links.get(name, self.cfg.link)
            bps = parse_rate(f.rate)
            self.net.shape(name, LinkSpec(bps, bps))
            self._fault(kind, name, f"link {f.rate} for {f.seconds:g}s")
            self._later(f.seconds, f"restore link {name}", lambda: self._restore_link(target, normal))
        else:
            self._proxy_fault(f, target)

    def _proxy_fault(self, f: F.Fault, target: PeerState) -> None:
        if self.proxy is None:
            raise LocalError(f"fault {f.kind} needs --proxy")
        name = target.name
        if f.kind == "reset":
            n = self.proxy.reset(name)
            self._fault("reset", name, f"RST {n} connections into it")
        elif f.kind == "truncate":
            self.proxy.truncate(name)
            self._fault("truncate", name, "next chunk into it cut short, then FIN")
        elif f.kind == "corrupt":
            self.proxy.corrupt(name, f.count)
            self._fault("corrupt", name, f"one byte flipped in each of the next {f.count} chunks into it")
        elif f.kind == "delay":
            old = self.proxy.impairment(name)
            self.proxy.set_impairment(name, Impairment(f.delay_ms / 1e3, f.jitter_ms / 1e3, old.rate_bps))
            self._fault("delay", name, f"+{f.delay_ms:g}ms ±{f.jitter_ms:g}ms for {f.seconds:g}s")
            self._later(f.seconds, f"restore delay {name}", lambda: self._restore_delay(name, old))

    def _kill(self, p: PeerState, kind: str, detail: str) -> None:
        assert self.lp is not None
        t = time.time()
        self.lp.kill(p.name)
        self._mark_down(p, "killed", t=t)
        self._fault(kind, p.name, detail, t=t)

    def _resume(self, p: PeerState) -> None:
        if p.stopped and not p.down:
            p.proc.popen.send_signal(signal.SIGCONT)
            p.stopped = False
            self._peer_event(p.name, "resumed")

    def _heal(self, p: PeerState) -> None:
        if p.cut and not p.down:
            self.net.partition(p.name, False)
            p.cut = False
            self._peer_event(p.name, "healed")

    def _restore_link(self, p: PeerState, link: LinkSpec) -> None:
        if not p.down:
            self.net.shape(p.name, link)
            self._record({"type": "fault_end", "t": time.time(), "kind": "slow", "who": p.name})

    def _restore_delay(self, name: str, imp: Impairment) -> None:
        p = self.peers[name]
        if not p.down and self.proxy is not None:
            self.proxy.set_impairment(name, imp)

    def _later(self, seconds: float, what: str, fn: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + seconds, what, fn))

    def _run_timers(self, everything: bool = False) -> None:
        now = time.monotonic()
        due = [t for t in self.timers if everything or t[0] <= now]
        self.timers = [t for t in self.timers if t not in due]
        for _, _, fn in sorted(due, key=lambda t: t[0]):
            fn()

    def _mark_down(self, p: PeerState, how: str, t: Optional[float] = None, **kw: Any) -> None:
        if p.down:
            return
        p.down = True
        self._peer_event(p.name, "down", t=t, how=how, **kw)
        if self.proxy is not None:
            self.proxy.remove_route(p.name)
        if how != "hung":
            self.net.remove(p.name)

    def _poll_exits(self) -> None:
        for p in list(self.peers.values()):
            if p.down or p.proc.alive:
                continue
            rc = p.proc.popen.returncode
            if p.leaving:
                how = "left"
            elif rc == 0:
                how = "exited"
            else:
                how = "crashed"
            detail: dict[str, Any] = {} if how != "crashed" else {"rc": rc, "log": _last_line(p.proc.stderr_path)}
            self._mark_down(p, how, **detail)

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        restore = _exit_on_signals()
        self._hist = open(self.hist_path, "w", encoding="utf-8")
        try:
            if cfg.proxy:
                self.proxy = Proxy(seed=cfg.seed).start()
            self.net = self._make_net()
            self._record({"type": "meta", "t": time.time(), "elems": cfg.elems, "network": self.net.mode,
                          "network_detail": self.net.describe(), "peers": cfg.peers, "duration": cfg.duration,
                          "link": cfg.link.describe(), "seed": cfg.seed, "proxy": cfg.proxy,
                          "workload": cfg.workload})
            self.say(f"network: {self.net.describe()}")
            plan = self._plan()
            self.lp = LocalProcs(self.workdir)
            self._start_coordinator()
            names = [self._new_name() for _ in range(cfg.peers)]
            if cfg.workload == "bench" and cfg.ring_order != "start":
                self.rng.shuffle(names)  # the ring starts in join order
            for name in names:
                self._start_peer(name)
            # The fault window (and every fault's "at") starts once the initial peers are up.
            self.t0 = time.time()
            self.t_end = self.t0 + cfg.duration
            self._record({"type": "start", "t": self.t0})
            if cfg.workload == "bench":
                self._finish_bench(names)
            else:
                self._fault_loop(plan)
                self._finish()
        finally:
            try:
                self._teardown()
            finally:
                restore()
        return self.report()

    def _plan(self) -> list[F.Fault]:
        cfg = self.cfg
        plan = list(cfg.schedule)
        if cfg.churn:
            plan += F.random_plan(cfg.seed, cfg.duration, cfg.kinds or self.default_kinds(), cfg.gap)
        if cfg.paths and self.net.mode != "netns":
            raise LocalError("per-path limits (--path) need network namespaces")
        for f in plan:
            if f.kind in F.PROXY_KINDS and self.proxy is None:
                raise LocalError(f"fault {f.kind} at {f.at:g}s needs --proxy")
            if f.kind in F.LINK_KINDS and self.net.mode == "loopback" and self.proxy is None:
                raise LocalError(f"fault {f.kind} at {f.at:g}s needs namespaces or --proxy")
        return sorted(plan, key=lambda f: f.at)

    def default_kinds(self) -> tuple[str, ...]:
        kinds = ["kill", "stall", "leave", "join", "join", "kill_coordinator"]
        if self.net.mode == "netns" or self.proxy is not None:
            kinds += ["partition", "slow"]
        if self.proxy is not None:
            kinds += ["reset", "truncate", "corrupt", "delay"]
        return tuple(kinds)

    def _fault_loop(self, plan: list[F.Fault]) -> None:
        while time.time() < self.t_end:
            self._run_timers()
            self._poll_exits()
            while plan and time.time() - self.t0 >= plan[0].at:
                self.apply(plan.pop(0))
            time.sleep(0.05)

    def _finish(self) -> None:
        """End the fault window, undo what is still in force, and let every peer finish its run."""
        assert self.lp is not None
        self._record({"type": "end", "t": time.time()})
        self.ending = True
        self._run_timers(everything=True)
        self._poll_exits()
        for p in self.peers.values():
            if not p.down:
                p.proc.popen.send_signal(signal.SIGTERM)  # finish the current op, leave, print "done"
        deadline = time.monotonic() + self.cfg.op_timeout + 30
        for p in list(self.peers.values()):
            if p.down:
                continue
            try:
                self.lp.wait_done(p.name, max(1.0, deadline - time.monotonic()))
                self._mark_down(p, "left" if p.leaving else "exited")
            except DeadlineExceeded:
                self.lp.kill(p.name)
                self._mark_down(p, "hung")
            except RuntimeError as exc:  # exited without its final line
                self._poll_exits()
                if not p.down:
                    self._mark_down(p, "crashed", log=str(exc)[-300:])

    def _finish_bench(self, names: list[str]) -> None:
        assert self.lp is not None
        for name in names:
            res = self.lp.wait_done(name, self.cfg.op_timeout * (self.cfg.bench_ops + self.cfg.bench_warmup + 2))
            self.bench.append(res)
            self._mark_down(self.peers[name], "exited")
        self._record({"type": "end", "t": time.time()})

    def _teardown(self) -> None:
        errors = []
        for what, fn in (("processes", self.lp.close if self.lp else None),
                         ("proxy", self.proxy.close if self.proxy else None),
                         ("network", self.net.close if self.net else None)):
            if fn is None:
                continue
            try:
                fn()
            except (OSError, RuntimeError, DeadlineExceeded) as exc:
                errors.append(f"{what}: {exc}")
        if self.lp is not None:
            for p in self.lp.procs.values():
                if p.popen.returncode is None:
                    errors.append(f"process {p.name} not reaped")
        if self._hist is not None:
            self._hist.close()
        if errors:
            raise RuntimeError("cleanup failed: " + "; ".join(errors))

    # ------------------------------------------------------------------ results
    def report(self) -> dict[str, Any]:
        attempts = self.lp.records() if self.lp is not None else []
        with open(self.hist_path, "a", encoding="utf-8") as h:
            for r in attempts:  # op attempts, and events such as "stale" / "rejoin_failed"
                h.write(json.dumps({"type": "event" if "event" in r else "attempt", **r}) + "\n")
            for o in merge_ops(attempts):
                h.write(json.dumps({"type": "op", **o}) + "\n")
        history = load_history(str(self.hist_path))
        check = None if self.cfg.workload == "bench" else \
            check_history(history, elems=self.cfg.elems, max_reference_checks=self.cfg.reference_checks)
        rep = build_report(self.cfg, history, check, self.bench, self.workdir, self.hist_path)
        if self.cfg.png is not None:
            from peer.sim.timeline import write_timeline

            write_timeline(self.cfg.png, history)
            rep["png"] = str(self.cfg.png)
        return rep


def _last_line(path: Optional[Path]) -> str:
    if path is None or not path.exists():
        return ""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else ""


def _exit_on_signals() -> Callable[[], None]:
    """SIGTERM/SIGHUP raise SystemExit (SIGINT raises KeyboardInterrupt), so ``finally`` cleans up."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)
    return restore
