#!/usr/bin/env bash
# Makes the project environment, .venv in the checkout, from uv.lock, and keeps it in step with the lock.
# `make setup` (so `make train` and `make test`) runs it; it never installs into the system's or the user's
# site-packages.
#
#   tools/setup_venv.sh              # PYTHON=... picks the interpreter, VENV=... the folder (default .venv)
#   tools/setup_venv.sh --extra tfds # also pyproject.toml's extra `tfds` (TensorFlow, for TFDS data sets)
#   tools/setup_venv.sh --lock       # `make lock`: regenerate uv.lock (and requirements.txt) first, then sync
#
# 1. The interpreter: $PYTHON, else the first of python3, python3.14, python3.13, python3.12, python3.11 on
#    the PATH that is 3.11-3.14 (pyproject.toml's requires-python). Debian's own python3 needs python3-venv,
#    which is installed here (apt-get, with sudo when not root) when it is missing.
# 2. The folder: made with `python -m venv`; a marker file says this script made it, so a .venv of anyone
#    else's is never touched.
# 3. uv, at the version uv.lock pins, installed into the venv by pip with the lock's hashes.
# 4. `uv sync --locked`: every package of uv.lock (the run's and the dev group, and the extras asked for),
#    nothing else. An extra once installed stays: `make train` (no extra) after `make test` (extra `tfds`)
#    neither installs nor removes TensorFlow. Skipped when the venv was last synced from these very uv.lock and
#    pyproject.toml with every extra asked for (a stamp holds their hashes and the extras).
#
# Each problem is one line on stderr and exit status 2; nothing of the user's is deleted.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${VENV:-.venv}"
marker="$venv/.mnist_flax-venv"
stamp="$venv/.mnist_flax-synced"

fail() {
  echo "setup: $*" >&2
  exit 2
}

# Prints "MAJOR.MINOR" of an interpreter, or nothing when it does not run.
version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true; }
supported() { case "$1" in 3.11 | 3.12 | 3.13 | 3.14) return 0 ;; *) return 1 ;; esac }

find_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 || fail "PYTHON=$PYTHON: no such program"
    local v
    v="$(version_of "$PYTHON")"
    [[ -n "$v" ]] || fail "PYTHON=$PYTHON does not run"
    supported "$v" || fail "PYTHON=$PYTHON is Python $v; this project needs 3.11, 3.12, 3.13 or 3.14"
    command -v "$PYTHON"
    return
  fi
  local candidate seen=""
  for candidate in python3 python3.14 python3.13 python3.12 python3.11; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    local v
    v="$(version_of "$candidate")"
    if [[ -n "$v" ]] && supported "$v"; then
      command -v "$candidate"
      return
    fi
    seen+=" $candidate${v:+ ($v)}"
  done
  fail "no Python 3.11-3.14 found on the PATH (seen:${seen:- none}); install one (Debian 12: apt-get install python3) or name it: make PYTHON=/path/to/python3.11 ..."
}

sha() { sha256sum "$@" | awk '{print $1}' | tr '\n' ' '; }

relock=false
extras=()
while (($#)); do
  case "$1" in
    --lock) relock=true ;;
    --extra)
      [[ $# -ge 2 && -n "$2" ]] || fail "--extra needs the name of one of pyproject.toml's extras (--extra tfds)"
      extras+=("$2")
      shift
      ;;
    *) fail "unknown argument '$1' (tools/setup_venv.sh [--lock] [--extra NAME]...)" ;;
  esac
  shift
done

[[ -f uv.lock && -f pyproject.toml ]] || fail "uv.lock or pyproject.toml is missing from the checkout"

if [[ -e "$venv" && ! -f "$marker" ]]; then
  fail "$venv exists but was not made by this setup (no $marker); move it away, or set VENV=another-folder"
fi

if [[ -f "$marker" ]]; then
  python="$venv/bin/python"
  [[ -n "$(version_of "$python")" ]] \
    || fail "$venv's Python does not run (was the interpreter it was made from removed?); remove the folder (rm -rf $venv) and run make again"
  if [[ -n "${PYTHON:-}" ]]; then
    wanted="$(version_of "$(find_python)")"
    [[ "$(version_of "$python")" == "$wanted" ]] \
      || fail "$venv has Python $(version_of "$python"), PYTHON=$PYTHON is $wanted; remove the folder (rm -rf $venv) to make it anew"
  fi
else
  base="$(find_python)"
  if ! "$base" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [[ "$base" == /usr/bin/python3* ]] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: $base has no venv module; installing Debian's python3-venv" >&2
      sudo=""
      [[ "$(id -u)" == 0 ]] || sudo=sudo
      if ! { $sudo apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q python3-venv >/dev/null; }; then
        fail "could not install python3-venv (apt-get install python3-venv, as root)"
      fi
    else
      fail "$base has no venv module; install it (Debian/Ubuntu: apt-get install python3-venv) or pick another Python with PYTHON=..."
    fi
  fi
  echo "setup: making $venv with $base (Python $(version_of "$base"))"
  mkdir -p "$venv"
  echo "made by tools/setup_venv.sh from $base" >"$marker"  # first, so a half-made one is known as ours
  "$base" -m venv "$venv" || fail "python -m venv $venv failed (see above)"
  python="$venv/bin/python"
fi

# The stamp: the hashes of uv.lock and pyproject.toml on its first line, the extras synced on the second.
synced_extras=()
[[ -f "$stamp" ]] && { read -r -a synced_extras < <(sed -n 2p "$stamp") || true; }  # a stamp of one line: none
missing_extra=false
for extra in "${extras[@]}"; do
  [[ " ${synced_extras[*]} " == *" $extra "* ]] || missing_extra=true
done
mapfile -t all_extras < <(printf '%s\n' "${synced_extras[@]}" "${extras[@]}" | sed '/^$/d' | sort -u)
want="$(sha uv.lock pyproject.toml)"
if [[ $relock == false && $missing_extra == false && -f "$stamp" && "$(sed -n 1p "$stamp")" == "$want" && -x "$venv/bin/uv" ]]; then
  exit 0  # synced from these very files, with these extras: nothing to do
fi
if [[ $relock == true ]]; then
  :
elif [[ -f "$stamp" ]]; then
  echo "setup: uv.lock or pyproject.toml changed since $venv was synced; syncing"
elif [[ -x "$venv/bin/uv" ]]; then
  echo "setup: completing an interrupted install of $venv"
fi
rm -f "$stamp"

requirement="$("$python" tools/uv_requirement.py)" || fail "uv.lock pins no uv"
uv_version="${requirement#uv==}"
uv_version="${uv_version%% *}"
if [[ "$("$venv/bin/uv" --version 2>/dev/null | awk '{print $2}')" != "$uv_version" ]]; then
  tmp="$(mktemp)"
  trap 'rm -f "$tmp"' EXIT
  echo "$requirement" >"$tmp"
  "$python" -m pip install -qq --disable-pip-version-check --require-hashes -r "$tmp" \
    || fail "could not install uv into $venv from the package index (see pip's message above)"
fi

export UV_PROJECT_ENVIRONMENT="$venv" UV_PYTHON_DOWNLOADS=never
if [[ $relock == true ]]; then
  "$venv/bin/uv" lock || fail "uv lock failed (see above): pyproject.toml's dependencies do not resolve"
  # requirements.txt: the run's packages of the lock (no dev group, no extra), pinned with hashes, for pip.
  "$venv/bin/uv" export --locked --no-dev --format requirements-txt --quiet >requirements.txt.tmp \
    || fail "uv export failed (see above)"
  mv requirements.txt.tmp requirements.txt
  want="$(sha uv.lock pyproject.toml)"
elif ! check="$("$venv/bin/uv" lock --check --quiet 2>&1)"; then
  if grep -q "needs to be updated" <<<"$check"; then
    fail "uv.lock does not match pyproject.toml's dependencies (edited without relocking); run \`make lock\` and commit uv.lock"
  fi
  fail "could not check uv.lock against pyproject.toml: $(tail -n 1 <<<"$check")"
fi
start=$SECONDS
"$venv/bin/uv" sync --locked --quiet "${all_extras[@]/#/--extra=}" \
  || fail "uv sync failed (see above); run make again to complete it"
printf '%s\n%s\n' "$want" "${all_extras[*]}" >"$stamp"
echo "setup: $venv synced from uv.lock in $((SECONDS - start)) s"
