"""Pure parts of the simulator: link specs, fault plans, the history checker, the timeline plot; and the
namespace fabric on its own (skipped where namespaces cannot be created)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from collectives.errors import LocalError
from peer.sim import faults as F
from peer.sim.history import check_history, live_intervals, max_stall, merge_ops
from peer.sim.netns import Fabric, LinkSpec, leftovers, parse_link, parse_rate, probe, reap_orphans
from peer.sim.procs import REPO_ROOT
from peer.sim.timeline import write_timeline

NETNS_OK, NETNS_WHY = probe()
needs_netns = pytest.mark.skipif(not NETNS_OK, reason=f"network namespaces unavailable: {NETNS_WHY}")


def test_rates_and_links() -> None:
    assert parse_rate("100mbit") == 100e6
    assert parse_rate("1.5Gbit") == 1.5e9
    assert parse_link("20mbit/100mbit") == LinkSpec(20e6, 100e6)
    assert parse_link("none") == LinkSpec()
    assert parse_link("100mbit").slowest() == 100e6
    for bad in ("fast", "100mbps", "1bit", "-5mbit"):
        with pytest.raises(LocalError):
            parse_rate(bad)


def test_schedule_file_and_random_plan(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"at": 5, "kind": "stall", "peer": "peer1"}, {"at": 1, "kind": "join"}]))
    plan = F.load_schedule(path)
    assert [f.kind for f in plan] == ["join", "stall"] and plan[1].seconds == 3.0  # sorted, default length
    path.write_text('{"at": 2, "kind": "kill"}\n{"at": 3, "kind": "corrupt", "peer": "p", "count": 2}\n')
    assert [f.count for f in F.load_schedule(path)] == [1, 2]
    for bad in ({"at": 1, "kind": "explode"}, {"kind": "kill"}, {"at": 1, "kind": "kill", "who": "x"}):
        with pytest.raises(LocalError):
            F.fault_from_dict(bad)
    a = F.random_plan(7, 120, ("kill", "stall", "join"))
    assert a == F.random_plan(7, 120, ("kill", "stall", "join"))  # same seed, same plan
    assert a and all(4 <= f.at <= 115 for f in a)
    assert all(b.at >= x.at + x.seconds for x, b in zip(a, a[1:]))  # one fault at a time


def _peer(t: float, p: str, state: str, **kw: object) -> dict:
    return {"type": "peer", "t": t, "peer": p, "state": state, **kw}


def test_max_stall_counts_only_time_with_two_live_peers() -> None:
    events = [_peer(0, "a", "up"), _peer(0, "b", "up"), _peer(0, "c", "up"),
              _peer(10, "c", "stopped"), _peer(14, "c", "resumed"),
              _peer(20, "b", "down", how="killed"), _peer(21, "c", "down", how="killed"),  # a alone from 21
              _peer(40, "d", "up")]
    steps = live_intervals(events)
    assert steps[-1] == (40, 2)
    progress = [1, 2, 3, 12, 13, 18, 42]
    stall, at = max_stall(progress, steps, 1, 45)
    # Gaps: 3 -> 12 (9 s, all with >= 2 live) is the longest; 18 -> 21 (3 s) then a lone peer until 40
    # (not a stall: fewer than 2 live), then 40 -> 42 (2 s).
    assert stall == pytest.approx(9) and at == 3


def test_check_history_flags_parity_partial_and_untyped_failures() -> None:
    def att(peer: str, key: str, ok: bool, t: float, **kw: object) -> dict:
        base = {"type": "attempt", "peer": peer, "key": key, "committed": ok, "t": t, "seed": 1,
                "members": ["a", "b"], "duration_s": 0.1}
        if ok:
            base.update(digest=kw.pop("digest", "d1"), result_sum=0.0)
        else:
            base.update(error=kw.pop("error", "PeerLost"), restored=True)
        return {**base, **kw}
    good = [_peer(0, "a", "up"), _peer(0, "b", "up"), att("a", "1:w:0", True, 1), att("b", "1:w:0", True, 1),
            att("a", "1:w:1", False, 2), att("b", "1:w:1", False, 2), {"type": "end", "t": 3}]
    res = check_history(good)
    assert res["ok"] and res["ops_committed"] == 1 and res["ops_aborted"] == 1 and res["untyped_failures"] == 0
    assert res["max_stall_s"] == pytest.approx(2.0)
    ops = merge_ops(a for a in good if a["type"] == "attempt")
    assert [o["verdict"] for o in ops] == ["commit", "abort"] and ops[0]["hashes"] == {"a": "d1", "b": "d1"}
    bad = good + [att("a", "1:w:2", True, 2.5, digest="x"), att("b", "1:w:2", True, 2.5, digest="y"),
                  att("a", "1:w:3", True, 2.6), att("b", "1:w:3", False, 2.6),
                  att("a", "1:w:4", False, 2.7, error="KeyError"),
                  _peer(2.8, "b", "down", how="crashed")]
    res = check_history(bad)
    assert not res["ok"]
    assert (res["parity_violations"], res["partial_commits"], res["untyped_failures"]) == (1, 1, 2)


def test_a_split_swarm_is_flagged_and_its_ops_kept_apart() -> None:
    # Two groups that both numbered their ops 5:w:0, 5:w:1 at the same time: a split brain, not a parity
    # violation (different ops), and the abort of a reused key by another incarnation is not partial.
    def att(peer: str, key: str, members: list[str], t: float, digest: str, ok: bool = True) -> dict:
        r = {"type": "attempt", "peer": peer, "key": key, "committed": ok, "t": t, "seed": 1, "members": members,
             "duration_s": 0.5}
        r.update({"digest": digest, "result_sum": 0.0} if ok else {"error": "PeerLost", "restored": True})
        return r
    ab, cd = ["a", "b"], ["c", "d"]
    hist = [{"type": "start", "t": 0.0}] + [_peer(0, p, "up") for p in "abcd"] + [
        att("a", "5:w:0", ab, 1.0, "x"), att("b", "5:w:0", ab, 1.0, "x"),
        att("c", "5:w:0", cd, 1.2, "y"), att("d", "5:w:0", cd, 1.2, "y"),
        att("a", "5:w:1", ab, 2.0, "x2"), att("b", "5:w:1", ab, 2.0, "x2"),
        att("c", "5:w:1", ["c", "e"], 30.0, "", ok=False),  # much later, another incarnation of epoch 5
        {"type": "end", "t": 40}]
    res = check_history(hist)
    assert (res["parity_violations"], res["partial_commits"]) == (0, 0), res
    assert res["split_brain_ops"] == 2 and not res["ok"]
    assert res["split_brain_windows"] == [(0.7, 1.0)]
    assert len([o for o in merge_ops(h for h in hist if h["type"] == "attempt") if o["key"] == "5:w:0"]) == 2


def _pixel_share(png: Path, hex_color: str) -> float:
    """The share of the image's pixels within a small distance of ``hex_color``."""
    import numpy as np
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    img = imread(png)[..., :3]
    return float((np.abs(img - np.array(to_rgb(hex_color))).max(axis=-1) < 0.04).mean())


def test_timeline_png_draws_peer_rows_ops_and_faults(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from peer.sim.timeline import FAULT_COLORS, STATE_COLORS

    hist = [{"type": "meta", "t": 0.0}, _peer(0, "peer0", "up"), _peer(0.5, "peer1", "up"),
            _peer(3, "peer1", "stopped"), _peer(6, "peer1", "resumed"), _peer(9, "peer0", "down", how="killed"),
            {"type": "op", "t_end": 2.0, "verdict": "commit", "members": ["peer0", "peer1"], "duration_s": 0.1},
            {"type": "op", "t_end": 4.0, "verdict": "abort", "members": ["peer0", "peer1"], "duration_s": 2.0},
            {"type": "fault", "t": 3.0, "kind": "stall", "who": "peer1"}, {"type": "end", "t": 10.0}]
    out = tmp_path / "t.png"
    write_timeline(out, hist, width=400)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = imread(out).shape[:2]
    assert w == 400 and h > 200
    assert _pixel_share(out, STATE_COLORS["live"]) > 0.01        # the peer rows
    assert _pixel_share(out, STATE_COLORS["stopped"]) > 0.001    # peer1's stall
    assert _pixel_share(out, FAULT_COLORS["stall"]) > 0.0005     # the fault's mark, line and label
    no_stall = [r for r in hist if r.get("state") not in ("stopped", "resumed") and r.get("type") != "fault"]
    write_timeline(tmp_path / "plain.png", no_stall, width=400)
    assert _pixel_share(tmp_path / "plain.png", STATE_COLORS["stopped"]) == 0.0
    with pytest.raises(ValueError):
        write_timeline(tmp_path / "empty.png", [{"type": "meta"}])


@needs_netns
@pytest.mark.timeout(60)
def test_fabric_shapes_partitions_and_leaves_nothing_behind() -> None:
    with Fabric.create() as fab:
        a = fab.add_host("a", parse_link("50mbit/80mbit"))
        b = fab.add_host("b")
        assert a.ip.startswith(("198.18.", "198.19.")) and b.ip != a.ip
        up = subprocess.run(["tc", "-n", a.netns, "qdisc", "show", "dev", "eth0"], capture_output=True,
                            text=True, timeout=10).stdout
        down = subprocess.run(["tc", "qdisc", "show", "dev", a.veth], capture_output=True, text=True,
                              timeout=10).stdout
        assert "tbf" in up and "50Mbit" in up and "80Mbit" in down
        fab.set_cable(a, up=False)
        assert "state DOWN" in subprocess.run(["ip", "link", "show", a.veth], capture_output=True, text=True,
                                              timeout=10).stdout
        fab.set_cable(a, up=True)
        fab.shape(b, parse_link("10mbit"))
        fab.set_path(a, b, 5e6)  # a slow route between a and b: an htb class + u32 filter on each sender
        classes = subprocess.run(["tc", "-n", a.netns, "class", "show", "dev", "eth0"], capture_output=True,
                                 text=True, timeout=10).stdout
        assert "5Mbit" in classes and "50Mbit" in classes
        suffix = fab.suffix
        assert len(leftovers(suffix)) == 5  # bridge, 2 namespaces, 2 veths
    assert leftovers(suffix) == []


@needs_netns
@pytest.mark.timeout(60)
def test_a_run_killed_outright_is_cleaned_up_by_the_next() -> None:
    code = ("import time\nfrom peer.sim.netns import Fabric\nf = Fabric.create()\nf.add_host('a')\n"
            "print(f.suffix, flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(REPO_ROOT),
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        assert p.stdout is not None
        suffix = p.stdout.readline().strip()
    finally:
        p.kill()  # no chance to clean up
        p.wait(timeout=10)
        if p.stdout is not None:
            p.stdout.close()
    assert len(leftovers(suffix)) == 3  # bridge, namespace, veth
    assert suffix in reap_orphans()
    assert leftovers(suffix) == []
