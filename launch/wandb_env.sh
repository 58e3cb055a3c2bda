# shellcheck shell=bash
# Sourced by launch/sweep.sh and launch/sync.sh: loads the W&B settings from a
# docker-style env file (ENV_FILE, default .env; KEY=VALUE lines, no quoting)
# into the environment. Variables already set win. Only W&B variables are read,
# the file is never executed, and the token goes into the environment only.
load_wandb_env() {
  local file="${ENV_FILE:-.env}" key value
  if [[ -f "$file" ]]; then
    while IFS='=' read -r key value || [[ -n "$key" ]]; do
      key="${key//[[:space:]]/}"
      case "$key" in
        WANDB_API_KEY | WANDB_TOKEN | WANDB_ENTITY | WANDB_PROJECT | WANDB_BASE_URL)
          if [[ -z "${!key:-}" ]]; then
            export "$key=${value%$'\r'}"
          fi
          ;;
      esac
    done <"$file"
  fi
  # The one place Python does this is mnist_flax.tracking.wandb_run.read_token; the shell
  # does it too because it runs before any of our Python: `wandb sweep` and
  # `wandb agent` (launch/sweep.sh) read WANDB_API_KEY only.
  if [[ -z "${WANDB_API_KEY:-}" && -n "${WANDB_TOKEN:-}" ]]; then
    export WANDB_API_KEY="$WANDB_TOKEN"
  fi
}
