"""One peer of a training swarm: a byte-level transformer LM on the Python stdlib sources, trained with DiLoCo.

On each machine (same swarm secret everywhere; `swarmtrain keygen --secret swarm.secret` makes one):

    python -m examples.train_swarm --bootstrap --host 0.0.0.0 --port 7000 --secret swarm.secret  # the first
    python -m examples.train_swarm --join firsthost:7000 --secret swarm.secret                   # the others

Each peer prints one line per outer step. Training stops when the swarm's outer step counter reaches
``--outer-steps`` (the same moment on every peer: the counter is shared state), so peers that join late
stop with the others. ``examples/local_swarm.py`` runs 4 of these (plus a kill and a join) on one machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
import zlib
from typing import Any, Optional

import torch

from examples.charlm import CharLM, LMConfig, evaluate, load_corpus, param_count
from peer.cli import (add_peer_args, add_snapshot_args, join_list, peer_config_from_args,
                      setup_logging, snapshot_options_from_args)
from peer.train.diloco import DiLoCo, RoundRecord
from peer.swarm import Swarm, new_peer_id

log = logging.getLogger("train_swarm")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_peer_args(ap)  # --join, --bootstrap, --id, --host/--port, security, --advertise, timeouts
    add_snapshot_args(ap)  # --snapshot-dir, --snapshot-every, --snapshot-keep, --resume
    t = ap.add_argument_group("training")
    t.add_argument("--outer-steps", type=int, default=100,
                   help="stop when the swarm has made this many outer steps (streaming: x fragments syncs)")
    t.add_argument("--inner-steps", type=int, default=25, help="H: local steps between syncs")
    t.add_argument("--mode", choices=["sync", "eager", "streaming"], default="sync")
    t.add_argument("--fragments", type=int, default=1, help="streaming: parameter fragments")
    t.add_argument("--codec", default="none", choices=["none", "fp16", "bf16", "int8"],
                   help="compression of the pseudo-gradient all-reduce")
    t.add_argument("--lr", type=float, default=4e-3, help="inner AdamW peak learning rate")
    t.add_argument("--outer-lr", type=float, default=0.7)
    t.add_argument("--outer-momentum", type=float, default=0.9)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--block", type=int, default=64, help="context length in bytes")
    t.add_argument("--seed", type=int, default=0, help="model init seed (the swarm adopts the first member's)")
    t.add_argument("--wait-for", type=int, default=0,
                   help="start training only once this many peers are in (the initial peers of a run)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (1 per peer when peers share a machine)")
    t.add_argument("--events", action="store_true", help="print JSON events instead of readable lines")
    t.add_argument("--hold", action="store_true", help="after loading, wait for a line on stdin before joining")
    return ap


def format_round(e: dict[str, Any]) -> str:
    """One readable line per sync (also used by local_swarm.py for its peers' events)."""
    head = f"[{e['peer']}] outer {e['revision']:>4}  step {e['step']:>6}"
    if e["kind"] == "entry":
        how = "took the outer state from the peers" if e["adopted"] else "already holds the swarm's outer state"
        return f"{head}  joined: {how}; {e['members']} members"
    if not e["committed"]:
        return f"{head}  sync not committed ({e['reason']}): local steps discarded"
    val = f"  val {e['val']:.3f}" if e.get("val") is not None else ""
    retried = "  (a member was lost mid-sync: averaged without it)" if e["retried"] else ""
    return (f"{head}  loss {e['loss']:.3f}{val}  members {e['members']}  sync {e['sync_s']:.2f}s  "
            f"sent {e['bytes_sent'] / 1e6:.1f} MB{retried}")


def schedule(step: int, total: int, warmup: int = 50) -> float:
    """LR multiplier: linear warm-up, then cosine to 10 % at ``total`` (global) steps."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    pid = a.id or new_peer_id()
    setup_logging(a.log_level, pid)
    torch.set_num_threads(a.threads)
    if not join_list(a.join) and not a.bootstrap:
        print("train_swarm: give --join HOST:PORT or --bootstrap", file=sys.stderr)
        return 2

    # everything slow happens before joining, so an admitted peer is ready for the swarm's next sync
    corpus = load_corpus()
    cfg = LMConfig(block=a.block, width=a.width, layers=a.layers)
    torch.manual_seed(a.seed)
    model = CharLM(cfg)
    val = corpus.val_windows(cfg.block, 64)
    gen = torch.Generator().manual_seed(zlib.crc32(pid.encode()))  # this peer's own data order
    inner = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    out = _Output(pid, a.events)
    if a.hold:
        out.event({"event": "holding", "id": pid})
        if not sys.stdin.readline():
            return 0  # the harness went away before releasing us

    snap_opts = snapshot_options_from_args(a, pid)  # a corrupt --resume snapshot is refused before joining
    swarm = Swarm(peer_config_from_args(a, pid))
    out.event({"event": "listening", "id": swarm.id, "addr": swarm.addr, "params": param_count(model)})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        swarm.wait_admitted(timeout=600)
        if a.wait_for:
            swarm.wait_for_members(a.wait_for, timeout=600)
        state: dict[str, Any] = {"loss": 0.0, "n": 0, "val0": None, "samples": 0}

        def on_round(rec: RoundRecord) -> None:
            evaluator = rec.committed and rec.members and rec.members[0] == swarm.id
            v = None
            if evaluator or (rec.kind == "entry" and state["val0"] is None and not rec.adopted):
                v = evaluate(model, val)  # the model holds the outer weights right after a sync
            if rec.kind == "entry" and v is not None:
                state["val0"] = v
            out.round(rec, swarm, state, v, steps=opt_ref[0].inner_step_count if opt_ref else 0)
            state["loss"], state["n"] = 0.0, 0

        opt_ref: list[DiLoCo] = []
        opt = DiLoCo(model, inner, swarm, inner_steps=a.inner_steps, outer_lr=a.outer_lr,
                     outer_momentum=a.outer_momentum, codec=a.codec, mode=a.mode, fragments=a.fragments,
                     on_round=on_round, **snap_opts)
        opt_ref.append(opt)
        # the shared revision counts syncs: one per outer step, or one per fragment in streaming mode
        interval, target = a.inner_steps // a.fragments, a.outer_steps * a.fragments
        offset = opt.revision * interval  # a joiner continues the swarm's LR schedule
        total = a.outer_steps * a.inner_steps
        sched = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: schedule(s + offset, total))
        while opt.revision < target:
            x, y = corpus.batch("train", a.batch, cfg.block, gen)
            loss = model.loss(x, y)
            loss.backward()
            state["loss"] += float(loss.detach())
            state["n"] += 1
            state["samples"] += a.batch
            opt.step(samples=a.batch)
            opt.zero_grad()
            sched.step()
        opt.finish()
        if snap_opts["snapshots"] is not None:
            snap_opts["snapshots"].close()  # waits for the last snapshot to be on disk
        final = evaluate(model, val)
        st = swarm.stats
        out.event({"event": "done", "peer": pid, "steps": opt.inner_step_count, "samples": state["samples"],
                   "revision": opt.revision, "digest": opt.digest.hex(), "val": final, "val0": state["val0"],
                   "bytes_sent": st["bytes_sent"], "bytes_received": st["bytes_received"],
                   "faults": opt.faults, "rounds": sum(r.committed for r in opt.history)})
    finally:
        swarm.close()
    return 0


class _Output:
    """Readable lines on stdout, or JSON events (for local_swarm.py, which prints the lines itself)."""

    def __init__(self, pid: str, events: bool) -> None:
        self.pid, self.events, self.t0 = pid, events, time.time()

    def event(self, e: dict[str, Any]) -> None:
        if self.events:
            print(json.dumps(e), flush=True)
        elif e["event"] == "holding":
            print(f"[{self.pid}] loaded; waiting for a line on stdin before joining", flush=True)
        elif e["event"] == "listening":
            print(f"[{self.pid}] listening on {e['addr']} (model: {e['params']} parameters)", flush=True)
        elif e["event"] == "done":
            print(f"[{self.pid}] done: {e['steps']} steps, {e['samples']} samples, outer step {e['revision']}, "
                  f"val {e['val']:.3f}, sent {e['bytes_sent'] / 1e6:.1f} MB", flush=True)

    def round(self, rec: RoundRecord, swarm: Swarm, state: dict[str, Any], val: Optional[float],
              steps: int) -> None:
        e = {"event": "round", "peer": self.pid, "t": rec.t, "kind": rec.kind, "revision": rec.revision,
             "committed": rec.committed, "members": len(rec.members) or len(swarm.members),
             "adopted": rec.adopted, "retried": rec.retried, "reason": rec.reason, "step": steps,
             "loss": state["loss"] / max(1, state["n"]), "val": val, "sync_s": rec.seconds,
             "my_samples": rec.my_samples, "samples": state["samples"], "bytes_sent": swarm.stats["bytes_sent"],
             "digest": rec.digest}
        if self.events:
            print(json.dumps(e), flush=True)
        else:
            print(format_round(e), flush=True)


if __name__ == "__main__":
    sys.exit(main())
