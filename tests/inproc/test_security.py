"""Security (issue 4): keys and files, the admission policy, and attacks on live peers over loopback.

Live tests use in-process peers (real sockets, secure by default). The attacker tools are in
``tests/attack.py``. Every test is time-limited.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.utils.z85

from collectives import keys, wire
from collectives.errors import AuthError, LocalError
from collectives.security import DROP, OK, UNPROVEN, AuthLimits, Curve
from collectives.transport import Transport
from peer import PeerConfig, Swarm
from peer.cli import main as cli_main
from peer.config import SECRET_ENV, SecurityConfig
from tests import attack
from tests.helpers import FAST

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- keys and files

def test_key_files_are_private_round_trip_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "peer.key"
    kp = keys.load_or_create_keypair(path)
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert keys.load_keypair(path) == kp and keys.load_or_create_keypair(path) == kp
    assert kp.secret.hex() not in repr(kp)
    # the X25519 key from `cryptography` is exactly libzmq's CURVE key
    assert zmq.curve_public(zmq.utils.z85.encode(kp.secret)) == zmq.utils.z85.encode(kp.public)
    with pytest.raises(LocalError, match="refusing to overwrite"):
        keys.save_keypair(path, keys.generate_keypair())
    os.chmod(path, 0o644)
    with pytest.raises(LocalError, match="readable by others"):
        keys.load_keypair(path)
    secret = tmp_path / "swarm.secret"
    s = keys.new_secret()
    keys.save_secret(secret, s)
    assert keys.load_secret(secret) == s and secret.stat().st_mode & 0o777 == 0o600
    (tmp_path / "garbage.key").write_text("public xx\nsecret yy\n")
    os.chmod(tmp_path / "garbage.key", 0o600)
    with pytest.raises(LocalError):
        keys.load_keypair(tmp_path / "garbage.key")


def test_allowlist_file(tmp_path: Path) -> None:
    a, b = keys.generate_keypair(), keys.generate_keypair()
    f = tmp_path / "allow"
    f.write_text(f"# the swarm\n{a.public.hex()} alice  # pinned\n\n{b.public.hex()}\n")
    allowed, pins = keys.load_allowlist(f)
    assert allowed == {a.public, b.public} and pins == {"alice": a.public}
    f.write_text("not-a-key\n")
    with pytest.raises(LocalError):
        keys.load_allowlist(f)


def test_derived_material_depends_on_the_secret() -> None:
    s1, s2 = keys.new_secret(), keys.new_secret()
    me = keys.generate_keypair()
    assert keys.server_keypair(s1) == keys.server_keypair(s1) != keys.server_keypair(s2)
    assert keys.check_token(s1, me.public, keys.hello_token(s1, me.public))
    assert not keys.check_token(s2, me.public, keys.hello_token(s1, me.public))
    assert not keys.check_token(s1, keys.generate_keypair().public, keys.hello_token(s1, me.public))


def test_cli_keygen(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret, key = tmp_path / "swarm.secret", tmp_path / "me.key"
    assert cli_main(["keygen", "--secret", str(secret)]) == 0
    assert secret.stat().st_mode & 0o777 == 0o600 and not key.exists()
    assert cli_main(["keygen", "--secret", str(secret)]) == 2  # never overwrites
    assert "refusing to overwrite" in capsys.readouterr().err
    assert cli_main(["keygen", "--key", str(key)]) == 0
    public = keys.load_keypair(key).public.hex()
    assert public in capsys.readouterr().out
    assert cli_main(["keygen", "--key", str(key)]) == 0
    assert "(existing)" in capsys.readouterr().out and keys.load_keypair(key).public.hex() == public


def test_secure_by_default_refuses_to_start_without_a_secret(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(LocalError, match="keygen --secret"):
        Swarm(PeerConfig(peer_id="lonely", coordinator=True, timeouts=FAST))
    assert cli_main(["coordinator", "--port", "0"]) == 2
    assert "no swarm secret" in capsys.readouterr().err


def test_insecure_mode_says_so_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        sec = SecurityConfig(insecure=True).build("bench0")
    assert not sec.handshakes
    assert any("INSECURE" in r.getMessage() for r in caplog.records)


def test_refuses_libzmq_older_than_4_3_5(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zmq, "zmq_version_info", lambda: (4, 3, 4))
    with pytest.raises(LocalError, match="too old"):
        Transport("p0")


# ---------------------------------------------------------------- the policy (pure)

class _Frame:
    """Stands in for a zmq.Frame: what ZAP put in ``User-Id``."""

    def __init__(self, kp: keys.KeyPair) -> None:
        self.uid = kp.public.hex()

    def get(self, prop: str) -> str:
        assert prop == "User-Id"
        return self.uid


def _curve(**kw: Any) -> tuple[Curve, bytes]:
    secret = keys.new_secret()
    return Curve(keys.generate_keypair(), secret, **kw), secret


def test_zap_probation_cap_rate_limit_and_expiry() -> None:
    pol, _ = _curve(limits=AuthLimits(max_probation=3))
    strangers = [keys.generate_keypair() for _ in range(5)]
    ok = [pol.zap("127.0.0.9", b"CURVE", [k.public], 0.0)[0] for k in strangers[:4]]
    assert ok == [True, True, True, False]  # at most 3 unproven keys at once
    assert pol.zap("127.0.0.9", b"NULL", [], 0.0)[0] is False  # CURVE only
    assert pol.zap("127.0.0.9", b"CURVE", [strangers[0].public], 0.0)[0]  # a key on probation may reconnect
    assert pol.zap("127.0.0.9", b"CURVE", [strangers[4].public], pol.limits.probation_s + 1)[0]  # expired: room
    # new keys per client address: a token bucket (burst 2, then 1 per second)
    pol, _ = _curve(limits=AuthLimits(new_keys_burst=2, new_keys_per_s=1.0))
    ok = [pol.zap("127.0.0.9", b"CURVE", [keys.generate_keypair().public], 0.0)[0] for _ in range(3)]
    assert ok == [True, True, False]
    assert pol.zap("127.0.0.10", b"CURVE", [keys.generate_keypair().public], 0.0)[0]  # another address
    assert pol.zap("127.0.0.9", b"CURVE", [keys.generate_keypair().public], 1.1)[0]  # refilled
    assert pol.stats["zap_refused"] == 1


def test_hello_proves_the_key_and_binds_ids() -> None:
    pol, secret = _curve()
    alice, mallory = keys.generate_keypair(), keys.generate_keypair()
    for k in (alice, mallory):
        assert pol.zap("127.0.0.1", b"CURVE", [k.public], time.monotonic())[2] == k.public.hex()
    fa, fm = _Frame(alice), _Frame(mallory)
    assert pol.check_sender(fa, "alice") == UNPROVEN
    assert isinstance(pol.on_unproven(fa), AuthError)
    pol.on_hello(fa, "alice", wire.Hello(keys.hello_token(secret, alice.public)))
    assert pol.check_sender(fa, "alice") == OK
    assert pol.check_sender(fa, "alice-2") == OK  # one key may serve several local peers
    pol.on_hello(fm, "mallory", wire.Hello(keys.hello_token(secret, mallory.public)))
    with pytest.raises(AuthError, match="impersonat|bound to another key"):
        pol.check_sender(fm, "alice")
    assert pol.check_sender(fm, "mallory") == DROP  # banned after the impersonation attempt
    assert pol.zap("127.0.0.1", b"CURVE", [mallory.public], time.monotonic())[0] is False
    # a token for another key (or from another secret) is worthless, and gets the key banned
    eve = keys.generate_keypair()
    pol.zap("127.0.0.1", b"CURVE", [eve.public], time.monotonic())
    with pytest.raises(AuthError, match="wrong token"):
        pol.on_hello(_Frame(eve), "eve", wire.Hello(keys.hello_token(secret, alice.public)))
    assert pol.check_sender(_Frame(eve), "eve") == DROP


def test_allowlist_refuses_unlisted_keys_and_pins_ids() -> None:
    alice, bob, carol = (keys.generate_keypair() for _ in range(3))
    pol, _ = _curve(allow=frozenset({alice.public, bob.public}), pins={"alice": alice.public})
    assert pol.zap("127.0.0.1", b"CURVE", [alice.public], 0.0)[0]
    assert not pol.zap("127.0.0.1", b"CURVE", [carol.public], 0.0)[0]
    assert pol.check_sender(_Frame(bob), "bob") == OK  # allowlisted: no Hello needed
    with pytest.raises(AuthError):
        pol.check_sender(_Frame(bob), "alice")  # pinned to alice's key


def test_unproven_key_that_keeps_talking_is_banned_after_a_grace() -> None:
    pol, secret = _curve(limits=AuthLimits(max_unproven_msgs=3, unproven_grace_s=0.3))
    k, late = keys.generate_keypair(), keys.generate_keypair()
    for key in (k, late):
        pol.zap("127.0.0.1", b"CURVE", [key.public], time.monotonic())
    for _ in range(10):  # a reconnecting client flushing its queue before its Hello: dropped, not banned
        assert pol.check_sender(_Frame(late), "late") == UNPROVEN
        pol.on_unproven(_Frame(late))
    pol.on_hello(_Frame(late), "late", wire.Hello(keys.hello_token(secret, late.public)))
    assert pol.check_sender(_Frame(late), "late") == OK
    time.sleep(0.35)
    for _ in range(4):
        assert pol.check_sender(_Frame(k), "x") == UNPROVEN
        pol.on_unproven(_Frame(k))
    assert pol.check_sender(_Frame(k), "x") == DROP
