"""``swarmtrain`` / ``python -m peer``: the command line.

    swarmtrain coordinator --host 127.0.0.1 --port 7000
    swarmtrain peer --join 127.0.0.1:7000 --workload allreduce --mb 4 --ops 100
    swarmtrain peer --bootstrap --workload train --task examples.charlm_task:task --snapshot-dir snaps
    swarmtrain peer --bootstrap --workload train --task examples.charlm_task:task --resume snaps
    swarmtrain demo
    swarmtrain bench allreduce --peers 4 --mb 64 --json
    swarmtrain keygen --secret swarm.secret
    swarmtrain simulate --peers 4 --link 100mbit --churn --duration 60
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import fields
from typing import TYPE_CHECKING, Any, Optional, Sequence

from collectives import keys
from collectives.errors import LocalError
from collectives.transport import Limits
from peer.config import (DEFAULT_KEY_FILE, INSECURE_WARNING, KEY_ENV, PeerConfig, SecurityConfig, Timeouts,
                         cli_flag)
from peer.swarm import Swarm, new_peer_id
from recovery.snapshot import SnapshotError

if TYPE_CHECKING:
    from peer.train.diloco import DiLoCoConfig

log = logging.getLogger("swarmtrain")


TIMEOUT_HELP = {
    "heartbeat_interval": "how often a peer heartbeats to the coordinator",
    "heartbeat_timeout": "a member silent this long (e.g. stalled) is evicted",
    "coordinator_timeout": "no heartbeat ack this long: peers presume the coordinator dead and re-form",
    "reconnect_grace": "a dropped link not back within this is a dead peer",
    "reform_window": "how long a successor coordinator waits for survivors to check in",
    "op_progress_timeout": "an op that receives no bytes for this long is aborted everywhere",
    "verdict_timeout": "after a caller's deadline, how long it still waits for the op's verdict",
    "join_timeout": "joining gives up if not admitted within this",
    "resend_interval": "a commit request with no verdict after this long is sent again",
    "ack_slack": "scheduling slack added to two heartbeat intervals when judging a coordinator alive",
}


def add_timeout_args(p: argparse.ArgumentParser, defaults: Optional[Timeouts] = None) -> None:
    """One flag per ``Timeouts`` field (``--heartbeat-interval`` ...); read them with ``Timeouts.from_args``."""
    d = defaults or Timeouts()
    g = p.add_argument_group("timeouts (seconds)")
    for f in fields(Timeouts):
        g.add_argument(cli_flag(f.name), type=float, default=getattr(d, f.name),
                       help=TIMEOUT_HELP.get(f.name, f.name.replace("_", " ")))


def add_net_args(p: argparse.ArgumentParser) -> None:
    """--host, --port, --swarm, --log-level and the security flags (--secret, --key, --allow, --insecure)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default 0: any free port)")
    p.add_argument("--swarm", default="default", help="swarm name (peers of another swarm are refused)")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ...)")
    g = p.add_argument_group("security (on by default: every connection is encrypted and authenticated)")
    g.add_argument("--secret", default="", metavar="FILE",
                   help="the swarm secret (create with `swarmtrain keygen --secret FILE`, copy to every "
                        "machine); default: $SWARMTRAIN_SECRET. Required unless --insecure")
    g.add_argument("--key", default="", metavar="FILE",
                   help=f"this peer's key pair, created (mode 0600) on first run; default: ${KEY_ENV} or "
                        f"{DEFAULT_KEY_FILE}")
    g.add_argument("--allow", default="", metavar="FILE",
                   help="optional allowlist: only these public keys may connect (lines '<hex key> [peer id]'; "
                        "an id pins that id to that key)")
    g.add_argument("--insecure", action="store_true",
                   help="NO encryption, NO authentication: anyone who can reach the port can join and read or "
                        "alter traffic. For benchmarks on a trusted network only")


def security_from_args(a: argparse.Namespace) -> SecurityConfig:
    """The security flags of ``add_net_args`` (prints a loud banner on --insecure: the CLI owns stderr)."""
    if a.insecure:
        bar = "!" * 78
        print(f"{bar}\n!! swarmtrain --insecure: {INSECURE_WARNING}\n{bar}", file=sys.stderr, flush=True)
    return SecurityConfig(secret_file=a.secret, key_file=a.key, allow_file=a.allow, insecure=a.insecure)


def add_peer_args(p: argparse.ArgumentParser) -> None:
    """The flags a swarm member needs: --join, --bootstrap, --id, ``add_net_args``, --advertise and the
    timeouts. Build its config with ``peer_config_from_args``::

        ap = argparse.ArgumentParser(); peer.cli.add_peer_args(ap); ap.add_argument("--my-flag")
        a = ap.parse_args(); peer.cli.setup_logging(a.log_level, a.id or "peer")
        swarm = Swarm(peer.cli.peer_config_from_args(a))
    """
    p.add_argument("--join", action="append", default=[],
                   help="HOST:PORT of the coordinator or any peer (repeat or comma-separate for several)")
    p.add_argument("--bootstrap", action="store_true",
                   help="start a new swarm: this peer also runs the coordinator role")
    p.add_argument("--id", default=None, help="peer id (default: random)")
    add_net_args(p)
    p.add_argument("--advertise", default="",
                   help="HOST:PORT other peers should connect to instead of the bound address "
                        "(e.g. a proxy or a NAT in front of this peer)")
    add_timeout_args(p)


def join_list(values: Sequence[str]) -> tuple[str, ...]:
    """``--join`` values (repeated and/or comma-separated) as one tuple of addresses."""
    return tuple(a for v in values for a in v.split(",") if a)


def add_snapshot_args(p: argparse.ArgumentParser) -> None:
    """The snapshot flags of a training peer (docs/snapshots.md); read them with ``snapshot_options_from_args``."""
    g = p.add_argument_group("snapshots")
    g.add_argument("--snapshot-dir", default="", metavar="DIR",
                   help="write the shared state (outer weights, momentum, revision) here in the background")
    g.add_argument("--snapshot-every", type=int, default=10, metavar="K", help="a snapshot every K revisions")
    g.add_argument("--snapshot-keep", type=int, default=2, help="complete snapshots kept (default 2)")
    g.add_argument("--resume", action="append", default=[], metavar="DIR",
                   help="start from this snapshot (a rev-N directory, or a root: its newest; repeat for "
                        "several peers' directories: the newest complete snapshot among them, or for a "
                        "pipeline their union); with --bootstrap this restarts a swarm after every peer was "
                        "lost. A live swarm's newer state always wins; a corrupt snapshot is refused, "
                        "naming the file")


def snapshot_options_from_args(a: argparse.Namespace, peer_id: str) -> dict[str, Any]:
    """``{"snapshots": Snapshotter | None, "resume": Snapshot | None}`` for ``DiLoCo(..., **options)``.
    The resume snapshot is verified (every tensor's size and SHA-256) before the peer joins."""
    from recovery.snapshot import open_newest
    from recovery.snapshot_writer import Snapshotter

    resume = None
    if a.resume:
        resume = open_newest(a.resume)
        resume.verify()
    snaps = (Snapshotter(a.snapshot_dir, every=a.snapshot_every, keep=a.snapshot_keep, meta={"peer": peer_id})
             if a.snapshot_dir else None)
    return {"snapshots": snaps, "resume": resume}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``--workload train``: the task (``peer.train.task``) and DiLoCo's options."""
    g = p.add_argument_group("training (--workload train: DiLoCo on --task)")
    g.add_argument("--task", default="", metavar="MODULE:CALLABLE",
                   help="returns a peer.train.task.Task (model, inner optimizer, batches), e.g. "
                        "examples.charlm_task:task (importable from the current directory)")
    g.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for the task (repeat); e.g. width=64")
    g.add_argument("--seed", type=int, default=0, help="the task's seed (model init: the same on every peer)")
    g.add_argument("--outer-steps", type=int, default=100, help="stop when the swarm's revision reaches this")
    # DiLoCo's options; unset ones keep DiLoCoConfig's defaults (docs/diloco.md)
    g.add_argument("--inner-steps", type=int, default=None, help="H: local steps between syncs (default 100)")
    g.add_argument("--outer-lr", type=float, default=None, help="outer learning rate (default 0.7)")
    g.add_argument("--outer-momentum", type=float, default=None, help="outer momentum (default 0.9)")
    g.add_argument("--no-nesterov", action="store_true", help="plain outer momentum instead of Nesterov")
    g.add_argument("--mode", choices=["sync", "eager", "streaming"], default=None, help="default sync")
    g.add_argument("--fragments", type=int, default=None, help="streaming: parameter fragments")
    g.add_argument("--op-timeout", type=float, default=None, help="deadline of one sync collective (600 s)")
    g.add_argument("--first-sync-timeout", type=float, default=None,
                   help="a peer's first sync waits this long for a partner (600 s)")
    g.add_argument("--alone-wait", type=float, default=None,
                   help="alone at a sync: wait this long for a partner, then discard the local steps (10 s)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    add_snapshot_args(p)


def diloco_config_from_args(a: argparse.Namespace) -> "DiLoCoConfig":
    """``DiLoCoConfig`` from ``add_train_args``' flags (raises ``LocalError`` for a bad combination)."""
    from peer.train.diloco import DiLoCoConfig

    given = {"inner_steps": a.inner_steps, "outer_lr": a.outer_lr, "outer_momentum": a.outer_momentum,
             "mode": a.mode, "fragments": a.fragments, "op_timeout": a.op_timeout,
             "join_timeout": a.first_sync_timeout, "alone_wait": a.alone_wait}
    return DiLoCoConfig(nesterov=not a.no_nesterov, codec=a.codec,
                        **{k: v for k, v in given.items() if v is not None})


def peer_config_from_args(a: argparse.Namespace, peer_id: Optional[str] = None, **overrides: Any) -> PeerConfig:
    """A ``PeerConfig`` from the flags of ``add_peer_args``; ``overrides`` set further PeerConfig fields.
    Raises ``LocalError`` for a bad combination (e.g. neither --join nor --bootstrap)."""
    return PeerConfig(peer_id=peer_id or a.id or new_peer_id(), host=a.host, port=a.port, swarm=a.swarm,
                      join=join_list(a.join), advertise=a.advertise, coordinator=a.bootstrap,
                      timeouts=Timeouts.from_args(a), security=security_from_args(a), **overrides)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="swarmtrain", description="Train one model across unreliable machines.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("coordinator", help="run a standalone coordinator (membership and votes, no tensors)",
                       description="Run a standalone coordinator. It orders membership epochs, runs topology "
                                   "votes and gives every op its verdict; it carries no tensor data. If it "
                                   "dies, the peers re-form under a successor and carry on.")
    c.add_argument("--id", default="coordinator", help="this node's id (default: coordinator)")
    add_net_args(c)
    add_timeout_args(c)

    p = sub.add_parser("peer", help="run a peer that joins a swarm",
                       description="Run a peer. It prints one JSON line with its address, joins, and runs "
                                   "the chosen workload.")
    add_peer_args(p)
    p.add_argument("--workload", choices=["allreduce", "bench", "catchup-source", "catchup-joiner", "train",
                                          "none"],
                   default="allreduce",
                   help="allreduce: repeated all-reduces surviving churn; bench: wait for --expect "
                        "peers, then time --ops all-reduces (a signal leaves at once); train: DiLoCo on --task (with snapshots and "
                        "--resume); none: only keep membership")
    p.add_argument("--expect", type=int, default=2, help="bench/catchup: number of peers to wait for")
    p.add_argument("--state-mb", type=float, default=100, help="catchup: shared state size in MiB")
    p.add_argument("--warmup", type=int, default=2, help="bench: untimed all-reduces first")
    p.add_argument("--slice-bytes", type=int, default=4 << 20, help="frame size for tensor data")
    p.add_argument("--streams", type=int, default=1,
                   help="TCP connections per neighbour for tensor data (more fill long, fat WAN links)")
    p.add_argument("--retain-freed-mb", type=float, default=256,
                   help="freed frame memory malloc keeps for the next op instead of unmapping it (MiB, "
                        "default 256; 0 leaves malloc alone; glibc only; docs/performance.md)")
    p.add_argument("--no-bandwidth-probes", action="store_true",
                   help="do not probe links to new members (the ring then keeps its join order)")
    p.add_argument("--elems", type=int, default=262144, help="float32 elements per all-reduce")
    p.add_argument("--ops", type=int, default=None, help="stop after this many committed ops")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--pause", type=float, default=0.0, help="seconds to sleep between ops")
    p.add_argument("--record", default=None, help="append one JSON line per op attempt to this file")
    p.add_argument("--progress", action="store_true", help="print one line per op to stderr")
    p.add_argument("--no-digest", action="store_true", help="skip the per-op BLAKE2b parity digest")
    p.add_argument("--max-early-mb", type=float, default=1024,
                   help="data this peer holds for ops it has not started yet, at most (MiB, default 1024)")
    p.add_argument("--codec", choices=["none", "fp16", "bf16", "int8"], default="none",
                   help="compress all-reduce traffic (lossy; results stay bit-identical on every peer)")
    add_train_args(p)

    d = sub.add_parser("demo", help="local demo: a coordinator and 4 peers all-reducing while peers die and join",
                       description="Start a coordinator and 4 local peer processes doing repeated all-reduces; "
                                   "kill one, stall one, add new ones, kill the coordinator, and print a "
                                   "summary (ops committed/aborted, members over time, parity check).")
    d.add_argument("--duration", type=float, default=40.0, help="seconds of churn (default 40)")
    d.add_argument("--peers", type=int, default=4, help="peers at the start (default 4)")
    d.add_argument("--elems", type=int, default=1 << 20, help="float32 elements per all-reduce")
    d.add_argument("--workdir", default=None, help="keep the peers' records here (default: a temp dir)")
    d.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    sim = sub.add_parser("simulate", help="rehearse a swarm on emulated internet links, with faults",
                         description="Start a coordinator and N peers, each on its own emulated host (a network "
                                     "namespace with tbf-shaped links; loopback without root), optionally "
                                     "behind a delaying proxy; inject faults from a seed or a schedule; record "
                                     "a history and check the invariants on it (see peer/simulate.py).")
    from peer.sim.args import add_args as add_simulate_args

    add_simulate_args(sim)

    k = sub.add_parser("keygen", help="create a swarm secret and/or this peer's key pair",
                       description="Create key material (files get mode 0600 and are never overwritten). "
                                   "--secret FILE makes a new swarm secret: whoever holds it can join, so copy "
                                   "it to the swarm's machines over a channel you trust (scp). --key FILE (or "
                                   "no flag) creates this peer's key pair if missing and prints its public "
                                   "key, the line to put in an allowlist.")
    k.add_argument("--secret", default="", metavar="FILE", help="create a new swarm secret in FILE")
    k.add_argument("--key", default="", metavar="FILE",
                   help=f"create (if missing) and show this peer's key pair; default ${KEY_ENV} or {DEFAULT_KEY_FILE}")

    b = sub.add_parser("bench", help="benchmarks", description="Benchmarks that measure a baseline in the same run.")
    bsub = b.add_subparsers(dest="bench", required=True)
    ba = bsub.add_parser("allreduce", help="swarmtrain ring all-reduce vs torch.distributed Gloo",
                         description="Run N local peer processes all-reducing a float32 buffer, then Gloo with "
                                     "the same N and size, and print both bus bandwidths and the ratio.")
    ba.add_argument("--peers", type=int, default=2, help="number of local peer processes (default 2)")
    ba.add_argument("--mb", type=float, default=64, help="buffer size in MiB (default 64)")
    ba.add_argument("--iters", type=int, default=10, help="timed iterations (default 10)")
    ba.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations (default 2)")
    ba.add_argument("--slice-mb", type=float, default=4, help="frame size in MiB for swarmtrain (default 4)")
    ba.add_argument("--no-digest", action="store_true", help="skip swarmtrain's per-op parity digest")
    ba.add_argument("--streams", type=int, default=1, help="TCP connections per neighbour (default 1)")
    ba.add_argument("--codec", choices=["none", "fp16", "bf16", "int8"], default="none",
                    help="compress swarmtrain's all-reduce (reports effective bandwidth and error)")
    ba.add_argument("--retain-freed-mb", type=float, default=256,
                    help="the peers' --retain-freed-mb (0: freed frames go back to the kernel, as before "
                         "issue 14's malloc settings)")
    ba.add_argument("--skip-gloo", action="store_true", help="do not run the Gloo baseline")
    ba.add_argument("--insecure", action="store_true",
                    help="run swarmtrain without encryption/authentication (to measure security's cost)")
    ba.add_argument("--json", action="store_true", help="print one JSON object")
    bc = bsub.add_parser("catchup", help="shared-state catch-up of a joiner from 1 and from several sources",
                         description="Sources hold an identical shared state; a joiner with zeros syncs "
                                     "receive-only and pulls it, split across the sources, verifying hashes.")
    bc.add_argument("--mb", type=float, default=100, help="state size in MiB (default 100)")
    bc.add_argument("--sources", default="1,3", help="comma-separated source counts to measure (default 1,3)")
    bc.add_argument("--json", action="store_true", help="print one JSON object")
    bj = bsub.add_parser("join", help="time joins with and without authentication",
                         description="In one process, over loopback: a coordinator and one member, then time "
                                     "--trials fresh peers joining (start to admitted), secure (CURVE + ZAP + "
                                     "Hello) and insecure, and print both medians and the ratio.")
    bj.add_argument("--trials", type=int, default=20, help="joins per mode (default 20)")
    bj.add_argument("--json", action="store_true", help="print one JSON object")
    return ap


def setup_logging(level: str, who: str) -> None:
    """Log records to stderr, each line tagged with ``who`` (the peer id)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING), stream=sys.stderr,
                        format=f"%(asctime)s {who} %(levelname)s %(name)s: %(message)s")


def _wait_for_signal(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class Interrupted(Exception):
    """SIGTERM or SIGINT during a workload that has no step boundary to stop at (``_interrupt_on_signal``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def _interrupt_on_signal() -> None:
    """SIGTERM and SIGINT raise ``Interrupted`` in the main thread, out of whatever call it waits in.

    For the bench and catch-up workloads: they time a few long calls (an op's deadline is 300 s), and
    there is no training state to keep, so they leave at once instead of at their next boundary; the
    ``finally`` of ``cmd_peer`` still leaves the swarm (``Swarm.close``); a second signal while it does
    ends the process. The training and all-reduce workloads keep ``_wait_for_signal``: they stop between
    steps."""
    def handler(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second signal while leaving ends the process
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise Interrupted(signum)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_coordinator(a: argparse.Namespace) -> int:
    setup_logging(a.log_level, a.id)
    swarm = Swarm(PeerConfig(peer_id=a.id, host=a.host, port=a.port, swarm=a.swarm, coordinator=True,
                             member=False, timeouts=Timeouts.from_args(a), security=security_from_args(a)))
    print(json.dumps({"event": "listening", "id": swarm.id, "addr": swarm.addr}), flush=True)
    stop = threading.Event()
    _wait_for_signal(stop)
    while not stop.wait(0.5):
        if swarm.node.error is not None:
            return 1
    swarm.node.close()
    return 0


def cmd_peer(a: argparse.Namespace) -> int:
    from peer.bench.catchup import run_catchup
    from peer.bench.worker import bench_worker
    from peer.sim.workload import AllReduceWorkload, run_allreduce

    pid = a.id or new_peer_id()
    setup_logging(a.log_level, pid)
    if not join_list(a.join) and not a.bootstrap:
        print("swarmtrain peer: give --join HOST:PORT or --bootstrap", file=sys.stderr)
        return 2
    training = _prepare_training(a, pid) if a.workload == "train" else None  # slow work before joining
    cfg = peer_config_from_args(a, pid, parity_digest=not a.no_digest, slice_bytes=a.slice_bytes,
                                limits=Limits(streams=a.streams,
                                              retain_freed_bytes=int(a.retain_freed_mb * (1 << 20))),
                                bandwidth_probes=not a.no_bandwidth_probes,
                                max_early_bytes=int(a.max_early_mb * (1 << 20)))
    swarm = Swarm(cfg)
    stop = threading.Event()
    record = open(a.record, "a", encoding="utf-8") if a.record else None
    try:
        if a.workload == "bench" or a.workload.startswith("catchup"):
            _interrupt_on_signal()
        else:
            _wait_for_signal(stop)
        # after the handlers: from this line on, a signal leaves the swarm
        print(json.dumps({"event": "listening", "id": swarm.id, "addr": swarm.addr,
                          "bound": swarm.node.transport.addr}), flush=True)
        swarm.wait_admitted(timeout=cfg.timeouts.join_timeout)
        summary: dict[str, Any]
        if training is not None:
            summary = _train(swarm, a, training, stop)
        elif a.workload == "none":
            while not stop.wait(0.5):
                if a.duration is not None:
                    break
            summary = swarm.stats
        elif a.workload.startswith("catchup"):
            summary = run_catchup(swarm, a.state_mb, a.workload == "catchup-joiner", a.expect)
        elif a.workload == "bench":
            summary = bench_worker(swarm, a.elems, a.ops or 10, a.warmup, a.expect,
                                codec=None if a.codec == "none" else a.codec)
        else:
            w = AllReduceWorkload(elems=a.elems, ops=a.ops, duration=a.duration, pause=a.pause,
                                  codec=None if a.codec == "none" else a.codec)
            summary = run_allreduce(swarm, w, record, sys.stderr if a.progress else None, stop=stop)
        print(json.dumps({"event": "done", **summary}), flush=True)
    except Interrupted as exc:
        print(json.dumps({"event": "interrupted", "reason": str(exc)}), flush=True)
        return 128 + exc.signum
    finally:
        if record is not None:
            record.close()
        swarm.close()
    return 0


def _prepare_training(a: argparse.Namespace, pid: str) -> tuple[Any, dict[str, Any]]:
    """The task and the snapshot options, before joining (a corrupt --resume snapshot stops us here)."""
    import torch

    from peer.train.task import TaskContext, load_task, parse_options

    if not a.task:
        raise LocalError("--workload train needs --task MODULE:CALLABLE")
    if a.threads:
        torch.set_num_threads(a.threads)
    task = load_task(a.task, TaskContext(pid, a.seed, parse_options(a.task_arg)))
    diloco_config_from_args(a)  # a bad combination of options is refused before joining
    return task, snapshot_options_from_args(a, pid)


def _train(swarm: Swarm, a: argparse.Namespace, training: tuple[Any, dict[str, Any]],
           stop: threading.Event) -> dict[str, Any]:
    from peer.train.task import train

    task, snap_opts = training
    return train(swarm, task, diloco_config_from_args(a), a.outer_steps,
                 lambda e: print(json.dumps(e), flush=True), stop=stop, **snap_opts)


def cmd_keygen(a: argparse.Namespace) -> int:
    if a.secret:
        keys.save_secret(a.secret, keys.new_secret())
        print(f"swarm secret written to {a.secret} (mode 0600). Whoever holds it can join the swarm: copy it "
              f"to each machine over a channel you trust (e.g. scp) and pass --secret {a.secret}.")
        if not a.key:
            return 0
    path = a.key or os.environ.get(KEY_ENV, "") or DEFAULT_KEY_FILE
    existed = os.path.exists(os.path.expanduser(path))
    kp = keys.load_or_create_keypair(path)
    print(f"peer key {'(existing) ' if existed else ''}{path}\npublic key (for an allowlist): {kp.public.hex()}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _dispatch(a)
    except LocalError as exc:  # our own misuse (missing secret, unreadable key file): say it, no traceback
        print(f"swarmtrain {a.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except SnapshotError as exc:  # a corrupt, missing or stale --resume snapshot: the message names the file
        print(f"swarmtrain {a.cmd}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _dispatch(a: argparse.Namespace) -> int:
    if a.cmd == "keygen":
        return cmd_keygen(a)
    if a.cmd == "coordinator":
        return cmd_coordinator(a)
    if a.cmd == "peer":
        return cmd_peer(a)
    if a.cmd == "demo":
        from peer.sim.demo import run_demo

        return run_demo(a)
    if a.cmd == "simulate":
        from peer.sim.cli import run_cli

        return run_cli(a)
    if a.cmd == "bench" and a.bench == "join":
        from peer.bench.join import run_join_bench

        return run_join_bench(a)
    if a.cmd == "bench":
        from peer.bench.allreduce import run_bench

        return run_bench(a)
    return 2


if __name__ == "__main__":
    sys.exit(main())
