#!/usr/bin/env bash
# What a W&B sweep agent starts for each run (launch/sweep.yaml's program):
# main.py with the agent's --config.FIELD=VALUE arguments, in a workdir named
# after the sweep and the run, so agents on one machine never share a workdir.
#   SWEEP_CONFIG    config file the runs start from (default: configs/default.py)
#   SWEEP_RUNS_DIR  parent of the sweep's workdirs (default: runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${WANDB_RUN_ID:?is set by the W&B agent; start runs with launch/sweep.sh agent}"
exec python main.py --config="${SWEEP_CONFIG:-configs/default.py}" \
  --workdir="${SWEEP_RUNS_DIR:-runs}/sweep-${WANDB_SWEEP_ID:-unknown}/${WANDB_RUN_ID}" "$@"
