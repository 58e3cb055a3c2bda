#!/usr/bin/env bash
# The Dockerfile's install step: the packages of uv.lock into /opt/venv, nothing else, no cache left behind.
#
#   bash tools/install_locked.sh LOCK_DIR [--extra cuda12|cuda13]
#
# LOCK_DIR holds pyproject.toml, uv.lock and uv_requirement.py. uv is bootstrapped by pip from the lock's own
# hashes into a throwaway venv and removed again, so the image holds the locked packages and no installer.
# Run once for the packages every image has and once more with the accelerator's extra: two layers, the
# first shared by the CPU and the CUDA images.
set -euo pipefail
lock_dir="$1"
shift
python="$(command -v python3)"
cd "$lock_dir"
"$python" uv_requirement.py uv.lock >/tmp/uv-requirement.txt
"$python" -m venv /tmp/uv
PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
  /tmp/uv/bin/pip install -qq --require-hashes -r /tmp/uv-requirement.txt
UV_PROJECT_ENVIRONMENT=/opt/venv UV_PYTHON_DOWNLOADS=never UV_NO_CACHE=1 UV_LINK_MODE=copy \
  /tmp/uv/bin/uv sync --frozen --no-dev --python "$python" --quiet "$@"
rm -rf /tmp/uv /tmp/uv-requirement.txt /root/.cache
