"""Per-peer training memory of sparse expert sync against training every expert, measured from the tensors.

    python -m examples.experts_memory [--peers 4] [--owners 1] [--json]

Builds the MoE LM (``examples.moe_lm``, default width 128, 4 layers, 8 experts), takes the experts one peer
of ``--peers`` owns with ``--owners`` owners per expert (``peer.train.experts_own.owners``), freezes the rest
exactly as ``ExpertSync`` does (``ExpertLayout.freeze``) and runs a few AdamW steps; the baseline runs the
same steps with every expert trainable. Each configuration runs in its own process, so its peak RSS is its
own. Reported: bytes of gradients + optimizer state (every tensor in ``optimizer.state``), counted from the
tensors; expected ratio = (shared + owned expert parameters) / (all parameters). AdamW's per-parameter
``step`` counters are scalars, which is why measured and expected can differ in the sixth decimal.
With ``--json`` the last line is one JSON object (``expected_ratio``, ``measured_ratio``, ...).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
from dataclasses import asdict
from typing import Any

import torch

from examples.moe_lm import MoEConfig, MoELM
from peer.train.experts import ExpertLayout, expert_map
from peer.train.experts_own import owned_by, owners


def measure(cfg: MoEConfig, peers: int, r: int, sparse: bool, steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MoELM(cfg)
    lay = ExpertLayout(model, expert_map(model))
    ids = [f"peer{i}" for i in range(peers)]
    mine = owned_by(owners(ids, lay.layers, lay.n_experts, r), ids[0]) if sparse else set(lay.bounds)
    params = lay.freeze(mine)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, cfg.vocab, (4, cfg.block), generator=g)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    trainable = sum(p.numel() for p in params)
    return {"grad_bytes": grads, "state_bytes": state, "bytes": grads + state, "trainable_params": trainable,
            "all_params": lay.size, "owned_experts": len(mine),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _child(args: tuple[MoEConfig, int, int, bool, int]) -> dict[str, Any]:
    return measure(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--owners", type=int, default=1, help="owners per expert (r)")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    a = ap.parse_args()
    cfg = MoEConfig(width=a.width, layers=a.layers, experts=a.experts, expert_hidden=a.expert_hidden)
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        full = pool.apply(_child, ((cfg, a.peers, a.owners, False, a.steps),))
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        sparse = pool.apply(_child, ((cfg, a.peers, a.owners, True, a.steps),))
    expected = sparse["trainable_params"] / full["trainable_params"]
    measured = sparse["bytes"] / full["bytes"]
    print(f"model: {full['all_params']} parameters ({a.layers} layers x {a.experts} experts); peer 0 of "
          f"{a.peers} with r = {a.owners} owns {sparse['owned_experts']} experts")
    print(f"{'':<22}{'all experts':>14}{'SPES peer':>14}{'ratio':>10}")
    for k in ("trainable_params", "grad_bytes", "state_bytes", "bytes", "peak_rss_bytes"):
        print(f"{k:<22}{full[k]:>14}{sparse[k]:>14}{sparse[k] / full[k]:>10.6f}")
    print(f"expected ratio (shared + owned) / all = {expected:.6f}; measured (grads + optimizer state) = "
          f"{measured:.6f}")
    if a.json:
        print(json.dumps({"expected_ratio": expected, "measured_ratio": measured, "peers": a.peers,
                          "owners_per_expert": a.owners, "model": asdict(cfg), "all_experts": full,
                          "spes_peer": sparse,
                          "rss_ratio": sparse["peak_rss_bytes"] / full["peak_rss_bytes"]}))


if __name__ == "__main__":
    main()
