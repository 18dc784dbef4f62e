#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine, and nothing
# twice: redis-server, haproxy, docker.io and debootstrap (Debian's packages), the Python venv in
# .venv with the package and its dev tools, and helm (built from the Go
# module proxy into .tools/bin). Safe to run again; each step is skipped when
# already done.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
# The local e2e suite (tests/e2e) puts HAProxy in front of several gateways.
# Debian installs it in /usr/sbin, which is not on a normal user's PATH.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
# The package's C extension (the fan-out loop) needs a compiler and the
# interpreter's headers.
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
"${PYTHON:-python3}" - <<'PYEOF' || need_apt+=(python3-dev)
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PYEOF
# The image build and the container smoke test run a private Docker engine
# (scripts/dockerd.sh); debootstrap makes the stand-in base image where no
# image registry is reachable (scripts/base-image.sh).
if [ "${SETUP_DOCKER:-1}" = 1 ]; then
  command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
fi
if [ "${SETUP_BROWSER:-1}" = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  need_apt+=(chromium)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian starts a system redis-server on 6379 when it installs the package; the
# tests start their own on free ports, so that one is harmless but unneeded.

PY=${PYTHON:-python3}
# The editable install builds the C extension into the source tree, so its
# source and setup.py are part of what a change must reinstall.
stamp=.venv/.installed-$(cat service/pyproject.toml service/setup.py service/src/redis_ws_gateway/*.c | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "creating .venv and installing the package with its dev tools"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e "service[dev]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

HELM_VERSION=v3.22.0
# `go install` builds carry no version string, so a stamp records which one.
if [ "${SETUP_HELM:-1}" = 1 ] && { [ ! -x .tools/bin/helm ] || [ "$(cat .tools/helm-version 2>/dev/null)" != "$HELM_VERSION" ]; }; then
  command -v go >/dev/null 2>&1 || { log "go is required to build helm"; exit 1; }
  log "building helm $HELM_VERSION from the Go module proxy (first time only, a few minutes)"
  mkdir -p .tools/bin
  GOBIN="$PWD/.tools/bin" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  echo "$HELM_VERSION" > .tools/helm-version
fi
log "ready"
