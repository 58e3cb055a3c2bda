#!/usr/bin/env bash
# The container's entry point: sets up the W&B token, then runs the command.
#
#   docker run --env-file .env IMAGE [COMMAND...]
#
# The token comes from the environment only (WANDB_API_KEY, or WANDB_TOKEN as
# .env.example names it) and is exported as WANDB_API_KEY; it never appears on
# a command line or in this script's output. When the run would be online, the
# token is checked first: a rejected token stops here (exit 2); an unreachable
# W&B server makes the run offline (sync it later with launch/sync.sh).
#
# Environment: WANDB_MODE (online/offline/disabled), WANDB_BASE_URL (a W&B
# server other than api.wandb.ai), MNIST_FLAX_TOKEN_CHECK_TIMEOUT (seconds,
# default 15), MNIST_FLAX_SKIP_TOKEN_CHECK=1 (trust the token unchecked).
set -euo pipefail

say() { echo "entrypoint: $*" >&2; }

if [[ $# -eq 0 ]]; then
  say "no command given (the image's CMD trains the default config)"
  exit 2
fi

# A container started with --user UID has no home of its own; W&B and JAX need one.
if [[ -z "${HOME:-}" || ! -w "${HOME}" ]]; then
  export HOME=/tmp
fi

token="${WANDB_API_KEY:-}"
if [[ -z "${token//[[:space:]]/}" ]]; then
  token="${WANDB_TOKEN:-}"
fi
token="${token//[[:space:]]/}" # a .env written on Windows leaves a \r behind
unset WANDB_TOKEN
if [[ -n "$token" ]]; then
  export WANDB_API_KEY="$token"
else
  unset WANDB_API_KEY
fi
unset token

# The mode a run would have: WANDB_MODE, or the last --config.wandb.mode=... argument.
mode="${WANDB_MODE:-}"
for arg in "$@"; do
  case "$arg" in
    --config.wandb.mode=*) mode="${arg#--config.wandb.mode=}" ;;
  esac
done
mode="${mode,,}"

if [[ "$mode" == "disabled" || "$mode" == "dryrun" ]]; then
  : # no tracking at all: nothing to say
elif [[ -z "${WANDB_API_KEY:-}" ]]; then
  say "no W&B token (WANDB_API_KEY or WANDB_TOKEN) in the environment: runs will be offline; sync them later with launch/sync.sh"
elif [[ "$mode" == "offline" ]]; then
  : # offline by choice: the token is kept for a later sync, not checked
elif [[ "${MNIST_FLAX_SKIP_TOKEN_CHECK:-}" == "1" ]]; then
  say "W&B token not checked (MNIST_FLAX_SKIP_TOKEN_CHECK=1)"
else
  # Asks the W&B API who the token belongs to. The token travels in the
  # environment and the request's auth header, never in argv or output.
  # Exit status: 0 accepted, 3 rejected, 4 server unreachable or failing.
  seconds="${MNIST_FLAX_TOKEN_CHECK_TIMEOUT:-15}"
  status=0
  reason="$(timeout "$((seconds + 5))" python3 - "$seconds" 2>&1 <<'PY'
import os
import sys

try:
    import requests

    response = requests.post(
        os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/") + "/graphql",
        json={"query": "query { viewer { id } }"},
        auth=("api", os.environ["WANDB_API_KEY"]),
        timeout=float(sys.argv[1]),
    )
except Exception as e:  # no network, DNS, TLS, timeout: W&B is unreachable
    print(type(e).__name__)
    sys.exit(4)
if response.status_code in (401, 403):
    sys.exit(3)
if response.status_code != 200:
    print(f"HTTP {response.status_code}")
    sys.exit(4)
try:
    viewer = response.json()["data"]["viewer"]
except (ValueError, KeyError, TypeError):
    print("unexpected answer")
    sys.exit(4)
sys.exit(0 if viewer else 3)
PY
)" || status=$?
  reason="${reason%%$'\n'*}"
  if [[ "$status" -eq 124 ]]; then
    reason="no answer in ${seconds} s"
  elif [[ -z "$reason" || "$reason" == *"$WANDB_API_KEY"* ]]; then
    reason="exit status $status"
  fi
  case "$status" in
    0) ;;
    3)
      say "error: the W&B token (WANDB_API_KEY or WANDB_TOKEN) was rejected by ${WANDB_BASE_URL:-https://api.wandb.ai}; fix it in your .env, or run with WANDB_MODE=offline"
      exit 2
      ;;
    *)
      say "warning: W&B (${WANDB_BASE_URL:-https://api.wandb.ai}) is unreachable ($reason), so the token is unchecked and runs will be offline; sync them later with launch/sync.sh"
      export WANDB_MODE=offline
      ;;
  esac
fi
unset mode seconds status reason

exec "$@"
