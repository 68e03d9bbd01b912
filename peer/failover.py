"""Finding the coordinator, as seen by a member: (re)joining, and coordinator failover (mixed into
``peer.node.Node``; runs on its I/O thread).

Joining: a Join goes to each known address in turn (the last coordinator, ``--join``, the last epoch's
members; any member answers with a Redirect to its coordinator) until admitted or ``join_timeout``.

When the coordinator is presumed dead, the survivors send a ``Rejoin`` (their last epoch and the verdicts
they hold) to the first surviving member of the last epoch. That member takes the coordinator role in
reform mode (``CoordinatorCore(reform_expected=...)``); if it does not answer within
``Timeouts.candidate_timeout``, the next candidate is tried. No candidate left: stale.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional

from collectives import wire
from collectives.errors import CoordinatorUnavailable, LocalError
from collectives.transport import Transport
from peer.config import PeerConfig, Timeouts
from peer.core.actions import Action
from peer.core.coordinator import CoordinatorCore
from peer.core.ops import OpEngine
from peer.core.states import NODE_TRANSITIONS, NodeState
from peer.handle import Handle
from peer.logs import PeerLog

SEED = "@seed"  # the transport key of a link to a join address whose peer id we do not know yet


class FailoverMixin:
    # attributes and methods provided by peer.node.Node
    id: str
    addr: str
    state: NodeState
    log: PeerLog
    term: int
    epoch: int
    members: list[str]
    addrs: dict[str, str]
    coord: Optional[CoordinatorCore]
    coord_id: str
    coord_addr: str
    t: Timeouts
    cfg: PeerConfig
    engine: OpEngine
    transport: Transport
    reform_candidates: list[str]
    reform_term: int
    reform_deadline: float
    early_rejoins: list[tuple[str, wire.Rejoin]]
    old_coord_id: str
    old_coord_addr: str
    join_addrs: list[str]
    last_members: list[tuple[str, str]]
    redirects: int
    dead: set[str]
    join_index: int
    join_deadline: float
    join_retry_at: float
    _join_addr: str

    if TYPE_CHECKING:  # methods of peer.node.Node that this mixin calls
        def _note(self, kind: str, detail: str) -> None: ...
        def _send(self, to: str, msg: wire.Message, payload: Any = None) -> None: ...
        def _apply(self, actions: list[Action]) -> None: ...
        def _become_stale(self, msg: wire.Stale, now: float) -> None: ...

    def _remember_members(self) -> None:
        """Keep the last epoch's members and addresses: a stale peer looks for the swarm there."""
        core = self.coord
        ids = core.members if core is not None else self.members
        found = [(m, self.addrs.get(m) or (core.addrs.get(m, "") if core is not None else "")) for m in ids]
        found = [(m, a) for m, a in found if a and m != self.id and a != self.addr]
        if found:
            self.last_members = found

    def _step_down(self, now: float) -> None:
        """Our coordinator core lost its quorum: give up the role (its ops are already aborted)."""
        self._remember_members()
        self._note("coordinator", "stepped down: lost quorum")
        self.coord = None
        self._become_stale(wire.Stale(self.term, self.epoch, self.id, self.addr, "coordinator lost its quorum"),
                           now)

    def _redirect_joiner(self, sender: str, msg: wire.Join) -> None:
        """(standalone coordinator that stepped down) Send a joiner to a member of our last epoch."""
        if not self.last_members:
            return
        self.transport.connect(sender, msg.addr)
        self.redirects += 1
        member, addr = self.last_members[self.redirects % len(self.last_members)]
        self._send(sender, wire.Redirect(member, addr))

    def _coordinator_dead(self, now: float, why: str) -> None:
        if self.state is not NodeState.MEMBER or self.coord is not None:
            if self.state in (NodeState.PENDING, NodeState.JOINING):
                self._note("coordinator_lost", why)
                self.state = NodeState.JOINING
                self._try_join(now)
            return
        self.log.warning("coordinator %s presumed dead (%s)", self.coord_id, why)
        self._note("coordinator_lost", f"{self.coord_id}: {why}")
        self.reform_candidates = [m for m in self.members if m != self.coord_id]
        self.old_coord_id, self.old_coord_addr = self.coord_id, self.coord_addr
        self.reform_term = self.term + 1
        self.state = NodeState.REFORMING
        self._next_candidate(now)

    def _next_candidate(self, now: float) -> None:
        while self.reform_candidates and self.reform_candidates[0] in self.dead \
                and self.reform_candidates[0] != self.id:
            self.reform_candidates.pop(0)  # proven gone: do not wait for it
        if not self.reform_candidates:
            self._become_stale(wire.Stale(self.term, self.epoch, self.coord_id, self.coord_addr or self.addr,
                                          "no successor reachable"), now)
            self._apply(self.engine.fail_all(lambda: CoordinatorUnavailable("no coordinator reachable")))
            return
        cand = self.reform_candidates[0]
        rejoin = wire.Rejoin(self.reform_term, self.epoch, self.addr, tuple(self.engine.recent_committed),
                             tuple(self.engine.awaiting_keys()))
        if cand == self.id:
            survivors = [(m, self.addrs[m]) for m in self.reform_candidates if m not in self.dead]
            self.coord = CoordinatorCore(self.id, self.addr, self.t, now, swarm=self.cfg.swarm,
                                         term=self.reform_term,
                                         epoch=self.epoch, members=survivors,
                                         reform_expected={m for m, _ in survivors})
            self._note("coordinator", f"taking over as coordinator, term {self.reform_term}")
            self.log.warning("taking over as coordinator (term %d)", self.reform_term)
            self.coord_id, self.coord_addr = self.id, self.addr
            for m, a in survivors:
                if m != self.id:
                    self.transport.connect(m, a)
            self.transport.send(self.id, rejoin)
            for sender, msg in self.early_rejoins:
                if msg.term == self.reform_term:
                    self._apply(self.coord.on_message(sender, msg, now))
            self.early_rejoins.clear()
        else:
            self._send(cand, rejoin)
        self.reform_deadline = now + self.t.candidate_timeout

    # ------------------------------------------------------------------ (re)joining
    def _begin_join(self) -> None:
        now = time.monotonic()
        self.state = NodeState.JOINING
        self.join_deadline = now + self.t.join_timeout
        if self.coord is not None and self.coord_id == self.id:
            self.transport.send(self.id, wire.Join(self.id, self.addr, self.cfg.swarm))
            self.state = NodeState.PENDING
            return
        first = [self.coord_addr] if self.coord_addr and self.coord_addr != self.addr else []
        self.join_addrs = list(dict.fromkeys(first + self.join_addrs + [a for _, a in self.last_members]))
        self._try_join(now)

    def _try_join(self, now: float) -> None:
        if not self.join_addrs:
            return
        addr = self.join_addrs[self.join_index % len(self.join_addrs)]
        self.join_index += 1
        self._send_join(addr)
        self.join_retry_at = now + self.t.join_retry

    def rejoin(self) -> None:
        """(I/O thread) Leave the stale state and ask to be admitted again."""
        self.members, self.epoch = [], 0
        self._begin_join()

    def submit_rejoin(self, handle: Handle) -> None:
        if NodeState.JOINING not in NODE_TRANSITIONS[self.state] and self.state is not NodeState.JOINING:
            handle.fail(LocalError(f"{self.id} cannot rejoin (state {self.state})"))
            return
        self.rejoin()
        handle.resolve(None)

    def _send_join(self, addr: str) -> None:
        """Send Join to ``addr``. Reuse a link we already have to that address: a second socket with our
        identity to the same ROUTER would take the identity over and drop the first one's messages."""
        self._join_addr = addr
        key = next((p for p, link in self.transport.links.items() if link.addr == addr), None)
        if key is None:
            self.transport.disconnect(SEED)
            self.transport.connect(SEED, addr)
            key = SEED
        self._send(key, wire.Join(self.id, self.addr, self.cfg.swarm))

    def _seed_addr(self) -> str:
        return self._join_addr or self.coord_addr
