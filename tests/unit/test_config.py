"""Timeouts: the local profile, the CLI round trip, and the relations checked at construction."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from collectives.errors import LocalError
from peer.cli import add_peer_args, add_timeout_args, build_parser, peer_config_from_args
from peer.config import Timeouts

pytestmark = pytest.mark.timeout(30)


def _parse(args: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    add_timeout_args(ap)
    return ap.parse_args(args)


def test_local_profile_is_faster_than_the_defaults_and_valid() -> None:
    local, default = Timeouts.local(), Timeouts()
    assert local.heartbeat_timeout < default.heartbeat_timeout
    assert local.join_timeout < default.join_timeout
    assert Timeouts.local(heartbeat_timeout=3.0).heartbeat_timeout == 3.0
    with pytest.raises(LocalError):
        Timeouts.local(no_such_field=1.0)


@pytest.mark.parametrize("t", [Timeouts(), Timeouts.local(), Timeouts.local(heartbeat_interval=0.2,
                                                                             op_progress_timeout=12.5)])
def test_cli_args_round_trip(t: Timeouts) -> None:
    assert Timeouts.from_args(_parse(t.cli_args())) == t
    assert Timeouts().cli_args() == []  # only what differs from the defaults is written


def test_swarmtrain_peer_and_coordinator_accept_every_timeout_flag() -> None:
    t = Timeouts.local(resend_interval=0.5, ack_slack=0.1)
    for cmd in (["peer", "--join", "127.0.0.1:1"], ["coordinator"]):
        a = build_parser().parse_args(cmd + t.cli_args())
        assert Timeouts.from_args(a) == t


def test_peer_config_from_args() -> None:
    ap = argparse.ArgumentParser()
    add_peer_args(ap)
    a = ap.parse_args(["--join", "h1:1,h2:2", "--join", "h3:3", "--insecure", "--swarm", "s",
                       *Timeouts.local().cli_args()])
    cfg = peer_config_from_args(a, "me", slice_bytes=1 << 20)
    assert (cfg.peer_id, cfg.join, cfg.swarm, cfg.slice_bytes) == ("me", ("h1:1", "h2:2", "h3:3"), "s", 1 << 20)
    assert cfg.timeouts == Timeouts.local() and cfg.security.insecure and not cfg.coordinator
    with pytest.raises(LocalError):  # neither --join nor --bootstrap
        peer_config_from_args(ap.parse_args(["--insecure"]), "me")


@pytest.mark.parametrize("bad", [
    dict(heartbeat_interval=0.0),
    dict(heartbeat_timeout=0.2),                      # < 3 heartbeats
    dict(coordinator_timeout=0.2),
    dict(reform_window=0.4),                          # < reconnect_grace
    dict(op_progress_timeout=2.0),                    # <= heartbeat_timeout
    dict(resend_interval=5.0),                        # >= verdict_timeout
    dict(join_timeout=1.0),                           # <= the join retry interval
    dict(heartbeat_interval=0.8, ack_slack=1.0),      # a fresh ack would outlast coordinator_timeout
    dict(ack_slack=-0.01),
])
def test_bad_relations_raise_local_error(bad: dict[str, float]) -> None:
    with pytest.raises(LocalError):
        Timeouts.local(**bad)


def test_derived_deadlines() -> None:
    t = Timeouts.local()
    assert t.ack_fresh == pytest.approx(2 * t.heartbeat_interval + t.ack_slack)
    assert t.candidate_timeout == t.reform_window + t.coordinator_timeout
    assert t.new_epoch_wait == 2 * t.heartbeat_timeout
    assert t.join_retry == 1.0 and Timeouts.local(heartbeat_interval=0.5, heartbeat_timeout=3,
                                                  coordinator_timeout=3).join_retry == 2.0
    assert {f.name for f in dataclasses.fields(Timeouts)} >= {"resend_interval", "ack_slack"}


def test_peer_log_prefixes_the_id_and_tags_the_record(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from peer.logs import peer_log

    with caplog.at_level(logging.INFO, logger="peer.test"):
        peer_log("peer.test", "p7").info("epoch %d", 3)
        peer_log("peer.test", "c1", role="coordinator").warning("evicting %s", "p2")
    got = [(r.getMessage(), getattr(r, "peer")) for r in caplog.records if r.name == "peer.test"]
    assert got == [("p7: epoch 3", "p7"), ("coordinator c1: evicting p2", "c1")]


def test_diloco_config_validates_and_keywords_override() -> None:
    from peer.train.diloco import DiLoCoConfig

    for bad in (dict(codec="zip"), dict(mode="async"), dict(mode="streaming", fragments=2, inner_steps=3),
                dict(fragments=2), dict(inner_steps=0), dict(op_timeout=0.0)):
        with pytest.raises(LocalError):
            DiLoCoConfig(**bad)  # type: ignore[arg-type]
    cfg = dataclasses.replace(DiLoCoConfig(mode="eager"), inner_steps=7)
    assert (cfg.mode, cfg.inner_steps, cfg.outer_lr) == ("eager", 7, 0.7)
