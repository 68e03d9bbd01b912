"""Where simulated peers live: on loopback, or each in its own network namespace (``peer.sim.netns``).

Both give the simulator the same calls: ``add`` a host (its address, and the python to start it with),
``partition`` it, ``shape`` its link, limit the path between two (``set_path``), ``remove`` it, ``close``.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Optional

from collectives.errors import LocalError
from peer.sim.netns import Fabric, LinkSpec
from peer.sim.proxy import Impairment, Proxy


class LoopbackNet:
    """Every peer on 127.0.0.1. Partitions and slow links need the proxy (they act on bytes into a peer)."""
    mode = "loopback"
    proxy_host = "127.0.0.1"

    def __init__(self, proxy: Optional[Proxy], why: str) -> None:
        self.proxy = proxy
        self.why = why

    def describe(self) -> str:
        return f"loopback ({self.why})" if self.why else "loopback"

    def add(self, name: str, link: LinkSpec) -> tuple[str, Optional[str]]:
        return "127.0.0.1", None

    def after_start(self, name: str, link: LinkSpec) -> None:
        if link.down_bps is not None:
            self.shape(name, link)

    def _need_proxy(self, what: str) -> Proxy:
        if self.proxy is None:
            raise LocalError(f"{what} on loopback needs --proxy (no namespaces here)")
        return self.proxy

    def partition(self, name: str, on: bool) -> None:
        self._need_proxy("a partition").stall(name, 1e9 if on else 0.0)

    def shape(self, name: str, link: LinkSpec) -> None:
        px = self._need_proxy("a link limit")
        px.set_impairment(name, Impairment(px.impairment(name).delay_s, px.impairment(name).jitter_s,
                                           link.down_bps or 0.0))

    def set_path(self, a: str, b: str, bps: float) -> None:
        raise LocalError("per-path limits need network namespaces")

    def remove(self, name: str) -> None:
        return None

    def close(self) -> None:
        return None


class NetnsNet:
    """Every process in its own namespace on one bridge; peers start through a tiny wrapper that runs
    ``ip netns exec NS python`` (so ``LocalProcs`` spawns them unchanged, with whatever args it adds)."""
    mode = "netns"

    def __init__(self, fabric: Fabric, workdir: Path, python: str) -> None:
        self.fabric = fabric
        self.bindir = workdir / "bin"
        self.bindir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.proxy_host = fabric.bridge_ip

    def describe(self) -> str:
        return f"namespaces (bridge {self.fabric.bridge}, {self.fabric.subnet})"

    def add(self, name: str, link: LinkSpec) -> tuple[str, Optional[str]]:
        h = self.fabric.add_host(name, link)
        wrapper = self.bindir / f"py-{name}"
        wrapper.write_text(f"#!/bin/sh\nexec ip netns exec {h.netns} {self.python} \"$@\"\n", encoding="utf-8")
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
        return h.ip, str(wrapper)

    def after_start(self, name: str, link: LinkSpec) -> None:
        return None

    def partition(self, name: str, on: bool) -> None:
        self.fabric.set_cable(self.fabric.hosts[name], up=not on)

    def shape(self, name: str, link: LinkSpec) -> None:
        self.fabric.shape(self.fabric.hosts[name], link)

    def set_path(self, a: str, b: str, bps: float) -> None:
        self.fabric.set_path(self.fabric.hosts[a], self.fabric.hosts[b], bps)

    def remove(self, name: str) -> None:
        self.fabric.remove_host(name)

    def close(self) -> None:
        self.fabric.close()
