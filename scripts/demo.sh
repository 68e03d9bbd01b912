#!/usr/bin/env bash
# The main job: installs what it needs into ./.venv, then trains a byte-level transformer LM on the Python
# stdlib with DiLoCo on a local swarm (a coordinator and 4 peers; one is killed and one joins partway).
# Extra arguments go to examples/local_swarm.py (e.g. --outer-steps 40, --workdir runs/swarm).
# The collectives churn demo is still there: .venv/bin/swarmtrain demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec .venv/bin/python -m examples.local_swarm "$@"
