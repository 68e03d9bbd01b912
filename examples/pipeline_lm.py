"""One peer of a pipeline: the byte-level LM of ``examples.charlm`` split into stages, trained across the swarm.

Stage 0 embeds (bytes and positions) and runs its blocks, the middle stages run blocks, the last stage runs its
blocks and the output head. Every stage's blocks have the same parameter names (``blocks.<i>.*``), so a lost
middle stage can be rebuilt from its neighbours (CheckFree, ``--rebuild checkfree``). The embedding
(``edge_in``) and the final norm + head (``edge_out``) are edge layers that the runtime runs by position
(``peer.train.pipeline_copies``): with ``--rebuild checkfree+`` odd micro-batches run the first two and the last
two stages swapped (``recovery.checkfree.swapped_order``), the swap partners hold copies of the edge layers
(refreshed every ``--copy-every`` committed steps) and run them there, and a lost first or last stage is
rebuilt by copying its swap partner's blocks plus the copy.

    python -m examples.pipeline_lm --bootstrap --port 7000 --secret swarm.secret --stage 0
    python -m examples.pipeline_lm --join host:7000 --secret swarm.secret [--stage k]

Each peer prints one JSON event per line (``--events``) or a readable line per committed step. Training stops
when the swarm's committed-step counter reaches ``--steps`` (the same moment on every peer).
``examples/local_pipeline.py`` runs a swarm of these on one machine, with faults.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from examples.charlm import Block, Corpus, LMConfig, load_corpus
from peer.cli import add_peer_args, add_snapshot_args, join_list, peer_config_from_args, setup_logging
from peer.swarm import Swarm, new_peer_id
from peer.train.pipeline import Pipeline, StageLost, StepRecord, weights_digest
from peer.train.pipeline_snapshots import StageLayout, open_union, resume_and_snapshot
from recovery.rebuild import StageRebuild

log = logging.getLogger("pipeline_lm")


# ---------------------------------------------------------------------------------------------- the model

def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class Embed(nn.Module):
    """Bytes and positions: (B, T) int64 -> (B, T, C)."""

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Parameter(torch.zeros(c.block, c.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tok(x) + self.pos[: x.shape[1]]


class Head(nn.Module):
    """Final norm and output head: (B, T, C) -> (B, T, V) logits."""

    def __init__(self, c: LMConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))


class LMStage(nn.Module):
    """``blocks`` always; the embedding (``edge_in``) on the first stage, the final norm and head
    (``edge_out``) on the last. ``body`` runs the blocks only (the runtime runs edge layers by position)."""

    def __init__(self, c: LMConfig, blocks: int, first: bool, last: bool, depth: int) -> None:
        super().__init__()
        self.first, self.last = first, last
        self.edge_in: Optional[Embed] = Embed(c) if first else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(blocks))
        self.edge_out: Optional[Head] = Head(c) if last else None
        self.apply(_init)
        for b in self.blocks:    # residual projections scaled down with the whole model's depth (GPT-2)
            assert isinstance(b, Block)
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * depth))
            nn.init.normal_(b.out.weight, std=0.02 / math.sqrt(2 * depth))

    def body(self, x: torch.Tensor) -> torch.Tensor:          # (B, T, C) -> (B, T, C)
        for b in self.blocks:
            x = b(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.edge_in is not None:
            x = self.edge_in(x)                               # (B, T) int64 -> (B, T, C)
        x = self.body(x)
        if self.edge_out is not None:
            x = self.edge_out(x)                              # (B, T, V) logits
        return x


def make_stages(c: LMConfig, num_stages: int, blocks_per_stage: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    depth = num_stages * blocks_per_stage
    return [LMStage(c, blocks_per_stage, i == 0, i == num_stages - 1, depth) for i in range(num_stages)]


def batches(corpus: Corpus, micro: int, block: int, seed: int) -> Any:
    """``get_batch(step, m)``: micro-batch m of step ``step``, a function of its arguments (retries see the
    same data). Step -1 is validation: fixed, evenly spaced windows."""
    val_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get_batch(step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0:
            if not val_cache:
                x, y = corpus.val_windows(block, 16 * micro)
                for i in range(16):
                    val_cache[i] = (x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro])
            return val_cache[m % 16]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + m)
        return corpus.batch("train", micro, block, gen)
    return get_batch


def synthetic_corpus(n: int = 1 << 18, seed: int = 0) -> Corpus:
    """A small deterministic byte corpus (tests: no stdlib reading): a random walk over printable bytes."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-3, 4, (n,), generator=g)
    data = (torch.cumsum(steps, 0) % 64 + 32).to(torch.uint8)
    cut = n - n // 20
    return Corpus(data[:cut].clone(), data[cut:].clone(), 1, 1)


def rebuild_rule(name: str) -> Optional[StageRebuild]:
    if name == "none":
        return None
    from recovery.checkfree import CheckFree
    return CheckFree(norm="post" if name == "checkfree-post" else "pre", plus=name == "checkfree+")


def stage_order(name: str, num_stages: int) -> Optional[Callable[[int], list[int]]]:
    """CheckFree+'s swapped order (the same function of the micro-batch index on every peer), else None."""
    if name != "checkfree+":
        return None
    from recovery.checkfree import swapped_order
    swapped_order(num_stages, 1)   # refuses 3 stages now, not at the first step
    return lambda m: swapped_order(num_stages, m)


def stage_weights(module: nn.Module, prefix: str = "") -> dict[str, Any]:
    """A stage's parameters (those under ``prefix``) as named arrays, for digests."""
    return {n: p.detach().numpy() for n, p in module.named_parameters() if n.startswith(prefix)}


def encode_arrays(arrays: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Named arrays as JSON: dtype, shape and base64 of the raw bytes (tests decode with numpy.frombuffer)."""
    import numpy as np
    out = {}
    for n, a in arrays.items():
        a = np.ascontiguousarray(a)
        out[n] = {"dtype": str(a.dtype), "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode()}
    return out


def dump_rebuilds(path: str, pipe: Pipeline) -> None:
    """What every rebuild at this peer used: the neighbours' arrays and norms, the copies' revisions, and the
    SHA-256 of the weights it loaded (``tests/procs/test_checkfree_plus_live.py`` recomputes the rule)."""
    doc = [{"stage": r["stage"], "step": r["step"], "how": r["how"], "rebuilt_digest": r["rebuilt_digest"],
            "copy_revs": r["copy_revs"],
            "neighbours": {str(j): {"weights": encode_arrays(st.weights), "extra": encode_arrays(st.extra),
                                    "grad_norm": st.grad_norm, "grad_norm_clipped": st.grad_norm_clipped,
                                    "rebuilt": st.rebuilt, "swap_partner": st.swap_partner}
                           for j, st in r["neighbours"].items()}} for r in pipe.rebuilds]
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- the peer

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_peer_args(ap)
    add_snapshot_args(ap)  # --snapshot-dir/-every/-keep; --resume DIR (repeat: the union), with --wait-for
    t = ap.add_argument_group("pipeline")
    t.add_argument("--stage", type=int, default=None, help="ask to serve this stage")
    t.add_argument("--steps", type=int, default=200, help="stop when the swarm has committed this many steps")
    t.add_argument("--stages", type=int, default=4)
    t.add_argument("--blocks-per-stage", type=int, default=1)
    t.add_argument("--micro-batches", type=int, default=4, help="M: micro-batches per step")
    t.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    t.add_argument("--width", type=int, default=64)
    t.add_argument("--block", type=int, default=64, help="context length in bytes")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--rebuild", choices=["none", "checkfree", "checkfree-post", "checkfree+"], default="checkfree",
                   help="how a stage that lost every replica is restored (none: the run stops with StageLost); "
                        "checkfree+: the swapped order, (de)embedding copies on the swap partners, swap-copy")
    t.add_argument("--copy-every", type=int, default=None,
                   help="refresh the (de)embedding copies every this many committed steps (default: 1 with "
                        "checkfree+, no copies otherwise; 0: none)")
    t.add_argument("--digests", action="store_true",
                   help="SHA-256 of my stage's weights (and of each edge layer it owns) in every step event")
    t.add_argument("--dump-rebuild", default=None,
                   help="at the end, write what every rebuild here used (neighbour arrays, norms) to this JSON")
    t.add_argument("--eval-every", type=int, default=10, help="validation loss every this many steps")
    t.add_argument("--eval-batches", type=int, default=4, help="validation micro-batches")
    t.add_argument("--wait-for", type=int, default=0, help="start once this many peers are in")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", choices=["stdlib", "synthetic"], default="stdlib",
                   help="synthetic: a small generated corpus (tests)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--op-timeout", type=float, default=30.0)
    t.add_argument("--admit-every", type=int, default=1, help="admit joiners every this many steps")
    t.add_argument("--single", action="store_true",
                   help="no swarm: train every stage in this process (the benchmark's baseline)")
    t.add_argument("--events", action="store_true", help="JSON events on stdout instead of readable lines")
    t.add_argument("--hold", action="store_true", help="after loading, wait for a line on stdin before joining")
    return ap


class Output:
    def __init__(self, pid: str, events: bool) -> None:
        self.pid, self.events = pid, events

    def event(self, e: dict[str, Any]) -> None:
        e.setdefault("peer", self.pid)
        e.setdefault("t", time.time())
        if self.events:
            print(json.dumps(e), flush=True)
        else:
            print(format_event(e), flush=True)


def format_event(e: dict[str, Any]) -> str:
    head = f"[{e['peer']}]"
    kind = e["event"]
    if kind == "step":
        if not e["committed"]:
            return f"{head} step {e['step']:>4} stage {e['stage']} ABORTED: {e['reason'][:120]}"
        rec = "".join(f"  recovered stage {r['stage']} ({r['how']})" for r in e["recoveries"])
        return (f"{head} step {e['step']:>4} stage {e['stage']} loss {e['loss']:.3f}  mb {e['micro_batches']}  "
                f"{e['seconds']:.2f}s  members {e['members']}{rec}")
    if kind == "eval":
        return f"{head} step {e['step']:>4} val {e['val']:.3f}"
    if kind == "done":
        return f"{head} done: stage {e['stage']}, {e['steps']} steps, sent {e['bytes_sent'] / 1e6:.1f} MB"
    return f"{head} {kind}: {json.dumps({k: v for k, v in e.items() if k not in ('peer', 'event')})}"


def main(argv: Optional[list[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    pid = a.id or new_peer_id()
    setup_logging(a.log_level, pid)
    torch.set_num_threads(a.threads)
    if a.single:
        return single(a)
    if not join_list(a.join) and not a.bootstrap:
        print("pipeline_lm: give --join HOST:PORT or --bootstrap", file=sys.stderr)
        return 2
    corpus = load_corpus() if a.data == "stdlib" else synthetic_corpus(seed=a.seed)
    cfg = LMConfig(block=a.block, width=a.width)
    stages = make_stages(cfg, a.stages, a.blocks_per_stage, a.seed)
    layout = StageLayout.numbered(stages)  # stage-count-independent names (peer.train.pipeline_snapshots)
    union = open_union(a.resume, layout) if a.resume else None  # an incomplete union: refused here
    get_batch = batches(corpus, a.micro_batch, a.block, a.seed)
    out = Output(pid, a.events)
    torch.optim.AdamW(stages[0].parameters())   # torch's lazy optimizer imports, before joining
    if a.hold:
        out.event({"event": "holding"})
        if not sys.stdin.readline():
            return 0  # the harness went away before releasing us
    swarm = Swarm(peer_config_from_args(a, pid))
    out.event({"event": "listening", "addr": swarm.addr,
               "params": [sum(p.numel() for p in s.parameters()) for s in stages]})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        deadline = time.monotonic() + 60
        while swarm.state not in ("pending", "member") and time.monotonic() < deadline:
            time.sleep(0.01)
        out.event({"event": "pending", "state": str(swarm.state)})
        swarm.wait_admitted(timeout=600)
        if a.wait_for:
            swarm.wait_for_members(a.wait_for, timeout=600)

        def on_step(r: StepRecord) -> None:
            e = {"event": "step", "step": r.step, "committed": r.committed, "stage": r.stage,
                 "epoch": r.epoch, "members": len(r.members), "loss": r.loss, "reason": r.reason,
                 "micro_batches": r.micro_batches, "recoveries": [_plain(x) for x in r.recoveries],
                 "bad_peers": r.bad_peers, "seconds": r.seconds, "plan_s": r.plan_s,
                 "compute_s": r.compute_s, "wait_s": r.wait_s, "reduce_s": r.reduce_s,
                 "vote_s": r.vote_s, "bytes_sent": swarm.stats["bytes_sent"], "norms": r.norms}
            if a.digests and r.committed:
                mod = stages[r.stage]
                e["wdigest"] = weights_digest(stage_weights(mod))
                e["edigest"] = {attr: weights_digest(stage_weights(mod, attr + "."))
                                for attr in ("edge_in", "edge_out") if getattr(mod, attr, None) is not None}
            out.event(e)

        pipe = Pipeline(swarm, stages, lambda ps: torch.optim.AdamW(ps, a.lr, betas=(0.9, 0.95),
                                                                    weight_decay=0.0),
                        micro_batches=a.micro_batches, example=get_batch(0, 0), stage=a.stage,
                        max_grad_norm=a.max_grad_norm, rebuild=rebuild_rule(a.rebuild),
                        order=stage_order(a.rebuild, a.stages), op_timeout=a.op_timeout, join_timeout=600,
                        admit_every=a.admit_every, copy_every=a.copy_every, on_step=on_step)
        snaps = resume_and_snapshot(pipe, layout, union, a.snapshot_dir, a.snapshot_every, a.snapshot_keep)
        try:
            if a.wait_for:   # the initial peers (a joiner's first call must be step, as the members')
                v0 = pipe.evaluate(get_batch, a.eval_batches)
                if v0 is not None:
                    out.event({"event": "eval", "step": 0, "val": v0})
            while pipe.committed < a.steps:
                pipe.step(get_batch)
                if pipe.committed % a.eval_every == 0 or pipe.committed >= a.steps:
                    v = pipe.evaluate(get_batch, a.eval_batches)
                    if v is not None:
                        out.event({"event": "eval", "step": pipe.committed, "val": v})
        except StageLost as exc:
            out.event({"event": "stage_lost", "stage": exc.stage, "error": str(exc)})
            return 3
        if a.dump_rebuild:   # before "done": whoever waits for it finds the file complete
            dump_rebuilds(a.dump_rebuild, pipe)
        if snaps is not None:
            snaps.close()   # the last snapshot is on disk
        st = swarm.stats
        out.event({"event": "done", "stage": pipe.stage, "steps": pipe.committed, "digest": pipe.digest(),
                   "aborted": pipe.steps_aborted, "bytes_sent": st["bytes_sent"],
                   "bytes_received": st["bytes_received"], "copies": pipe.copy_stats(),
                   "recoveries": [_plain(x) for x in pipe.recoveries]})
    finally:
        swarm.close()
    return 0


def single(a: argparse.Namespace) -> int:
    """The same stages, micro-batches and optimizer in one process (every stage trained here)."""
    corpus = load_corpus() if a.data == "stdlib" else synthetic_corpus(seed=a.seed)
    stages = make_stages(LMConfig(block=a.block, width=a.width), a.stages, a.blocks_per_stage, a.seed)
    get_batch = batches(corpus, a.micro_batch, a.block, a.seed)
    opts = [torch.optim.AdamW(s.parameters(), a.lr, betas=(0.9, 0.95), weight_decay=0.0) for s in stages]
    out = Output("single", a.events)
    order = stage_order(a.rebuild, a.stages) or (lambda m: list(range(a.stages)))
    first, last = stages[0], stages[-1]
    assert isinstance(first, LMStage) and isinstance(last, LMStage)
    for step in range(a.steps):
        t0 = time.perf_counter()
        total = 0.0
        for m in range(a.micro_batches):
            x, y = get_batch(step, m)
            for pos, k in enumerate(order(m)):      # edge layers by position, as the pipeline runs them
                stage = stages[k]
                assert isinstance(stage, LMStage)
                if pos == 0 and first.edge_in is not None:
                    x = first.edge_in(x)
                x = stage.body(x)
                if pos == a.stages - 1 and last.edge_out is not None:
                    x = last.edge_out(x)
            loss = torch.nn.functional.cross_entropy(x.reshape(-1, x.shape[-1]), y.reshape(-1))
            (loss / a.micro_batches).backward()
            total += float(loss.detach())
        for s, o in zip(stages, opts):
            torch.nn.utils.clip_grad_norm_(list(s.parameters()), a.max_grad_norm)
            o.step()
            o.zero_grad()
        dt = time.perf_counter() - t0
        out.event({"event": "step", "step": step, "committed": True, "stage": -1, "epoch": 0, "members": 1,
                   "loss": total / a.micro_batches, "reason": "", "micro_batches": a.micro_batches,
                   "recoveries": [], "bad_peers": [], "seconds": dt, "plan_s": 0.0, "compute_s": dt,
                   "wait_s": 0.0, "reduce_s": 0.0, "vote_s": 0.0, "bytes_sent": 0})
    out.event({"event": "done", "stage": -1, "steps": a.steps, "digest": "", "aborted": 0, "bytes_sent": 0,
               "bytes_received": 0, "recoveries": []})
    return 0


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, list, dict, bool, type(None)))}


if __name__ == "__main__":
    sys.exit(main())
