#!/usr/bin/env bash
# The main job: installs what it needs into ./.venv, then runs a local swarm under churn.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh
exec .venv/bin/swarmtrain demo "$@"
