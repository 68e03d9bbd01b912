"""Bytes on the wire per DiLoCo outer step, measured, for every pseudo-gradient codec.

    python -m examples.bytes_per_step [--peers 4] [--rounds 3]

Starts a coordinator and N peers in this process (real loopback sockets, encrypted like any swarm), trains the
example LM for a few outer steps per codec, and reports what each peer's transport sent per outer step
(everything: the state-sync hashes, the weight all-reduce, the pseudo-gradient all-reduce, heartbeats and
commit votes), next to the ring's payload alone: 2 (N-1)/N x parameters x bytes per value.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from collectives import keys
from examples.charlm import CharLM, LMConfig, load_corpus, param_count
from peer.config import PeerConfig, SecurityConfig, Timeouts
from peer.train.diloco import DiLoCo
from peer.swarm import Swarm

WIDTH = {"none": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="outer steps measured per codec")
    ap.add_argument("--inner-steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    corpus = load_corpus(max_bytes=2_000_000)
    cfg = LMConfig()
    n_params = param_count(CharLM(cfg))
    keydir = Path(tempfile.mkdtemp(prefix="swarmtrain-bytes-"))
    keys.save_secret(keydir / "swarm.secret", keys.new_secret())
    t = Timeouts.local(heartbeat_timeout=3.0, coordinator_timeout=3.0)  # torch on every core: some slack

    def sec(name: str) -> SecurityConfig:
        return SecurityConfig(secret_file=str(keydir / "swarm.secret"), key_file=str(keydir / f"{name}.key"))

    print(f"model: {n_params} parameters; {a.peers} peers; bytes sent per peer per outer step")
    print(f"{'codec':<7}{'measured':>14}{'ring payload':>15}")
    for codec in ("none", "fp16", "bf16", "int8"):
        coord = Swarm(PeerConfig(peer_id="coord", coordinator=True, member=False, timeouts=t,
                                 security=sec("coord")))
        swarms = [Swarm(PeerConfig(peer_id=f"p{i}", join=(coord.addr,), timeouts=t, security=sec(f"p{i}")))
                  for i in range(a.peers)]
        per_round: list[float] = []
        try:
            def train(i: int, s: Swarm) -> None:
                s.wait_admitted(60)
                s.wait_for_members(a.peers, 60)
                torch.manual_seed(0)
                model = CharLM(cfg)
                opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), 1e-3), s, inner_steps=a.inner_steps,
                             codec=codec, op_timeout=120)
                gen = torch.Generator().manual_seed(i)
                start = 0
                for step in range(a.inner_steps * (a.rounds + 1)):
                    if step == a.inner_steps:  # measure from the end of the first outer step
                        start = s.stats["bytes_sent"]
                    x, y = corpus.batch("train", 8, cfg.block, gen)
                    model.loss(x, y).backward()
                    opt.step(samples=8)
                    opt.zero_grad()
                if i == 0:
                    per_round.append((s.stats["bytes_sent"] - start) / a.rounds)

            threads = [threading.Thread(target=train, args=(i, s)) for i, s in enumerate(swarms)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(600)
        finally:
            for s in swarms:
                s.close()
            coord.close()
        ring = 2 * (a.peers - 1) / a.peers * n_params * WIDTH[codec]
        print(f"{codec:<7}{per_round[0] / 1e3:>11.1f} kB{ring / 1e3:>12.1f} kB", flush=True)
        time.sleep(0.5)


if __name__ == "__main__":
    main()
