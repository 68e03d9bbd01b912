"""The peer side of the catch-up benchmark (``--workload catchup-source`` / ``catchup-joiner``): a joiner
pulls a shared state from every source at once."""

from __future__ import annotations

from typing import Any

import numpy as np

from peer.swarm import Swarm
from recovery.shared_state import SharedState, sync


def run_catchup(swarm: Swarm, state_mb: float, joiner: bool, expect: int, timeout: float = 300.0
                ) -> dict[str, Any]:
    """Shared-state catch-up: sources hold an identical ~``state_mb`` MiB state (8 tensors), the joiner
    holds zeros and syncs receive-only, pulling ranges from every source in parallel."""
    swarm.wait_for_members(expect, timeout)
    elems = int(state_mb * (1 << 20)) // 4 // 8
    rng = np.random.default_rng(1234)
    named = {f"t{i}": (np.zeros(elems, np.float32) if joiner else rng.standard_normal(elems, dtype=np.float32))
             for i in range(8)}
    state = SharedState(named)
    swarm.comm.barrier(timeout=timeout)
    result = sync(swarm.comm, state, "receive_only" if joiner else "enforce_popular", timeout=timeout)
    swarm.comm.barrier(timeout=timeout)
    return {"peer": swarm.id, "joiner": joiner, "seconds": result.seconds, "bytes_received": result.bytes_received,
            "bytes_served": result.bytes_served, "fetched": len(result.fetched), "rounds": result.rounds}
