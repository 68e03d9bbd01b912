#!/usr/bin/env bash
# The all-reduce benches of docs/performance.md: 64 MiB at N = 2 and 4, in the clear and secure, three runs
# each (Gloo measured in the same run), then each configuration once more with --retain-freed-mb 0 (freed
# frames unmapped, as before collectives.memory), then 4 KiB latency. Prints the load average before each run.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
for n in 2 4; do for mode in --insecure ""; do for r in 1 2 3; do
  echo "=== N=$n mode=${mode:-secure} run=$r load=$(cut -d' ' -f1 /proc/loadavg)"
  timeout 300 "$PY" -m peer bench allreduce --peers "$n" --mb 64 --json $mode 2>&1 | tail -1
done; done; done
for n in 2 4; do for mode in --insecure ""; do
  echo "=== N=$n mode=${mode:-secure} retain=0 load=$(cut -d' ' -f1 /proc/loadavg)"
  timeout 300 "$PY" -m peer bench allreduce --peers "$n" --mb 64 --json $mode --retain-freed-mb 0 2>&1 | tail -1
done; done
for n in 2 4; do
  echo "=== 4KiB N=$n load=$(cut -d' ' -f1 /proc/loadavg)"
  timeout 300 "$PY" -m peer bench allreduce --peers "$n" --mb 0.00390625 --iters 200 --json 2>&1 | tail -1
done
