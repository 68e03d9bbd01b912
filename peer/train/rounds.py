"""What every swarm strategy does around its sync exchange (DiLoCo, ExpertSync): admit joiners at a safe
point, then run the exchange; and handle what a retry on the survivors cannot (being alone, a coordinator
failover in progress, staleness, deadlines), so that nothing is half-applied on any path.

A strategy keeps its own exchange and its own ``discard`` (what giving up a round means for its state)."""

from __future__ import annotations

import time
from typing import Callable

from collectives.errors import (CoordinatorUnavailable, DeadlineExceeded, OpAborted, StaleError,
                                TooFewPeers)
from peer.logs import peer_log
from peer.swarm import Swarm
from recovery.shared_state import NoSource, SharedState, sync


def admit_then(swarm: Swarm, op_timeout: float, exchange: Callable[[], None]) -> None:
    """Admit waiting joiners (a collective every member enters: ``peers_pending`` is the same on all of them
    after a committed op), then ``exchange()``."""
    if swarm.peers_pending:
        if swarm.state == "stale":
            raise StaleError(f"{swarm.id} is stale")
        if swarm.state != "member":  # a coordinator failover is in progress
            raise TooFewPeers(f"{swarm.id} is {swarm.state}", epoch=swarm.epoch, reason="re-forming")
        swarm.update_topology(op_timeout)
    exchange()


def sync_agreed(swarm: Swarm, state: SharedState, revision: int, has_state: bool, timeout: float) -> int:
    """Shared-state sync of a strategy's agreed state (``recovery.shared_state``: hashes first, then only the
    differing tensors, verified, from several sources); returns the revision every member now holds.

    A peer that never synced must not vote (``receive_only``). In a brand-new swarm nobody holds a state:
    every member gets ``NoSource`` at the same point and all vote; ties go to the first member in ring
    order, whose initial state becomes the agreed one."""
    state.revision = revision
    try:
        sync(swarm.comm, state, "enforce_popular" if has_state else "receive_only", timeout=timeout)
    except NoSource:
        sync(swarm.comm, state, "enforce_popular", timeout=timeout)
    return state.revision


def guarded(swarm: Swarm, fn: Callable[[], None], *, entry: bool, enter: Callable[[], None],
            discard: Callable[[str], None], join_timeout: float, alone_wait: float) -> None:
    """Run ``fn`` (a sync round; ``entry``: this peer's first, as a joiner) until it returns or the round is
    given up with ``discard(reason)``:

    - alone, or the swarm re-forming: wait for the membership to change (from the epoch the failure saw),
      then try again; local work stays valid while it waits. Past the deadline (``join_timeout`` on entry,
      else ``alone_wait``) an entry raises ``TooFewPeers``, a later round is discarded;
    - stale, or no coordinator: discard, rejoin, and continue with ``enter()`` (it enters like any joiner);
    - retries exhausted or an op's fate unknown (``OpAborted``, ``DeadlineExceeded``): discard; the next
      round's state sync repairs any gap."""
    log = peer_log(__name__, swarm.id)
    deadline = time.monotonic() + (join_timeout if entry else alone_wait)
    while True:
        try:
            fn()
            return
        except TooFewPeers as exc:
            if not swarm.wait_for_partner(deadline, since=exc.epoch):
                if entry:
                    raise TooFewPeers(f"{swarm.id}: no other peer within {join_timeout:.0f}s",
                                      reason="alone") from exc
                discard(f"too few peers ({exc.reason or exc})")
                return
        except (StaleError, CoordinatorUnavailable) as exc:
            log.warning("%s; rejoining", exc)
            discard(f"stale: {exc}")
            swarm.rejoin(join_timeout)
            fn, entry = enter, True
            deadline = time.monotonic() + join_timeout
        except (OpAborted, DeadlineExceeded) as exc:
            discard(f"{type(exc).__name__}: {exc}")
            return
