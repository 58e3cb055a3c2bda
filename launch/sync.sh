#!/usr/bin/env bash
# Uploads offline runs to W&B: launch/sync.sh WORKDIR... [--force] [--dry-run]
# (python -m mnist_flax sync). The token comes from the environment or .env
# (WANDB_API_KEY or WANDB_TOKEN; ENV_FILE names another file), never from argv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/wandb_env.sh
source "$repo/launch/wandb_env.sh"
ENV_FILE="${ENV_FILE:-$repo/.env}" load_wandb_env
# Paths stay relative to the caller's folder; the package is found through PYTHONPATH.
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec python -m mnist_flax sync "$@"
