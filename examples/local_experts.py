"""Sparse expert sync on 4 local peers with churn: an owner is killed partway, a joiner comes later.

    python -m examples.local_experts [--syncs 8] [--sync-steps 10] [--out examples/results]

A coordinator and 4 peers in this process (real loopback sockets, encrypted like any swarm) train the MoE LM
(``examples.moe_lm``, small) with ``ExpertSync`` (r = 2). After sync 3 peer p3 crashes (no goodbye): the
survivors' next sync aborts and reruns without it, its experts get new owners. After sync 5 a peer ``late``
joins: it catches up the full model by the shared-state sync and takes experts at once. Ends with a table
(per peer: experts owned after each sync, steps, bytes; swarm: validation loss before/after, syncs,
reassignments, reruns) and a PNG (validation loss and experts owned per peer, per sync).

``measure_bytes`` (used by ``examples.experts_experiment --bytes``): bytes per sync per peer, from the
transport counters of live 4-peer runs, for DiLoCo / full averaging and for SPES with r = 1 and r = 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from collectives import keys
from examples.charlm import Corpus, load_corpus
from examples.moe_lm import MoEConfig, MoELM, evaluate
from peer.config import PeerConfig, SecurityConfig, Timeouts
from peer.swarm import Swarm
from peer.train.diloco import DiLoCo
from peer.train.experts import ExpertSync, SyncRecord, expert_map

RESULTS = Path(__file__).resolve().parent / "results"
SMALL = MoEConfig(width=32, layers=2, heads=2, experts=8, top_k=2, expert_hidden=64, block=64)
BATCH = 8


class LocalSwarm:
    """A coordinator and peers in this process, with their own swarm secret and keys."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="swarmtrain-experts-"))
        keys.save_secret(self.dir / "swarm.secret", keys.new_secret())
        self.t = Timeouts.local(heartbeat_timeout=4.0, coordinator_timeout=4.0)  # torch in every thread
        self.swarms: list[Swarm] = []
        self.coord = self._add(PeerConfig(peer_id="coord", coordinator=True, member=False, timeouts=self.t,
                                          security=self._sec("coord")))

    def _sec(self, name: str) -> SecurityConfig:
        return SecurityConfig(secret_file=str(self.dir / "swarm.secret"), key_file=str(self.dir / f"{name}.key"))

    def _add(self, cfg: PeerConfig) -> Swarm:
        s = Swarm(cfg)
        self.swarms.append(s)
        return s

    def peer(self, name: str) -> Swarm:
        return self._add(PeerConfig(peer_id=name, join=(self.coord.addr,), timeouts=self.t,
                                    security=self._sec(name)))

    @staticmethod
    def crash(s: Swarm) -> None:
        """Like SIGKILL for an in-process peer: its I/O thread stops, sockets close, no goodbye."""
        s.node._stop.set()
        s.node._thread.join(5)
        s.node.transport.close()

    def close(self) -> None:
        for s in reversed(self.swarms):  # peers first, the coordinator last (no failover at teardown)
            if s.node._thread.is_alive():
                s.close()
            elif not s.node.transport.closed:
                s.node.transport.close()


def _threads(fns: list[Callable[[], Any]], timeout: float) -> list[Any]:
    out: list[Any] = [None] * len(fns)

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            out[i] = fn()
        except Exception as exc:  # reported by the caller
            out[i] = exc

    ts = [threading.Thread(target=wrap, args=(i, f), daemon=True) for i, f in enumerate(fns)]
    for t in ts:
        t.start()
    deadline = time.monotonic() + timeout
    for t in ts:
        t.join(max(0.1, deadline - time.monotonic()))
    if any(t.is_alive() for t in ts):
        raise TimeoutError("a peer did not finish in time")
    return out


def _check(results: list[Any]) -> None:
    for r in results:
        if isinstance(r, Exception):
            raise r


def _form(ls: "LocalSwarm", peers: list[Swarm], timeout: float = 120.0) -> None:
    """Until every peer is a member: whenever the coordinator holds joiners, the members admit them
    (``update_topology``, a collective of all members; as tests/helpers.form_swarm)."""
    deadline = time.monotonic() + timeout
    n = len(peers)
    while any(len(p.members) < n or p.state != "member" for p in peers):
        if time.monotonic() > deadline:
            raise TimeoutError(f"swarm not formed: {[p.state for p in peers]}")
        members = [p for p in peers if p.state == "member"]
        core = ls.coord.node.coord
        if len(members) >= 2 and core is not None and core.pending:
            _check(_threads([functools.partial(p.update_topology, 60) for p in members], 90))
        else:
            time.sleep(0.05)


def _trainer(s: Swarm, index: int, corpus: Corpus, cfg: MoEConfig, syncs: int, H: int, r: int,
             hook: Optional[Callable[[ExpertSync, SyncRecord], None]] = None, lr: float = 0.008,
             registry: Optional[dict[str, ExpertSync]] = None) -> ExpertSync:
    s.wait_admitted(60)
    torch.manual_seed(0)
    model = MoELM(cfg)
    box: list[ExpertSync] = []
    opt = ExpertSync(model, lambda ps: torch.optim.AdamW(ps, lr, betas=(0.9, 0.95)), s,
                     experts=expert_map(model), sync_steps=H, owners_per_expert=r, op_timeout=120,
                     alone_wait=10, join_timeout=120,
                     on_sync=lambda rec: hook(box[0], rec) if hook is not None and box else None)
    box.append(opt)
    if registry is not None:
        registry[s.id] = opt
    gen = torch.Generator().manual_seed(100 + index)
    step = 0
    while opt.revision < syncs and step < 10 * syncs * H:
        x, y = corpus.batch("train", BATCH, cfg.block, gen)
        model.loss(x, y).backward()
        opt.step(samples=BATCH)
        opt.zero_grad()
        step += 1
    opt.finish()
    return opt


def run(a: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    corpus = load_corpus(max_bytes=4_000_000)
    val = corpus.val_windows(SMALL.block, 64)
    torch.manual_seed(0)
    before = evaluate(MoELM(SMALL), val)
    ls = LocalSwarm()
    names = ["p0", "p1", "p2", "p3"]
    swarms = [ls.peer(n) for n in names]
    curve: list[tuple[int, float]] = []
    late: dict[str, Swarm] = {}
    lock = threading.Lock()
    registry: dict[str, ExpertSync] = {}   # every peer's ExpertSync, the killed one's too
    try:
        _form(ls, swarms)

        def hook(opt: ExpertSync, rec: SyncRecord) -> None:
            if not rec.committed:
                return
            if opt.swarm.id == "p0":
                with lock:
                    curve.append((rec.revision, evaluate(opt.model, val)))  # type: ignore[arg-type]
            if opt.swarm.id == "p3" and rec.revision == a.kill_at:
                ls.crash(opt.swarm)
                raise RuntimeError("p3 killed (crash, no goodbye)")
            if rec.revision == a.join_at and opt.swarm.id != "late":  # members wait for the joiner's request
                deadline = time.monotonic() + 60
                while "s" not in late or late["s"].state != "pending":
                    if time.monotonic() > deadline:
                        raise TimeoutError("the joiner never asked to join")
                    time.sleep(0.05)

        def joiner() -> ExpertSync:
            deadline = time.monotonic() + 600
            while not curve or curve[-1][0] < a.join_at:
                if time.monotonic() > deadline:
                    raise TimeoutError("the swarm never reached the join point")
                time.sleep(0.05)
            late["s"] = ls.peer("late")
            return _trainer(late["s"], 4, corpus, SMALL, a.syncs, a.sync_steps, 2, hook, registry=registry)

        t0 = time.time()
        results = _threads([lambda s=s, i=i: _trainer(s, i, corpus, SMALL, a.syncs, a.sync_steps, 2, hook,
                                                      registry=registry)
                            for i, s in enumerate(swarms)] + [joiner], 3000)
        seconds = time.time() - t0
    finally:
        ls.close()
    opts = {n: r for n, r in zip(names + ["late"], results) if isinstance(r, ExpertSync)}
    everyone = {n: registry[n] for n in names + ["late"] if n in registry}
    errors = {n: str(r) for n, r in zip(names + ["late"], results) if isinstance(r, Exception)}
    if set(errors) - {"p3"}:
        raise RuntimeError(f"peers failed: {errors}")
    ref = opts["p0"]
    after = evaluate(ref.model, val)  # type: ignore[arg-type]
    digests = {n: o.digest.hex() for n, o in opts.items()}
    peers: dict[str, dict[str, Any]] = {}
    for n, o in everyone.items():
        hist = [h for h in o.history if h.committed or h.kind == "entry"]
        peers[n] = {"owned": {h.revision: len(h.owned) for h in hist}, "steps": o.inner_step_count,
                    "syncs": sum(1 for h in o.history if h.committed),
                    "bytes_sent": sum(h.bytes_sent for h in o.history),
                    "bytes_received": sum(h.bytes_received for h in o.history),
                    # experts newly owned at a membership change (not the first assignment at revision 0)
                    "gained": sum(h.gained for h in o.history if h.revision > 0),
                    "reruns": sum(h.retried for h in o.history)}
    summary = {"val_loss_before": before, "val_loss_after": after, "syncs": ref.revision,
               "reassignments": sum(p["gained"] for p in peers.values()),
               "reruns": max(p["reruns"] for p in peers.values()), "bit_identical": len(set(digests.values())) == 1,
               "killed": errors, "seconds": round(seconds, 1), "peers": peers, "curve": sorted(curve),
               "model": SMALL.__dict__, "sync_steps": a.sync_steps, "owners_per_expert": 2}
    return summary


def print_table(s: dict[str, Any]) -> None:
    revs = sorted({int(r) for p in s["peers"].values() for r in p["owned"]})
    print(f"\n{'peer':<6}" + "".join(f"{'s' + str(r):>5}" for r in revs)
          + f"{'steps':>8}{'syncs':>7}{'sent kB':>10}{'recv kB':>10}{'gained':>8}")
    for n, p in s["peers"].items():
        owned = {int(k): v for k, v in p["owned"].items()}
        cells = "".join(f"{owned[r]:>5}" if r in owned else f"{'-':>5}" for r in revs)
        print(f"{n:<6}{cells}{p['steps']:>8}{p['syncs']:>7}{p['bytes_sent'] / 1e3:>10.0f}"
              f"{p['bytes_received'] / 1e3:>10.0f}{p['gained']:>8}")
    print("(columns s<k>: experts owned after sync k; p3 was killed, 'late' joined; gained: experts newly owned"
          " at a membership change)")
    print(f"\nswarm: validation loss {s['val_loss_before']:.3f} -> {s['val_loss_after']:.3f}; {s['syncs']} syncs; "
          f"{s['reassignments']} expert reassignments; {s['reruns']} sync(s) rerun on survivors; "
          f"bit-identical at the end: {s['bit_identical']}; killed: {list(s['killed'])}; {s['seconds']:.0f}s")


def plot(s: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs, ys = zip(*s["curve"]) if s["curve"] else ((), ())
    ax1.plot(xs, ys, marker="o")
    ax1.set_xlabel("sync (revision)")
    ax1.set_ylabel("validation loss (nats/byte)")
    ax1.set_title("4 peers, p3 killed, a joiner later")
    styles = ["-", "--", ":", "-.", "-"]
    for j, (n, p) in enumerate(s["peers"].items()):
        pts = sorted((int(k), v) for k, v in p["owned"].items())
        ax2.step([k for k, _ in pts], [v + 0.08 * (j - 2) for _, v in pts], where="post", label=n,
                 linestyle=styles[j % len(styles)], linewidth=2)
    ax2.set_xlabel("sync (revision)")
    ax2.set_ylabel("experts owned (all layers; lines offset by 0.08 to stay visible)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def measure_bytes(cfg: MoEConfig, rounds: int = 3, H: int = 2) -> dict[str, dict[str, Any]]:
    """Bytes per sync per peer (mean over 4 peers and ``rounds`` syncs after the first), from the transport
    counters of live in-process runs: everything the transport moved, heartbeats and votes included."""
    torch.set_num_threads(1)
    corpus = load_corpus(max_bytes=2_000_000)
    schemes: dict[str, tuple[str, int, Optional[float]]] = {
        "avg/diloco": ("diloco", 0, None), "spes": ("spes", 1, None), "spes_outer": ("spes", 1, 1.0),
        "spes_r2": ("spes", 2, None)}
    out: dict[str, dict[str, Any]] = {}
    for arm, (kind, r, olr) in schemes.items():
        ls = LocalSwarm()
        try:
            swarms = [ls.peer(f"p{i}") for i in range(4)]
            _form(ls, swarms)
            marks: dict[str, list[tuple[int, int]]] = {s.id: [] for s in swarms}

            def one(s: Swarm, i: int) -> None:
                torch.manual_seed(0)
                model = MoELM(cfg)
                gen = torch.Generator().manual_seed(i)
                opt: Any
                if kind == "diloco":
                    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), 1e-3), s, inner_steps=H,
                                 op_timeout=120)
                else:
                    opt = ExpertSync(model, lambda ps: torch.optim.AdamW(ps, 1e-3), s, experts=expert_map(model),
                                     sync_steps=H, owners_per_expert=r, outer_lr=olr, outer_momentum=0.5,
                                     op_timeout=120)
                for step in range(H * (rounds + 1)):
                    if step % H == 0:
                        st = s.stats
                        marks[s.id].append((int(st["bytes_sent"]), int(st["bytes_received"])))
                    x, y = corpus.batch("train", BATCH, cfg.block, gen)
                    model.loss(x, y).backward()
                    opt.step(samples=BATCH)
                    opt.zero_grad()
                st = s.stats
                marks[s.id].append((int(st["bytes_sent"]), int(st["bytes_received"])))

            res = _threads([functools.partial(one, s, i) for i, s in enumerate(swarms)], 1200)
            bad = [r for r in res if isinstance(r, Exception)]
            if bad:
                raise RuntimeError(f"{arm}: {bad[0]}")
        finally:
            ls.close()
        # from the end of the first sync to the end: `rounds` syncs (and their local steps)
        sent = [(m[-1][0] - m[1][0]) / rounds for m in marks.values()]
        recv = [(m[-1][1] - m[1][1]) / rounds for m in marks.values()]
        n_params = sum(p.numel() for p in MoELM(cfg).parameters())
        out[arm] = {"sent": sum(sent) / 4, "received": sum(recv) / 4, "sent_per_peer": sent,
                    "received_per_peer": recv, "params": n_params,
                    "what": "full-parameter all-reduce per sync (the sync arm moves this every step)"
                    if kind == "diloco" else f"shared all-reduce + owner reduce + expert all-gather, r={r}"}
        print(f"{arm:<12} sent {out[arm]['sent'] / 1e3:9.1f} kB  received {out[arm]['received'] / 1e3:9.1f} kB "
              "per sync per peer", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--syncs", type=int, default=8)
    ap.add_argument("--sync-steps", type=int, default=10)
    ap.add_argument("--kill-at", type=int, default=3, help="p3 crashes after this sync")
    ap.add_argument("--join-at", type=int, default=5, help="a joiner asks to join after this sync")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    s = run(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "experts_local_summary.json").write_text(json.dumps(s, indent=1))
    print_table(s)
    plot(s, out / "experts_local.png")
    print(f"wrote {out / 'experts_local_summary.json'}, {out / 'experts_local.png'}")


if __name__ == "__main__":
    main()
