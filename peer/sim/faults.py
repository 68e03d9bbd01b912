"""Fault plans for ``swarmtrain simulate``: a schedule file, or a seeded random plan (``--churn``).

A schedule file is JSON: a list of objects (or one object per line), each with ``at`` (seconds after the
start) and ``kind``; the other keys depend on the kind::

    [{"at": 5,  "kind": "kill",      "peer": "peer1"},
     {"at": 8,  "kind": "stall",     "peer": "peer2", "seconds": 3},
     {"at": 12, "kind": "join"},
     {"at": 15, "kind": "partition", "peer": "peer0", "seconds": 4},
     {"at": 20, "kind": "slow",      "peer": "peer3", "rate": "5mbit", "seconds": 5},
     {"at": 26, "kind": "leave"},
     {"at": 30, "kind": "kill_coordinator"},
     {"at": 34, "kind": "reset",     "peer": "peer2"},
     {"at": 36, "kind": "corrupt",   "peer": "peer2", "count": 3},
     {"at": 38, "kind": "truncate",  "peer": "peer2"},
     {"at": 40, "kind": "delay",     "peer": "peer2", "delay_ms": 80, "jitter_ms": 20, "seconds": 5}]

A missing ``peer`` means "a live peer chosen at run time" (from the run's seed). Kinds:

- kill: SIGKILL.  stall: SIGSTOP, then SIGCONT after ``seconds``.  leave: SIGTERM, the peer leaves gracefully.
- join: start a new peer.  kill_coordinator: SIGKILL the standalone coordinator or, once it is gone, the
  peer that holds the role.
- partition: the peer's cable is pulled for ``seconds`` (namespaces; on loopback the proxy holds its bytes).
- slow: the peer's link drops to ``rate`` for ``seconds`` (tbf; on loopback the proxy's rate limit).
- reset / truncate / corrupt / delay: through the proxy in front of the peer (needs ``--proxy``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from collectives.errors import LocalError

PROCESS_KINDS = ("kill", "stall", "leave", "join", "kill_coordinator")
LINK_KINDS = ("partition", "slow")
PROXY_KINDS = ("reset", "truncate", "corrupt", "delay")
KINDS = PROCESS_KINDS + LINK_KINDS + PROXY_KINDS
# Faults that take a peer out of the live set: the planner keeps at least two live peers.
DISRUPTIVE = ("kill", "stall", "leave", "partition", "kill_coordinator")
_DEFAULT_SECONDS = {"stall": 3.0, "partition": 4.0, "slow": 5.0, "delay": 5.0}


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    peer: str = ""           # "" = a live peer chosen at run time
    seconds: float = 0.0     # how long a stall / partition / slow link / delay lasts
    rate: str = "5mbit"      # slow: the link rate while it lasts
    count: int = 1           # corrupt: how many chunks get one flipped byte
    delay_ms: float = 80.0   # delay: one-way latency added by the proxy
    jitter_ms: float = 20.0  # delay: plus up to this much

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LocalError(f"unknown fault kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.at < 0 or self.seconds < 0 or self.count < 1 or self.delay_ms < 0 or self.jitter_ms < 0:
            raise LocalError(f"fault {self}: negative time or count")
        if self.kind in _DEFAULT_SECONDS and self.seconds == 0:
            object.__setattr__(self, "seconds", _DEFAULT_SECONDS[self.kind])

    def describe(self) -> str:
        extra = {"stall": f" for {self.seconds:g}s", "partition": f" for {self.seconds:g}s",
                 "slow": f" to {self.rate} for {self.seconds:g}s", "corrupt": f" x{self.count}",
                 "delay": f" +{self.delay_ms:g}±{self.jitter_ms:g} ms for {self.seconds:g}s"}.get(self.kind, "")
        return f"{self.kind}{extra}"


def fault_from_dict(obj: dict[str, Any]) -> Fault:
    known = {f.name for f in fields(Fault)}
    unknown = set(obj) - known
    if unknown:
        raise LocalError(f"fault {obj}: unknown keys {sorted(unknown)}")
    if "at" not in obj or "kind" not in obj:
        raise LocalError(f"fault {obj}: needs 'at' and 'kind'")
    return Fault(**obj)


def load_schedule(path: str | Path) -> list[Fault]:
    text = Path(path).read_text(encoding="utf-8").strip()
    try:
        if text.startswith("["):
            items = json.loads(text)
        else:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise LocalError(f"{path}: not JSON ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise LocalError(f"{path}: expected a JSON list of objects or one object per line")
    return sorted((fault_from_dict(i) for i in items), key=lambda f: f.at)


def random_plan(seed: int, duration: float, kinds: tuple[str, ...], gap: tuple[float, float] = (3.0, 8.0),
                warmup: float = 4.0) -> list[Fault]:
    """Faults at random times in [warmup, duration - 5 s], one at a time: the next starts ``gap`` seconds
    after the previous one has ended, so every fault's effect on progress can be seen on its own."""
    if not kinds:
        return []
    rng = random.Random(seed)
    plan = []
    t = warmup + rng.uniform(*gap) / 2
    while t < duration - 5.0:
        kind = rng.choice(kinds)
        f = Fault(at=round(t, 2), kind=kind)
        plan.append(f)
        t += f.seconds + rng.uniform(*gap)
    return plan
