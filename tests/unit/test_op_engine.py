"""The op engine as a pure core: entry points return actions, nothing else does I/O. Two engines run one
all-reduce by handing each other their ``Data`` actions, with the verdict given by hand: the digests
agree, the caller's buffers stay untouched until the commit verdict (I2), and an abort leaves them as
they were."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from collectives import ring, wire
from collectives.errors import OpAborted
from peer.core.actions import Action, Data, Suspect, ToCoordinator
from peer.core.ops import OpEngine, OpSpec
from peer.handle import Handle

pytestmark = pytest.mark.timeout(30)

SLICE = 1 << 12  # 1024 float32 per slice: several slices per chunk
# float32 elements of an all-reduce that runs in one step (ring.DirectAllReduce), and of one that runs
# in the ring (ring.AllReduce), between two members
SIZES = {"direct": 5000, "ring": ring.DIRECT_MAX_BYTES // 4 + 5000}


def engines() -> dict[str, OpEngine]:
    out = {m: OpEngine(m, SLICE, True, 1 << 24) for m in ("a", "b")}
    for e in out.values():
        assert e.new_epoch(1, 5, ["a", "b"], "test") == []
    return out


def run(engs: dict[str, OpEngine], first: dict[str, list[Action]]) -> dict[str, list[wire.Message]]:
    """Deliver every ``Data`` action to its engine until none is left; return what each asked the
    coordinator. Checks the contract: only ``Data`` and ``ToCoordinator`` come out of a clean op, and a
    payload handed out is never written afterwards."""
    to_coord: dict[str, list[wire.Message]] = {m: [] for m in engs}
    queue: list[tuple[str, Action]] = [(m, a) for m, acts in first.items() for a in acts]
    sent: list[tuple[Any, bytes]] = []
    while queue:
        src, act = queue.pop(0)
        if isinstance(act, ToCoordinator):
            to_coord[src].append(act.msg)
            continue
        assert isinstance(act, Data), act
        assert isinstance(act.msg, wire.Chunk)
        payload = np.array(act.payload, copy=True)  # what a socket would carry
        sent.append((act.payload, payload.tobytes()))
        engs[src].flush()  # the driver flushes after applying a batch (here: after each send)
        queue += [(act.to, a) for a in engs[act.to].on_chunk(src, act.msg, payload.view(np.uint8), 0.0)]
    for buf, before in sent:  # zero-copy sends: the engine never wrote a buffer after handing it out
        assert np.asarray(buf).tobytes() == before
    return to_coord


@pytest.mark.parametrize("algo", list(SIZES))
def test_an_all_reduce_reads_top_to_bottom_as_actions(algo: str) -> None:
    engs = engines()
    rng = np.random.default_rng(0)
    xs = {m: rng.standard_normal(SIZES[algo]).astype(np.float32) for m in engs}
    orig = {m: x.copy() for m, x in xs.items()}
    handles = {m: Handle("all_reduce") for m in engs}
    first = {m: engs[m].issue(OpSpec("all_reduce", [xs[m]]), handles[m], 0.0) for m in engs}
    core = engs["a"].ops[(5, "w", 0)].core
    assert type(core) is (ring.DirectAllReduce if algo == "direct" else ring.AllReduce)
    assert all(acts and all(isinstance(a, Data) for a in acts) for acts in first.values())
    asked = run(engs, first)
    for m in engs:
        assert np.array_equal(xs[m], orig[m])  # nothing written before the verdict (I2)
        (done,) = asked[m]
        assert isinstance(done, wire.OpDone) and (done.epoch, done.group, done.seq) == (5, "w", 0)
    assert asked["a"][0].digest == asked["b"][0].digest != b""
    for m in engs:
        assert engs[m].on_verdict(wire.OpVerdict(1, 5, "w", 0, True, 0, ""), 1.0) == []
        handles[m].wait(0)
    assert np.array_equal(xs["a"], xs["b"])
    assert np.array_equal(xs["a"], orig["a"] + orig["b"])


@pytest.mark.parametrize("algo", list(SIZES))
def test_an_aborted_op_leaves_the_callers_buffer_as_it_was(algo: str) -> None:
    engs = engines()
    x = np.arange(SIZES[algo], dtype=np.float32)
    y = np.ones(SIZES[algo], dtype=np.float32)
    ha, hb = Handle("all_reduce"), Handle("all_reduce")
    first = {"a": engs["a"].issue(OpSpec("all_reduce", [x]), ha, 0.0),
             "b": engs["b"].issue(OpSpec("all_reduce", [y]), hb, 0.0)}
    run(engs, first)
    engs["a"].on_verdict(wire.OpVerdict(1, 5, "w", 0, False, 0, "b: stalled"), 1.0)
    with pytest.raises(OpAborted):
        ha.wait(0)
    assert np.array_equal(x, np.arange(SIZES[algo], dtype=np.float32))


def test_bad_data_turns_into_a_suspect_and_an_abort_request() -> None:
    engs = engines()
    h = Handle("all_reduce")
    engs["a"].issue(OpSpec("all_reduce", [np.zeros(SIZES["ring"], np.float32)]), h, 0.0)
    bad = wire.Chunk(5, "w", 0, wire.PHASE_REDUCE_SCATTER, 0, 0, "float32", 3)  # wrong element count
    out = engs["a"].on_chunk("b", bad, np.zeros(3, np.float32).view(np.uint8), 0.1)
    kinds = [type(a) for a in out]
    assert Suspect in kinds and ToCoordinator in kinds
    assert any(isinstance(a, ToCoordinator) and isinstance(a.msg, wire.OpFail) for a in out)
    assert [a for a in out if isinstance(a, Suspect)][0].peer == "b"
