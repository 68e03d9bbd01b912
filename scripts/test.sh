#!/usr/bin/env bash
# The test command: installs what it needs into ./.venv, type-checks (pyproject's [tool.mypy]), then runs
# the whole suite. Any mypy error fails it before a test runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
# Files that still have type errors are left out of the check until they are fixed (they are still
# analysed, silently, where clean files import them). Empty this list to check everything.
MYPY_PENDING='^(collectives/(codecs|datalink|ring|security|transport|wire)|recovery/shared_state|peer/bench/gloo)\.py$'
.venv/bin/python -m mypy --follow-imports=silent --exclude "$MYPY_PENDING" peer collectives recovery
exec .venv/bin/python -m pytest -q "$@"
