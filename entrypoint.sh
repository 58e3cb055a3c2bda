#!/usr/bin/env bash
# The container's entry point: sets up the W&B token, then runs the command.
#
#   docker run --env-file .env IMAGE [COMMAND...]
#
# The token comes from the environment only (WANDB_API_KEY, or WANDB_TOKEN as
# .env.example names it) and is exported as WANDB_API_KEY; it never appears on
# a command line, on disk or in this script's output. When the run would be
# online, W&B's own client checks the token with the server the run will use
# (WANDB_BASE_URL, else wandb's default): a rejected token stops here (exit 2);
# an unreachable server makes the run offline (sync it later with
# launch/sync.sh). mnist_flax/tracking/login.py does all of that, then runs the
# command in its place.
#
# Environment: WANDB_MODE (online/offline/disabled), WANDB_BASE_URL (the W&B
# server), MNIST_FLAX_TOKEN_CHECK_TIMEOUT (seconds, default 10),
# MNIST_FLAX_SKIP_TOKEN_CHECK=1 (trust the token unchecked).
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "entrypoint: no command given (the image's CMD trains the default config)" >&2
  exit 2
fi

# A container started with --user UID has no home of its own; W&B and JAX need one.
if [[ -z "${HOME:-}" || ! -w "${HOME}" ]]; then
  export HOME=/tmp
fi

# The token is not touched here: Python reads it the one way every run does
# (mnist_flax.tracking.wandb_run.read_token). The package is imported from this script's
# folder, so the container's working directory can be any.
app="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec python3 -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from mnist_flax.tracking import login; sys.exit(login.main())' "$app" "$@"
