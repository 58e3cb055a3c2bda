#!/usr/bin/env bash
# Sweeps, with a W&B server or without one.
#
#   launch/sweep.sh create [SWEEP_YAML]            # registers launch/sweep.yaml; prints the sweep path
#   launch/sweep.sh agent ENTITY/PROJECT/ID [N]    # runs N trials (default: until the sweep ends) here
#   launch/sweep.sh docker-agent ENTITY/PROJECT/ID [N]   # the same inside the container (launch/docker_run.sh)
#   launch/sweep.sh local ARGS...                  # no server: python -m mnist_flax sweep ARGS...
#
# The W&B token is read from the environment or from .env (WANDB_API_KEY or
# WANDB_TOKEN; ENV_FILE names another file) and handed to wandb through the
# environment, never on a command line. WANDB_ENTITY and WANDB_PROJECT (default
# mnist_flax) choose where the sweep lives; SWEEP_CONFIG the config file its
# runs start from (default configs/default.py). Start one agent per GPU, or
# one per host; several agents on one host each need their own GPU
# (CUDA_VISIBLE_DEVICES=0 launch/sweep.sh agent ...).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

usage() {
  sed -n '3,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# shellcheck source=launch/wandb_env.sh
source "$repo/launch/wandb_env.sh"

need_token() {
  if [[ -z "${WANDB_API_KEY:-}" ]]; then
    echo "sweep: a W&B sweep needs a token: put WANDB_API_KEY in .env (see .env.example)," \
      "or run 'launch/sweep.sh local ...', which needs no server" >&2
    exit 2
  fi
}

[[ $# -ge 1 ]] || usage
action="$1"
shift
export WANDB_PROJECT="${WANDB_PROJECT:-mnist_flax}"

case "$action" in
  create)
    load_wandb_env
    need_token
    wandb sweep --project "$WANDB_PROJECT" ${WANDB_ENTITY:+--entity "$WANDB_ENTITY"} "${1:-launch/sweep.yaml}"
    ;;
  agent)
    [[ $# -ge 1 ]] || usage
    load_wandb_env
    need_token
    exec wandb agent ${2:+--count "$2"} "$1"
    ;;
  docker-agent)
    [[ $# -ge 1 ]] || usage
    # docker_run.sh passes .env with --env-file; the entrypoint checks the token.
    exec "$repo/launch/docker_run.sh" env SWEEP_CONFIG="${SWEEP_CONFIG:-configs/default.py}" \
      WANDB_PROJECT="$WANDB_PROJECT" ${WANDB_ENTITY:+WANDB_ENTITY="$WANDB_ENTITY"} \
      wandb agent ${2:+--count "$2"} "$1"
    ;;
  local)
    exec python -m mnist_flax sweep "$@"
    ;;
  *)
    usage
    ;;
esac
