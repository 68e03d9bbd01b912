"""Fixtures for every test tier (unit/, inproc/, procs/); the helpers they use live in tests/helpers.py."""

from tests.helpers import inproc, procs, swarm_secret  # noqa: F401  (fixtures)
