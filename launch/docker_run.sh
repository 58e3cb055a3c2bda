#!/usr/bin/env bash
# Builds the image (with this checkout's git commit) and runs it: all GPUs, the
# .env file, the runs folder and the data folder mounted.
#
#   launch/docker_run.sh                                   # trains configs/default.py
#   launch/docker_run.sh --config=configs/mlp.py --config.num_epochs=3
#   launch/docker_run.sh python -m mnist_flax sweep --config=configs/cnn.py --grid model.name=cnn,mlp --root /runs/sweep-a
#
# Arguments that start with "-" go to `python main.py`; anything else is the
# whole command. Settings (environment variables):
#   IMAGE        image name (default: mnist-flax:JAX_FLAVOUR)
#   JAX_FLAVOUR  cuda12 (default when nvidia-smi works), cuda13 or cpu
#   BASE_IMAGE   passed to the build (default: the Dockerfile's python:3.11-slim-bookworm)
#   BUILD        0 = run the existing image without building
#   ENV_FILE     the secrets file (default: .env; without one, runs are offline)
#   RUNS_DIR     host folder mounted at /runs, where workdirs go (default: ./runs)
#   DATA_DIR     host folder of IDX files mounted read-only at /data (optional;
#                then pass --config.data.local_dir=/data)
#   APP_UID      the image's user id, given RUNS_DIR when the caller is root (default: 1000)
#   DOCKER       the docker command (default: docker)
#   MNIST_FLAX_COORDINATOR, MNIST_FLAX_NUM_PROCESSES, MNIST_FLAX_PROCESS_ID
#                multi-host runs: passed into the container (with --network host)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
docker_cmd="${DOCKER:-docker}"

if [[ -z "${JAX_FLAVOUR:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    JAX_FLAVOUR=cuda12
  else
    JAX_FLAVOUR=cpu
  fi
fi
image="${IMAGE:-mnist-flax:$JAX_FLAVOUR}"

if [[ "${BUILD:-1}" != "0" ]]; then
  commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  branch="$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo unknown)"
  dirty=false
  if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
    dirty=true
  fi
  build_args=(--build-arg "JAX_FLAVOUR=$JAX_FLAVOUR" --build-arg "GIT_COMMIT=$commit"
    --build-arg "GIT_BRANCH=$branch" --build-arg "GIT_DIRTY=$dirty")
  if [[ -n "${BASE_IMAGE:-}" ]]; then
    build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  fi
  echo "docker_run: building $image ($JAX_FLAVOUR, commit ${commit:0:12}$([[ $dirty == true ]] && echo ', dirty'))" >&2
  "$docker_cmd" build "${build_args[@]}" -t "$image" .
fi

run_args=(--rm --init)
if [[ -t 0 && -t 1 ]]; then
  run_args+=(-it)
fi
if [[ "$JAX_FLAVOUR" != cpu ]]; then
  run_args+=(--gpus all)
fi

env_file="${ENV_FILE:-.env}"
if [[ -f "$env_file" ]]; then
  run_args+=(--env-file "$env_file")
else
  echo "docker_run: no $env_file (copy .env.example): runs will be offline" >&2
fi

runs_dir="${RUNS_DIR:-$repo/runs}"
mkdir -p "$runs_dir"
runs_dir="$(cd "$runs_dir" && pwd)"
run_args+=(-v "$runs_dir:/runs")
# Files in /runs belong to the caller. A root caller keeps the image's non-root
# user (uid APP_UID, 1000), which is given the runs folder itself.
if [[ "$(id -u)" -ne 0 ]]; then
  run_args+=(--user "$(id -u):$(id -g)")
else
  chown "${APP_UID:-1000}" "$runs_dir"
fi
if [[ -n "${DATA_DIR:-}" ]]; then
  run_args+=(-v "$(cd "$DATA_DIR" && pwd):/data:ro")
fi

# Multi-host (launch/README.md): the process's place goes in by name, and the
# coordinator's port must be reachable from the other hosts.
for name in MNIST_FLAX_COORDINATOR MNIST_FLAX_NUM_PROCESSES MNIST_FLAX_PROCESS_ID; do
  if [[ -n "${!name:-}" ]]; then
    run_args+=(-e "$name")
  fi
done
if [[ -n "${MNIST_FLAX_COORDINATOR:-}" ]]; then
  run_args+=(--network host)
fi

command=("$@")
if [[ $# -gt 0 && "$1" == -* ]]; then
  command=(python main.py "$@")
fi
exec "$docker_cmd" run "${run_args[@]}" "$image" "${command[@]}"
