#!/usr/bin/env bash
# `make image`: builds the gateway's image with the repository's Dockerfile.
# Where python:3.11-slim (the Dockerfile's default base) can be used, that is
# what it builds on; where no image registry is reachable it builds on the
# local stand-in from scripts/base-image.sh instead (PYTHON_IMAGE overrides
# both). Starts the private engine (scripts/dockerd.sh) unless
# RWG_DOCKER=system.
#
# Usage: scripts/build-image.sh [TAG]   (default redis-ws-gateway:dev)
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-redis-ws-gateway:dev}
log() { printf 'image: %s\n' "$*" >&2; }

scripts/dockerd.sh start >/dev/null
DOCKER_HOST=$(scripts/dockerd.sh host)
export DOCKER_HOST
# The classic builder: Debian's engine has no BuildKit daemon side, and the
# Dockerfile needs nothing BuildKit-only (the `# syntax=` line is ignored).
export DOCKER_BUILDKIT=0

default_base=python:3.11-slim
base=${PYTHON_IMAGE:-}
if [ -z "$base" ]; then
  if docker image inspect "$default_base" >/dev/null 2>&1 \
      || timeout 120 docker pull -q "$default_base" >/dev/null 2>&1; then
    base=$default_base
  else
    log "$default_base cannot be pulled here; building on the local Debian stand-in"
    base=$(scripts/base-image.sh)
  fi
fi

start=$(date +%s)
log "docker build -t $tag (base $base)"
# Host network: the build's pip and apt reach their indexes as the host does,
# with no dependence on the engine's bridge.
docker build --network host --build-arg "PYTHON_IMAGE=$base" -t "$tag" . >&2
log "built $tag in $(( $(date +%s) - start ))s"
