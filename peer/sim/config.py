"""What ``swarmtrain simulate`` runs (``SimConfig``) and what it tracks per peer (``PeerState``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from peer.config import Timeouts
from peer.sim import faults as F
from peer.sim.netns import LinkSpec
from peer.sim.procs import Proc

# Timeouts for simulated peers: short enough that a run of a minute shows several failovers. Slower
# heartbeats and a longer op-progress deadline than the tests' profile: shaped links carry a frame slowly.
SIM_TIMEOUTS = Timeouts.local(heartbeat_interval=0.2, reform_window=1.5, op_progress_timeout=10.0)
SIM_ARGS = SIM_TIMEOUTS.cli_args()


@dataclass
class SimConfig:
    peers: int = 4
    duration: float = 60.0
    network: str = "auto"                  # auto | netns | loopback
    link: LinkSpec = field(default_factory=LinkSpec)
    peer_links: dict[str, LinkSpec] = field(default_factory=dict)
    proxy: bool = False
    delay_s: float = 0.0
    jitter_s: float = 0.0
    workload: str = "allreduce"            # allreduce | bench
    elems: int = 1 << 20                   # float32 elements per all-reduce
    pause: float = 0.0
    bench_ops: int = 3
    bench_warmup: int = 1
    ring_order: str = "measured"           # bench: measured | shuffled | start (see peer/simreport.py)
    paths: dict[tuple[str, str], float] = field(default_factory=dict)  # (peer, peer) -> bits/s of that path
    churn: bool = False
    kinds: tuple[str, ...] = ()            # churn: fault kinds (default: every kind this network supports)
    gap: tuple[float, float] = (3.0, 8.0)  # churn: seconds between one fault's end and the next
    schedule: list[F.Fault] = field(default_factory=list)
    seed: int = 0
    max_peers: int = 0                     # churn: joins stop here (default peers + 2)
    timeout_args: list[str] = field(default_factory=lambda: list(SIM_ARGS))
    op_timeout: float = 60.0
    reference_checks: int = 300            # committed ops re-computed with numpy (spread over the run)
    workdir: Optional[Path] = None
    png: Optional[Path] = None


@dataclass
class PeerState:
    name: str
    proc: Proc
    up_at: float
    stopped: bool = False
    cut: bool = False
    leaving: bool = False
    down: bool = False
