"""``swarmtrain simulate``: parse the flags, run the simulation, print the table (or ``--json``)."""

from __future__ import annotations

import argparse
import json
import sys

from collectives.errors import LocalError
from peer.sim.args import config_from_args
from peer.sim.netns import NetnsError
from peer.sim.report import print_table
from peer.sim.simulate import Simulation


def run_cli(a: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(a)
    except (LocalError, OSError) as exc:
        print(f"swarmtrain simulate: {exc}", file=sys.stderr)
        return 2
    say = (lambda text: None) if a.json else (lambda text: print(f"  {text}", flush=True))
    if not a.json:
        print(f"swarmtrain simulate: {cfg.peers} peers, {cfg.duration:g}s, seed {cfg.seed}", flush=True)
    try:
        rep = Simulation(cfg, say).run()
    except (LocalError, NetnsError) as exc:  # a plan this network cannot carry out; everything was cleaned up
        print(f"swarmtrain simulate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("swarmtrain simulate: interrupted; every process, namespace and link it made is gone",
              file=sys.stderr)
        return 130
    if a.json:
        print(json.dumps(rep))
    else:
        print_table(rep)
    return 0 if rep.get("ok", True) else 1
