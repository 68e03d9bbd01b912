"""Emulated hosts on one machine: Linux network namespaces joined by veth pairs to a bridge, each host's
upload and download shaped with ``tc tbf`` (netem is not available here; latency and byte-level faults come
from ``peer.sim.proxy``).

    ok, why = probe()                       # can we create namespaces here? (root, ``ip``, ``tc``)
    with Fabric.create() as fab:            # a bridge with a fresh /24 of 198.18.0.0/15 in the root namespace
        h = fab.add_host("peer0", parse_link("100mbit"))
        # run a process in it: [*h.exec_prefix, "python", ...]; it must bind h.ip
        fab.set_cable(h, up=False)          # partition: the host's cable is pulled (both directions)
        fab.shape(h, parse_link("5mbit"))   # slow link
        fab.set_path(h, h2, 20e6)           # a slow path between two hosts (htb class + u32 filter)
    # leaving the block (or close(), or atexit) kills what still runs inside, deletes every namespace and link;
    # a run killed outright is cleaned up by the next one (reap_orphans: its owner pid is gone)

Addresses come only from the 198.18.0.0/15 benchmarking range (RFC 2544), one /24 per run picked at random
among those no interface uses, so parallel runs do not collide; every name carries a per-run random suffix.

Topology::

    [ns swt-<sfx>-peer0]  eth0 (198.18.X.2) --veth-- swh2<sfx> --+
    [ns swt-<sfx>-peer1]  eth0 (198.18.X.3) --veth-- swh3<sfx> --+-- bridge swtb<sfx> (198.18.X.1, root ns)
    ...
    upload limit   = tbf on eth0 inside the namespace (egress towards the bridge)
    download limit = tbf on swhN<sfx> in the root namespace (egress towards the host)
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from collectives.errors import LocalError

log = logging.getLogger(__name__)

BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")
IP_TIMEOUT = 15.0  # seconds for one ``ip``/``tc`` command
_OWNERS = Path(tempfile.gettempdir()) / "swarmtrain-fabrics"  # suffix -> pid of the run that owns it
_LIVE: "set[Fabric]" = set()


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed or namespaces cannot be used here."""


# ---------------------------------------------------------------------- link specs
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(bit|kbit|mbit|gbit)?\s*$", re.IGNORECASE)
_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_rate(text: str) -> float:
    """'100mbit' -> 1e8 bits/s ('bit', 'kbit', 'mbit', 'gbit'; a bare number is bits/s)."""
    m = _RATE_RE.match(text)
    if not m:
        raise LocalError(f"bad rate {text!r}: use e.g. 100mbit, 20mbit, 1gbit, 500kbit")
    bps = float(m.group(1)) * _UNITS[(m.group(2) or "bit").lower()]
    if not 8e3 <= bps <= 100e9:
        raise LocalError(f"rate {text!r} out of range (8kbit .. 100gbit)")
    return bps


@dataclass(frozen=True)
class LinkSpec:
    """A host's access link; ``None`` means unlimited in that direction (bits/s)."""
    up_bps: Optional[float] = None
    down_bps: Optional[float] = None

    def slowest(self) -> Optional[float]:
        rates = [r for r in (self.up_bps, self.down_bps) if r is not None]
        return min(rates) if rates else None

    def describe(self) -> str:
        def one(r: Optional[float]) -> str:
            return "unlimited" if r is None else f"{r / 1e6:g}mbit"
        if self.up_bps == self.down_bps:
            return one(self.up_bps)
        return f"{one(self.up_bps)} up / {one(self.down_bps)} down"


def parse_link(text: str) -> LinkSpec:
    """'100mbit' (both directions), '20mbit/100mbit' (up/down), 'none' (unlimited)."""
    text = text.strip()
    if text.lower() in ("", "none", "unlimited"):
        return LinkSpec()
    up, _, down = text.partition("/")
    return LinkSpec(parse_rate(up), parse_rate(down or up))


def _htb(rate: float, ceil: float) -> list[str]:
    burst = max(32 * 1024, int(ceil / 8 * 0.01))
    return ["htb", "rate", f"{int(rate)}bit", "ceil", f"{int(ceil)}bit", "burst", str(burst), "cburst", str(burst),
            "quantum", "60000"]


def tbf_args(bps: float) -> list[str]:
    """tbf parameters: a burst of 10 ms of data (at least 32 KiB, so one GSO super-packet fits) and a queue
    of 50 ms, enough for TCP to keep the link busy without making heartbeats wait long."""
    burst = max(32 * 1024, int(bps / 8 * 0.01))
    return ["tbf", "rate", f"{int(bps)}bit", "burst", str(burst), "latency", "50ms"]


# ---------------------------------------------------------------------- commands
def _run(args: list[str], check: bool = True) -> str:
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(args)}: no answer within {IP_TIMEOUT:.0f}s") from None
    except OSError as exc:
        raise NetnsError(f"{' '.join(args)}: {exc}") from None
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {res.stderr.strip() or f'exit {res.returncode}'}")
    return res.stdout


def probe() -> tuple[bool, str]:
    """Try what the simulator needs (a namespace, a veth pair, a tbf qdisc) inside a throwaway namespace.
    Returns (True, "") or (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (running as uid %d)" % os.geteuid()
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"the '{tool}' command is not installed"
    ns = f"swtprobe-{secrets.token_hex(3)}"
    try:
        _run(["ip", "netns", "add", ns])
    except NetnsError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _run(["ip", "-n", ns, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
        _run(["tc", "-n", ns, "qdisc", "add", "dev", "pa", "root", *tbf_args(1e8)])
        return True, ""
    except NetnsError as exc:
        return False, f"veth/tbf not usable: {exc}"
    finally:
        _run(["ip", "netns", "del", ns], check=False)


# ---------------------------------------------------------------------- the fabric
@dataclass
class Host:
    name: str
    netns: str
    ip: str
    veth: str          # the root-namespace end (on the bridge)
    link: LinkSpec
    cable_up: bool = True
    paths: dict[str, float] = field(default_factory=dict)  # destination ip -> bits/s of that path

    @property
    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


class Fabric:
    def __init__(self, suffix: str, subnet: ipaddress.IPv4Network) -> None:
        self.suffix = suffix
        self.subnet = subnet
        self.bridge = f"swtb{suffix}"
        self.bridge_ip = str(subnet.network_address + 1)
        self.hosts: dict[str, Host] = {}
        self._free = [str(subnet.network_address + i) for i in range(2, subnet.num_addresses - 1)]
        self._next_index = 2
        self.closed = False

    @classmethod
    def create(cls) -> "Fabric":
        ok, why = probe()
        if not ok:
            raise NetnsError(why)
        reap_orphans()
        fab = cls(secrets.token_hex(3), _free_subnet())
        _LIVE.add(fab)
        _OWNERS.mkdir(parents=True, exist_ok=True)
        (_OWNERS / fab.suffix).write_text(str(os.getpid()), encoding="utf-8")
        try:
            _run(["ip", "link", "add", fab.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{fab.bridge_ip}/{fab.subnet.prefixlen}", "dev", fab.bridge])
            _run(["ip", "link", "set", fab.bridge, "up"])
        except NetnsError:
            fab.close()
            raise
        log.info("fabric %s: bridge %s %s", fab.suffix, fab.bridge, fab.subnet)
        return fab

    def __enter__(self) -> "Fabric":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def names(self) -> list[str]:
        """Every namespace and root-namespace link this fabric made (for leak checks)."""
        return [self.bridge] + [n for h in self.hosts.values() for n in (h.netns, h.veth)]

    def add_host(self, name: str, link: LinkSpec = LinkSpec()) -> Host:
        if name in self.hosts:
            raise LocalError(f"host {name} exists")
        if not self._free:
            raise NetnsError(f"no free address left in {self.subnet}")
        ip = self._free.pop(0)
        idx = self._next_index
        self._next_index += 1
        h = Host(name, f"swt-{self.suffix}-{name}", ip, f"swh{idx}{self.suffix}", link)
        self.hosts[name] = h
        _run(["ip", "netns", "add", h.netns])
        _run(["ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns])
        _run(["ip", "link", "set", h.veth, "master", self.bridge])
        _run(["ip", "link", "set", h.veth, "up"])
        _run(["ip", "-n", h.netns, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", "eth0"])
        _run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        self.shape(h, link)
        return h

    def shape(self, h: Host, link: LinkSpec) -> None:
        """Set (or lift) the host's upload and download limits; takes effect at once."""
        h.link = link
        self._shape_upload(h)
        if link.down_bps is None:
            _run(["tc", "qdisc", "del", "dev", h.veth, "root"], check=False)
        else:
            _run(["tc", "qdisc", "replace", "dev", h.veth, "root", *tbf_args(link.down_bps)])

    def set_path(self, a: Host, b: Host, bps: float) -> None:
        """Limit the path between two hosts (both directions) below their access links, e.g. a bad route
        between two providers: each sender's upload gets an htb class for that destination."""
        a.paths[b.ip] = bps
        b.paths[a.ip] = bps
        self._shape_upload(a)
        self._shape_upload(b)

    def _shape_upload(self, h: Host) -> None:
        ns = ["tc", "-n", h.netns]
        _run([*ns, "qdisc", "del", "dev", "eth0", "root"], check=False)
        up = h.link.up_bps
        if not h.paths:
            if up is not None:
                _run([*ns, "qdisc", "add", "dev", "eth0", "root", *tbf_args(up)])
            return
        # htb: a parent class capped at the upload rate; one child per slow path, the rest in the default.
        top = up if up is not None else 10e9
        _run([*ns, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "2"])
        _run([*ns, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", *_htb(top, top)])
        _run([*ns, "class", "add", "dev", "eth0", "parent", "1:1", "classid", "1:2", *_htb(top / 100, top)])
        for i, (dst, bps) in enumerate(sorted(h.paths.items()), start=10):
            rate = min(bps, top)
            _run([*ns, "class", "add", "dev", "eth0", "parent", "1:1", "classid", f"1:{i}", *_htb(rate, rate)])
            _run([*ns, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                  "match", "ip", "dst", f"{dst}/32", "flowid", f"1:{i}"])

    def set_cable(self, h: Host, up: bool) -> None:
        """Pull (up=False) or plug back the host's cable: a partition of that host, both directions."""
        _run(["ip", "link", "set", h.veth, "up" if up else "down"])
        h.cable_up = up

    def remove_host(self, name: str) -> None:
        h = self.hosts.pop(name, None)
        if h is None:
            return
        _kill_inside(h.netns)
        _run(["ip", "link", "del", h.veth], check=False)
        _run(["ip", "netns", "del", h.netns], check=False)
        self._free.append(h.ip)

    def close(self) -> None:
        """Kill whatever still runs inside our namespaces, delete them, their links and the bridge."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for name in list(self.hosts):
            try:
                self.remove_host(name)
            except NetnsError as exc:
                errors.append(str(exc))
        _run(["ip", "link", "del", self.bridge], check=False)
        _LIVE.discard(self)
        left = leftovers(self.suffix)
        if left or errors:
            log.error("fabric %s: cleanup incomplete: left %s; errors %s", self.suffix, left, errors)
        else:
            (_OWNERS / self.suffix).unlink(missing_ok=True)


def reap_orphans() -> list[str]:
    """Remove what earlier runs left behind when they could not clean up (SIGKILL, power loss): the
    namespaces and links of every fabric whose owner process is gone. Returns their suffixes."""
    reaped = []
    for f in _OWNERS.glob("*") if _OWNERS.is_dir() else []:
        try:
            os.kill(int(f.read_text(encoding="utf-8")), 0)
            continue  # its owner still runs
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue  # unreadable, or not ours to judge
        suffix = f.name
        for name in leftovers(suffix):
            if name.startswith(f"swt-{suffix}-"):
                _kill_inside(name)
                _run(["ip", "netns", "del", name], check=False)
            else:
                _run(["ip", "link", "del", name], check=False)
        if not leftovers(suffix):
            f.unlink(missing_ok=True)
            reaped.append(suffix)
    if reaped:
        log.warning("removed namespaces and links left by dead runs: %s", reaped)
    return reaped


def _kill_inside(netns: str) -> None:
    """SIGKILL the processes still inside one of our namespaces (only ever ones we started there)."""
    out = _run(["ip", "netns", "pids", netns], check=False)
    for tok in out.split():
        try:
            os.kill(int(tok), signal.SIGCONT)
            os.kill(int(tok), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass  # not a pid, or already gone


def _free_subnet() -> ipaddress.IPv4Network:
    used = set()
    for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+)/", _run(["ip", "-4", "-o", "addr", "show"])):
        used.add(ipaddress.IPv4Network(f"{m.group(1)}/24", strict=False))
    choices = [s for s in BENCH_NET.subnets(new_prefix=24) if s not in used]
    if not choices:
        raise NetnsError("every /24 of 198.18.0.0/15 is in use")
    return choices[secrets.randbelow(len(choices))]


def leftovers(suffix: str) -> list[str]:
    """Namespaces and links whose name carries ``suffix`` that still exist (empty after a clean close)."""
    found = [n for n in _run(["ip", "netns", "list"], check=False).split() if suffix in n]
    for m in re.finditer(r"^\d+: ([^:@\s]+)", _run(["ip", "-o", "link", "show"], check=False), re.MULTILINE):
        if suffix in m.group(1):
            found.append(m.group(1))
    return found


@atexit.register
def _close_all() -> None:
    for fab in list(_LIVE):
        fab.close()
