#!/usr/bin/env bash
# Builds the cluster's other Go programs from the Go module proxy, each as a
# tiny main module that requires the upstream module at a pinned version (a
# dependency's replace directives do not apply, so published modules are
# all that is needed):
#   etcd     go.etcd.io/etcd/server/v3  (the version kubeadm asks for)
#   coredns  github.com/coredns/coredns (only the plugins kubeadm's Corefile uses)
#   crictl   sigs.k8s.io/cri-tools      (kind inspects node images with it;
#            built with go install, its go.mod has no replaces)
#   traefik  github.com/traefik/traefik/v3 (the e2e cluster's ingress
#            controller; its go.mod replaces modules by other published ones,
#            so it is built as the main module from a copy of its source)
#   metrics-server  sigs.k8s.io/metrics-server (resource metrics for the HPA)
#
# Usage: k8s/build-go-binaries.sh OUT_DIR NAME...
set -euo pipefail

out=${1:?usage: build-go-binaries.sh OUT_DIR NAME...}
shift
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.1}
CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}
TRAEFIK_VERSION=${TRAEFIK_VERSION:-v3.6.4}
METRICS_SERVER_VERSION=${METRICS_SERVER_VERSION:-v0.8.0}
log() { printf 'build-go-binaries: %s\n' "$*" >&2; }
# Runs a command in the background and says once a minute that it still
# runs: these compiles take minutes and go build prints nothing meanwhile.
progress() {
  local label=$1 started pid
  shift
  started=$(date +%s)
  "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$pid" 2>/dev/null && log "still building $label after $(( $(date +%s) - started ))s"
  done
  wait "$pid"
}
export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0

build() {
  local name=$1 version=$2 module=$3 main=$4
  if [ -x "$out/$name" ] && [ "$(cat "$out/.$name-version" 2>/dev/null)" = "$version" ]; then
    return 0
  fi
  local src="$out/.src-$name"
  rm -rf "$src"
  mkdir -p "$src"
  printf '%s' "$main" >"$src/main.go"
  log "building $name $version ($module; a few minutes, nice'd)"
  local start
  start=$(date +%s)
  (
    cd "$src"
    go mod init "local.invalid/$name" >/dev/null 2>&1
    go get "$module@$version" >/dev/null 2>&1 || go get "$module@$version"
    go mod tidy >/dev/null 2>&1 || go mod tidy
    progress "$name" nice -n 10 go build -trimpath -ldflags "-s -w $5" -o "$out/$name" .
  )
  rm -rf "$src"
  echo "$version" >"$out/.$name-version"
  log "$name built in $(( $(date +%s) - start ))s"
}

mkdir -p "$out"
for name in "$@"; do
  case "$name" in
    etcd)
      build etcd "$ETCD_VERSION" go.etcd.io/etcd/server/v3 'package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
' ""
      ;;
    coredns)
      # kubeadm's Corefile: errors health ready kubernetes prometheus forward
      # cache loop reload loadbalance (and log for debugging).
      build coredns "$COREDNS_VERSION" github.com/coredns/coredns 'package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

var _ = dnsserver.Directives

func main() { coremain.Run() }
' "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
      ;;
    crictl)
      # No replace directives upstream: go install builds it as published.
      if [ ! -x "$out/crictl" ] || [ "$(cat "$out/.crictl-version" 2>/dev/null)" != "$CRICTL_VERSION" ]; then
        log "building crictl $CRICTL_VERSION"
        progress crictl env GOBIN="$out" nice -n 10 go install -trimpath \
          "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
        echo "$CRICTL_VERSION" >"$out/.crictl-version"
      fi
      ;;
    traefik)
      if [ ! -x "$out/traefik" ] || [ "$(cat "$out/.traefik-version" 2>/dev/null)" != "$TRAEFIK_VERSION" ]; then
        log "building traefik $TRAEFIK_VERSION (its own go.mod, with its replaces; several minutes, nice'd)"
        start=$(date +%s)
        moddir=$(cd /tmp && go mod download -json "github.com/traefik/traefik/v3@$TRAEFIK_VERSION" \
          | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
        src="$out/.src-traefik"
        rm -rf "$src"
        cp -r "$moddir" "$src"
        chmod -R u+w "$src"
        (cd "$src" && progress traefik nice -n 10 go build -trimpath \
          -ldflags "-s -w -X github.com/traefik/traefik/v3/pkg/version.Version=$TRAEFIK_VERSION" \
          -o "$out/traefik" ./cmd/traefik)
        rm -rf "$src"
        echo "$TRAEFIK_VERSION" >"$out/.traefik-version"
        log "traefik built in $(( $(date +%s) - start ))s"
      fi
      ;;
    metrics-server)
      if [ ! -x "$out/metrics-server" ] || [ "$(cat "$out/.metrics-server-version" 2>/dev/null)" != "$METRICS_SERVER_VERSION" ]; then
        log "building metrics-server $METRICS_SERVER_VERSION"
        progress metrics-server env GOBIN="$out" nice -n 10 go install -trimpath \
          "sigs.k8s.io/metrics-server/cmd/metrics-server@$METRICS_SERVER_VERSION"
        echo "$METRICS_SERVER_VERSION" >"$out/.metrics-server-version"
      fi
      ;;
    *) log "unknown program $name"; exit 2 ;;
  esac
done
