"""A peer that is a whole machine: two "machines" of 2 local processes each (Gloo inside, DDP inner steps,
rank 0 the swarm member, ``examples/multi_gpu_peer.py --model tiny``), DiLoCo for a few outer steps.

- parity: all 4 processes end with the same outer weights and momentum, bit for bit (and the same
  parameters), and both machines' rank 0 committed the same digest at every revision;
- equality with a 2-peer run of the same data: two in-process DiLoCo peers, each computing the gradients
  of its machine's two shards and averaging them as DDP does ((g0 + g1) / 2), reach the same digests;
- a local rank's failure fails the whole peer: SIGKILL rank 1 of a machine; its rank 0 stops with an error
  (no hang) and the swarm sees one peer leave.

The launcher: ``launch_machine`` hosts the machine's TCPStore in this process on a free port (port 0) and
starts the ranks with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1,
MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True: every rank connects to the store as a client), so each
test starts 2 processes per machine and no torchrun agent (docs/multi-gpu.md shows the torchrun line).
"""

from __future__ import annotations

import datetime
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from examples.multi_gpu_peer import tiny_batch, tiny_loss, tiny_model
from peer import Swarm
from peer.train.diloco import DiLoCo, RoundRecord
from tests.helpers import HB_TIMEOUT, InProcess, form_swarm, run_all

pytestmark = pytest.mark.timeout(300)  # 4 processes importing torch: ~25 s each on a loaded 2-core box

ROOT = Path(__file__).resolve().parents[2]
H, BATCH, ROUNDS, LR, OUTER_LR, MU = 3, 8, 3, 1e-3, 0.7, 0.9


@dataclass
class Machine:
    name: str
    store: Any
    procs: list[subprocess.Popen[str]]
    logs: list[Path]
    lines: list[list[dict[str, Any]]] = field(default_factory=list)

    def read(self, rank: int, timeout: float) -> dict[str, Any]:
        p = self.procs[rank]
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                raise AssertionError(f"{self.name}/{rank}: no output in {timeout}s; {self.tail(rank)}")
            raw = p.stdout.readline()
            if not raw:
                raise AssertionError(f"{self.name}/{rank} exited rc={p.wait(5)}; {self.tail(rank)}")
            obj: dict[str, Any] = json.loads(raw)
            self.lines[rank].append(obj)
            return obj
        finally:
            sel.close()

    def until(self, rank: int, event: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            obj = self.read(rank, max(0.1, deadline - time.monotonic()))
            if obj.get("event") == event:
                return obj

    def tail(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()


def launch_machine(tmp: Path, name: str, nproc: int, args: list[str]) -> Machine:
    store = dist.TCPStore("127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    m = Machine(name, store, [], [], [[] for _ in range(nproc)])
    for r in range(nproc):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(r),
               "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True",
               "CUDA_VISIBLE_DEVICES": ""}
        log = tmp / f"{name}-{r}.log"
        with open(log, "w") as err:
            m.procs.append(subprocess.Popen([sys.executable, "-m", "examples.multi_gpu_peer", *args],
                                            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
                                            cwd=str(tmp)))
        m.logs.append(log)
    return m


def run_to_done(tmp: Path, args: list[list[str]], timeout: float = 200) -> tuple[list[Machine], list[list[dict[str, Any]]]]:
    """One machine of 2 local ranks per argument list; every rank's final ``done`` event (all killed after)."""
    machines = [launch_machine(tmp, f"m{i}", 2, a) for i, a in enumerate(args)]
    try:
        done = [[m.until(r, "done", timeout) for r in range(2)] for m in machines]
    finally:
        for m in machines:
            m.close()
    return machines, done


def machine_args(inproc: InProcess, coord: Swarm, index: int, extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    return ["--model", "tiny", "--id", f"m-{index}", "--machine", str(index), "--join",
            coord.addr.removeprefix("tcp://"), "--key", str(inproc.keydir / f"m-{index}.key"), "--local-timeouts",
            "--group-timeout", "40", "--batch", str(BATCH), "--lr", str(LR), "--inner-steps", str(H),
            "--outer-steps", str(ROUNDS), "--outer-lr", str(OUTER_LR), "--outer-momentum", str(MU),
            "--op-timeout", "30", "--events", *extra]


# ---------------------------------------------------------------- the 2-peer reference of the same data

def reference_peer(swarm: Swarm, machine: int) -> DiLoCo:
    """One machine's data on one process: per step the gradients of its 2 shards, averaged as DDP does."""
    model = tiny_model(0)
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    opt = DiLoCo(model, inner, swarm, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MU, op_timeout=30,
                 alone_wait=2)
    step = 0
    while opt.revision < ROUNDS:
        grads = []
        for rank in range(2):
            x, y = tiny_batch(machine, rank, step, BATCH)
            model.zero_grad()
            tiny_loss(model, x, y).backward()  # type: ignore[no-untyped-call]
            grads.append([p.grad.clone() for p in model.parameters()])  # type: ignore[union-attr]
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step(samples=2 * BATCH)
        opt.zero_grad()
        step += 1
    opt.finish()
    return opt


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_machines_of_two_processes_hold_the_same_bits_and_match_a_two_peer_run(
        inproc: InProcess, tmp_path: Path, sharding: str) -> None:
    """``fsdp``: the local ranks shard the model with FSDP2 (``LocalFSDPDiLoCo``); FSDP's reduce-scatter
    averages the gradients as DDP does (halving is exact), so the digests are the same bits again."""
    coord = inproc.coordinator()
    extra = ["--fsdp"] if sharding == "fsdp" else []
    machines, done = run_to_done(tmp_path, [machine_args(inproc, coord, i, extra) for i in range(2)])
    flat = [d for ds in done for d in ds]
    assert all(d["revision"] == ROUNDS for d in flat)
    assert len({d["digest"] for d in flat}) == 1, "outer state differs between local ranks or machines"
    assert len({d["params"] for d in flat}) == 1
    full = sum(p.numel() for p in tiny_model(0).parameters())
    for ds in done:   # DDP: every rank holds every parameter; FSDP: the two ranks' shards make one model
        local = [d["local_numel"] for d in ds]
        assert local == [full, full] if sharding == "ddp" else (sum(local) == full and max(local) < full)
    # the machine's samples (2 ranks x BATCH x H) were counted at every sync point
    assert all(s == 2 * BATCH * H for d in flat for s in d["machine_samples"])
    rounds = [{e["revision"]: e for e in m.lines[0] if e.get("event") == "round" and e["committed"]}
              for m in machines]
    assert sorted(rounds[0]) == list(range(1, ROUNDS + 1))
    for rev in range(1, ROUNDS + 1):
        assert rounds[0][rev]["digest"] == rounds[1][rev]["digest"]
        assert rounds[0][rev]["samples"] == 2 * 2 * BATCH * H  # W: both machines' samples

    # the same data on a 2-peer swarm, one process per machine
    _, peers = form_swarm(inproc, 2)
    ref = run_all([lambda i=i, s=s: reference_peer(s, i) for i, s in enumerate(peers)], timeout=90)
    for r in ref:
        if isinstance(r, Exception):
            raise r
    ref_digests = {r.revision: r.digest for r in ref[0].history if r.committed}
    assert ref_digests == {rev: rounds[0][rev]["digest"] for rev in range(1, ROUNDS + 1)}
    assert ref[0].digest.hex() == flat[0]["digest"]


def test_a_local_rank_dying_fails_the_whole_peer_and_the_swarm_sees_it_leave(
        inproc: InProcess, tmp_path: Path) -> None:
    """Machine m-1 (2 local ranks) trains with an in-process peer; SIGKILL its rank 1 after an outer step."""
    coord, [alone] = form_swarm(inproc, 1)
    stop = threading.Event()

    def train_alone() -> DiLoCo:
        model = tiny_model(0)
        opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=LR), alone, inner_steps=H,
                     op_timeout=30, alone_wait=1)
        step = 0
        while not stop.is_set():
            x, y = tiny_batch(0, 0, step, BATCH)
            tiny_loss(model, x, y).backward()  # type: ignore[no-untyped-call]
            opt.step(samples=BATCH)
            opt.zero_grad()
            step += 1
        return opt

    m = launch_machine(tmp_path, "m1", 2, machine_args(inproc, coord, 1, ["--outer-steps", "1000"]))
    kill_a_rank_after_a_sync(m, "m-1", "round", alone, train_alone, stop)


def kill_a_rank_after_a_sync(m: Machine, peer_id: str, sync_event: str, alone: Swarm, train_alone: Any,
                             stop: threading.Event) -> None:
    """``train_alone`` (the in-process peer's loop, until ``stop``) in a thread; once machine ``m`` (swarm
    id ``peer_id``) has a committed ``sync_event`` of revision >= 1, SIGKILL its local rank 1: its rank 0
    must exit with an error, never hang, and the swarm must see exactly one peer leave."""
    worker = threading.Thread(target=train_alone, daemon=True)
    try:
        worker.start()  # blocks in the strategy's entry until the machine joins (the coordinator admits it)
        deadline = time.monotonic() + 90
        while True:  # the machine took part in a committed sync
            e = m.read(0, max(0.1, deadline - time.monotonic()))
            if e.get("event") == sync_event and e["committed"] and e["revision"] >= 1:
                break
        m.procs[1].kill()  # SIGKILL one local rank of the machine
        m.procs[0].wait(timeout=45)  # its rank 0 stops: the next local collective fails, never a hang
        assert m.procs[0].returncode not in (0, None)
        assert "the whole peer stops" in m.tail(0)
        deadline = time.monotonic() + 4 * HB_TIMEOUT + 20
        while peer_id in alone.members:  # the swarm sees one peer leave
            assert time.monotonic() < deadline, alone.members
            time.sleep(0.05)
        assert alone.members == [alone.id]
    finally:
        stop.set()
        m.close()
        worker.join(30)
