"""DiLoCo.state_dict() / load_state_dict(): a checkpoint round trip restores outer weights, momentum, revision
and the inner optimizer; a swarm restarted from one checkpoint agrees on it; a lone peer restored from an old
checkpoint into a running swarm takes the swarm's state instead of rolling it back; bad checkpoints are
refused before anything changes.

(Needs the patch /tmp/H-diloco-state.patch on peer/train/diloco.py, issue 15.)"""

from __future__ import annotations

import copy
import functools
from typing import Any

import numpy as np
import pytest
import torch

from collectives.errors import LocalError
from peer import Swarm
from peer.train.diloco import DiLoCo, RoundRecord, flatten_params, state_digest
from tests.helpers import InProcess, form_swarm, run_all
from tests.inproc.test_diloco import MU, OUTER_LR, local_step, make_inner, make_model

pytestmark = pytest.mark.timeout(60)

H = 2


def make_opt(swarm: Swarm, index: int, records: list[RoundRecord]) -> DiLoCo:
    model = make_model(index)
    return DiLoCo(model, make_inner(model), swarm, inner_steps=H, outer_lr=OUTER_LR, outer_momentum=MU,
                  op_timeout=30, alone_wait=2, on_round=records.append)


def rounds(opts: list[DiLoCo], n: int, start: int = 0) -> None:
    """Every peer makes ``n`` rounds of H local steps (in parallel: the syncs are collectives)."""
    def one(i: int, opt: DiLoCo) -> None:
        for step in range(start, start + n * H):
            local_step(opt.model, opt, i, step)
    results = run_all([functools.partial(one, i, o) for i, o in enumerate(opts)], timeout=45)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def two(inproc: InProcess) -> tuple[list[DiLoCo], list[list[RoundRecord]]]:
    _, peers = form_swarm(inproc, 2)
    records: list[list[RoundRecord]] = [[], []]
    opts = run_all([functools.partial(make_opt, peers[i], i, records[i]) for i in range(2)], timeout=30)
    for o in opts:
        if isinstance(o, BaseException):
            raise o
    return opts, records


def test_round_trip_and_restart_from_one_checkpoint(inproc: InProcess) -> None:
    opts, _ = two(inproc)
    rounds(opts, 2)
    saved = [copy.deepcopy(o.state_dict()) for o in opts]
    sd = saved[0]
    assert sd["revision"] == opts[0].revision == 2
    assert sd["theta"].numpy().tobytes() == opts[0].theta.tobytes()
    assert sd["momentum"].numpy().tobytes() == opts[0].mom.tobytes()
    assert sd["digest"] == state_digest(opts[0].theta, opts[0].mom).hex()
    assert saved[1]["digest"] == sd["digest"]            # the outer state is shared
    allowed = (torch.Tensor, int, float, str, bool, type(None), dict, list, tuple)
    def plain(x: Any) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return isinstance(x, allowed)
    assert plain(sd)                                       # torch.load(weights_only=True) can read it

    rounds(opts, 1, start=2 * H)                           # the state moves on: revision 3
    assert opts[0].revision == 3 and opts[0].digest.hex() != sd["digest"]
    for o, s in zip(opts, saved):
        o.load_state_dict(s)
    for o, s in zip(opts, saved):
        assert o.revision == 2 and o.digest.hex() == sd["digest"]
        assert flatten_params(o.params).tobytes() == o.theta.tobytes() == sd["theta"].numpy().tobytes()
        inner = o.inner.state_dict()["state"]
        for k, st in s["inner"]["state"].items():
            assert torch.equal(inner[k]["exp_avg"], st["exp_avg"])
            assert torch.equal(inner[k]["exp_avg_sq"], st["exp_avg_sq"])
    # the inner state belongs to each peer: peer 1 got its own back, not peer 0's
    assert not torch.equal(opts[1].inner.state_dict()["state"][0]["exp_avg"], sd["inner"]["state"][0]["exp_avg"])

    rounds(opts, 1, start=3 * H)                           # a restarted swarm agrees on the checkpoint
    assert opts[0].revision == opts[1].revision == 3
    assert opts[0].digest == opts[1].digest
    assert opts[0].history[-1].committed and opts[0].history[-1].my_samples > 0


def test_lone_restored_peer_takes_the_swarms_state(inproc: InProcess) -> None:
    opts, records = two(inproc)
    rounds(opts, 1)
    old = copy.deepcopy(opts[0].state_dict())               # revision 1
    rounds(opts, 2, start=H)                                 # revision 3
    opts[0].load_state_dict(old)
    assert opts[0].revision == 1
    rounds(opts, 1, start=3 * H)
    assert opts[0].revision == opts[1].revision == 4         # not rolled back to 2
    assert opts[0].digest == opts[1].digest
    mine = [r for r in records[0] if r.revision == 4][-1]
    assert mine.committed and mine.adopted and mine.my_samples == 0   # its steps from the old state: dropped


def test_bad_checkpoints_are_refused_unchanged(inproc: InProcess) -> None:
    opts, _ = two(inproc)
    rounds(opts, 1)
    o = opts[0]
    good = copy.deepcopy(o.state_dict())
    before = (o.digest, o.revision, flatten_params(o.params).tobytes())

    def bad(**changes: Any) -> dict[str, Any]:
        s = copy.deepcopy(good)
        s.update(changes)
        return s

    edited = good["theta"].clone()
    edited[0] += 1.0
    for s in (bad(version=99), bad(theta=good["theta"][:-1]), bad(theta=edited), bad(revision=-1),
              bad(fragments=2)):
        with pytest.raises(LocalError):
            o.load_state_dict(s)
        assert (o.digest, o.revision, flatten_params(o.params).tobytes()) == before
    wrong_inner = bad(inner={"state": {}, "param_groups": []})
    with pytest.raises(ValueError):
        o.load_state_dict(wrong_inner)
    assert (o.digest, o.revision) == before[:2]
    assert np.array_equal(o.theta, good["theta"].numpy())
