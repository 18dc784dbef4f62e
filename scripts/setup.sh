#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine, and nothing
# twice. Two sets:
#
#   scripts/setup.sh demo   what `make demo` runs: redis-server (Debian's
#                           package) and the package itself in .venv
#   scripts/setup.sh test   (the default) everything `make test` needs besides:
#                           redis-tools and redis-sentinel, haproxy (the local
#                           e2e suite), a C compiler for the package's
#                           extensions, the dev tools in .venv (ruff, mypy,
#                           pytest, playwright, ...), chromium (browser tests),
#                           docker.io and debootstrap (the image and its smoke
#                           test, scripts/dockerd.sh and base-image.sh) and
#                           helm, built from the Go module proxy into
#                           .tools/bin (needs Go), and the npm package's
#                           build tools in clients/js/node_modules (npm ci)
#
# Each step says what it does, or that it is already done. Safe to run again.
#
# Environment:
#   PYTHON=python3.11  the interpreter the venv is made from (default python3)
#   SETUP_BROWSER=0    test set without chromium (its tests then skip)
#   SETUP_HELM=0       test set without helm (the chart tests then skip)
#   SETUP_DOCKER=0     test set without docker.io and debootstrap
#   SETUP_NPM=0        test set without clients/js/node_modules (its tests
#                      then install it themselves, or skip without npm)
#   SETUP_DRY_RUN=1    print each step and whether it would run; change nothing
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-test}
case "$mode" in
  demo|test) ;;
  *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
dry=${SETUP_DRY_RUN:-0}
log() { printf 'setup: %s\n' "$*" >&2; }
started=$SECONDS
step=0
steps=2
[ "$mode" = test ] && steps=4
begin() { step=$((step + 1)); log "[$step/$steps] $*"; }

# --- Debian packages ---------------------------------------------------------
need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# Debian's own python3 makes venvs only with python3-venv installed.
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -c "import ensurepip" >/dev/null 2>&1 \
  || need_apt+=(python3-venv)
if [ "$mode" = test ]; then
  command -v redis-cli >/dev/null 2>&1 || need_apt+=(redis-tools)
  command -v redis-sentinel >/dev/null 2>&1 || need_apt+=(redis-sentinel)
  # The local e2e suite (tests/e2e) puts HAProxy in front of several gateways.
  # Debian installs it in /usr/sbin, which is not on a normal user's PATH.
  command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
  # The package's C extensions (the fan-out loop) need a compiler and the
  # interpreter's headers; the demo installs without them when they are
  # missing and runs the same loop in Python.
  command -v gcc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
  # The bench's receive loop inflates permessage-deflate frames (--deflate).
  [ -f /usr/include/zlib.h ] || need_apt+=(zlib1g-dev)
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
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  begin "installing Debian packages: ${need_apt[*]} (apt; the slow part on a fresh machine)"
  if [ "$dry" != 1 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  fi
else
  begin "Debian packages: already installed"
fi
# Debian starts a system redis-server on 6379 when it installs the package; the
# demo and the tests start their own on free ports, so that one is harmless.

# --- the Python packages -------------------------------------------------------
PY=${PYTHON:-python3}
# Four distributions from this repository (docs/ARCHITECTURE.md, "Layout"): the
# wire module, the gateway, the Python client, and (tests only) the bench.
# The editable install of the bench builds its C extensions into its source
# tree, so their sources and setup.py are part of what a change must reinstall.
hash=$(cat wire/pyproject.toml service/pyproject.toml clients/python/pyproject.toml \
  bench/pyproject.toml bench/setup.py bench/src/redis_ws_bench/*.c | sha256sum | cut -c1-16)
dev_stamp=.venv/.installed-dev-$hash
runtime_stamp=.venv/.installed-runtime-$hash
if [ "$mode" = test ]; then
  stamp=$dev_stamp; what="the packages with their dev tools and the bench"
  specs=(-e ./wire -e "./service[dev]" -e ./clients/python -e ./bench)
else
  stamp=$runtime_stamp; what="the gateway and its client"
  specs=(-e ./wire -e ./service -e ./clients/python)
fi
# The dev install holds everything the runtime one does.
if [ -f "$stamp" ] || [ -f "$dev_stamp" ]; then
  begin ".venv: $what already installed"
else
  begin "creating .venv and installing $what (pip; under a minute on a fresh machine)"
  if [ "$dry" != 1 ]; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "${specs[@]}"
    if [ "$mode" = test ]; then rm -f .venv/.installed-*; fi
    touch "$stamp"
  fi
fi

# --- helm (test set only) --------------------------------------------------------
if [ "$mode" = test ]; then
  HELM_VERSION=v3.22.0
  # `go install` builds carry no version string, so a stamp records which one.
  if [ "${SETUP_HELM:-1}" != 1 ]; then
    begin "helm: skipped (SETUP_HELM=0; the chart tests will skip)"
  elif [ -x .tools/bin/helm ] && [ "$(cat .tools/helm-version 2>/dev/null)" = "$HELM_VERSION" ]; then
    begin "helm $HELM_VERSION: already built"
  else
    begin "building helm $HELM_VERSION from the Go module proxy (first time only, a few minutes)"
    if [ "$dry" != 1 ]; then
      command -v go >/dev/null 2>&1 || {
        log "go is required to build helm for the chart tests: install Go, or run with"
        log "SETUP_HELM=0 (the chart tests then skip). \`make demo\` does not need it."
        exit 1
      }
      mkdir -p .tools/bin
      GOBIN="$PWD/.tools/bin" GOFLAGS=-mod=mod go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
      echo "$HELM_VERSION" > .tools/helm-version
    fi
  fi
fi
# --- the npm package's build tools (test set only) --------------------------------
if [ "$mode" = test ]; then
  # The stamp names the lock file's hash: a changed lock installs again.
  npm_stamp=clients/js/node_modules/.installed-$(sha256sum clients/js/package-lock.json | cut -c1-16)
  if [ "${SETUP_NPM:-1}" != 1 ]; then
    begin "clients/js node modules: skipped (SETUP_NPM=0)"
  elif ! command -v npm >/dev/null 2>&1; then
    begin "clients/js node modules: skipped (npm not found; the npm package tests will skip)"
  elif [ -f "$npm_stamp" ]; then
    begin "clients/js node modules: already installed"
  else
    begin "installing clients/js node modules (npm ci; about a minute on a fresh machine, seconds from npm's cache)"
    if [ "$dry" != 1 ]; then
      (cd clients/js && npm ci --prefer-offline --no-audit --no-fund --loglevel=error)
      touch "$npm_stamp"
    fi
  fi
fi
log "ready for \`make $mode\` ($((SECONDS - started)) s)"
