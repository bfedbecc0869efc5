#!/usr/bin/env bash
# CI: the sweep and SLURM tests (pytest -m slurm, tests/test_slurm.py) on a real one-node Slurm
# cluster on localhost (slurm/local_cluster.sh: needs root; installs the packages if missing).
# The cluster is brought down again however this script ends.
#
#   PYTHON=/path/to/venv/bin/python bash .ci/slurm.sh      # PYTHON defaults to `python`
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

down() { bash slurm/local_cluster.sh down || echo "warning: slurm/local_cluster.sh down failed" >&2; }
trap down EXIT
trap 'exit 130' INT    # so that the EXIT trap runs on Ctrl-C / a CI cancel too
trap 'exit 143' TERM

DGRUN_SLURM_UP_TIMEOUT="${DGRUN_SLURM_UP_TIMEOUT:-120}" bash slurm/local_cluster.sh up </dev/null
bash slurm/local_cluster.sh status
# The tests time out their own waits; this is the backstop (they take ~4 min on 2 cores).
timeout -k 30 1200 "$PYTHON" -m pytest -m slurm tests/test_slurm.py -q </dev/null
