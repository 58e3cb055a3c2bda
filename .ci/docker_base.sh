#!/usr/bin/env bash
# Makes the base image that CI builds the Dockerfile on (BASE_IMAGE), without a registry:
#
#   .ci/docker_base.sh [NAME]        # default NAME: mnist-flax-ci-base:bookworm
#
# 1. `debootstrap --variant=minbase bookworm` with Debian's python3 (3.11) and
#    python3-venv, imported with `docker import`;
# 2. a CI-only layer on top that trusts this machine's TLS proxy (the CA files
#    in /usr/local/share/ca-certificates/) and points pip and Python's HTTP
#    clients at the system CA bundle, as /etc/pip.conf does on the host.
# The proxy's CA never enters the project's Dockerfile or its image layers
# beyond this base. An existing image of that name is reused (REBUILD=1 remakes it).
#
# Needs root, a running dockerd, and the debootstrap and docker.io packages.
set -euo pipefail

name="${1:-mnist-flax-ci-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ca_dir="${CA_DIR:-/usr/local/share/ca-certificates}"

if [[ "${REBUILD:-}" != "1" ]] && docker image inspect "$name" >/dev/null 2>&1; then
  echo "docker_base: reusing $name"
  exit 0
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || {
    echo "docker_base: $tool is missing (apt-get install debootstrap docker.io)" >&2
    exit 2
  }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
context="$work/context"
mkdir -p "$context"

start=$SECONDS
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv \
  bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 20 "$work/debootstrap.log" >&2
  echo "docker_base: debootstrap failed" >&2
  exit 1
}
# What an image needs no copy of: downloaded packages, package lists, docs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
raw="${name%%:*}-raw:$$"
tar -C "$rootfs" -c . | docker import - "$raw" >/dev/null
echo "docker_base: debootstrap + import in $((SECONDS - start)) s"

shopt -s nullglob
certificates=("$ca_dir"/*.crt)
shopt -u nullglob
mkdir -p "$context/ca"
if [[ ${#certificates[@]} -gt 0 ]]; then
  cp "${certificates[@]}" "$context/ca/"
fi
cat >"$context/Dockerfile" <<EOF
FROM $raw
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
docker build --quiet -t "$name" "$context" >/dev/null
docker rmi "$raw" >/dev/null
echo "docker_base: built $name (${#certificates[@]} CA file(s)) in $((SECONDS - start)) s"
