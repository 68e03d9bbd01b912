"""A peer process asked to stop (SIGTERM, SIGINT) leaves the swarm, whatever call it is waiting in.

The bench and catch-up workloads time a few long calls (an op's deadline there is 300 s): a signal raises
out of the call at once (``peer.cli._interrupt_on_signal``), the peer prints ``interrupted``, leaves, and
exits with 128 + the signal number.
"""

from __future__ import annotations

import signal
import time

import pytest

from peer.sim.procs import LocalProcs
from tests.helpers import FAST_ARGS


def _bench_args(expect: int, elems: int) -> list[str]:
    return ["--workload", "bench", "--expect", str(expect), "--elems", str(elems), "--ops", "1000000",
            *FAST_ARGS]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_bench_peer_waiting_for_members_it_will_never_get_leaves_on_a_signal(procs: LocalProcs,
                                                                             sig: int) -> None:
    coord = procs.coordinator(extra=FAST_ARGS)
    p = procs.peer("p0", [coord.hostport], _bench_args(2, 1000), record=False)  # nobody else comes
    p.popen.send_signal(sig)
    assert procs.until("p0", "interrupted", 20)["reason"] == f"signal {int(sig)}"
    assert p.popen.wait(timeout=20) == 128 + sig, procs.log_tail("p0")


@pytest.mark.timeout(90)
def test_bench_peers_in_an_op_leave_on_a_signal(procs: LocalProcs) -> None:
    """p1 is stopped (SIGSTOP) once both are members, so p0 waits in an op for it; p0 leaves on SIGTERM;
    then p1, resumed, is in an op whose partner left (or waiting for members) and leaves as well."""
    coord = procs.coordinator(extra=FAST_ARGS)
    names = ("p0", "p1")
    peers = [procs.peer(n, [coord.hostport], [*_bench_args(2, 1 << 20), "--log-level", "INFO"], record=False)
             for n in names]
    for n in names:
        _wait_for_log(procs, n, "members=['p0', 'p1']", 30)
    peers[1].popen.send_signal(signal.SIGSTOP)
    try:
        peers[0].popen.send_signal(signal.SIGTERM)
        procs.until("p0", "interrupted", 20)
        assert peers[0].popen.wait(timeout=20) == 128 + signal.SIGTERM, procs.log_tail("p0")
    finally:
        peers[1].popen.send_signal(signal.SIGCONT)
    peers[1].popen.send_signal(signal.SIGTERM)
    procs.until("p1", "interrupted", 20)
    assert peers[1].popen.wait(timeout=20) == 128 + signal.SIGTERM, procs.log_tail("p1")


def _wait_for_log(procs: LocalProcs, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in procs.log_tail(name, 1 << 20):
        assert time.monotonic() < deadline, f"{name} never logged {text!r}: {procs.log_tail(name)}"
        time.sleep(0.05)
