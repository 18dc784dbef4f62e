#!/usr/bin/env bash
# `make kind-up`: a kind cluster for the e2e suite on a machine that reaches
# no image registry. Starts the private Docker engine, builds kind itself
# (Go module proxy) into .tools/bin, the node image (k8s/kind-node-image.sh,
# cached by Kubernetes version), creates the cluster if it does not exist,
# and installs the ingress controller and metrics-server
# (k8s/install-ingress.sh).
#
# On a machine that can pull kindest/node, KIND_NODE_IMAGE=kindest/node:<tag>
# skips the node image build (the ptp CNI is then kind's own kindnetd, so set
# KIND_CONFIG to a config without disableDefaultCNI).
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-redis-ws-gateway}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
log() { printf 'kind-up: [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
start=$(date +%s)

mkdir -p .tools/bin
if [ ! -x .tools/bin/kind ] || [ "$(cat .tools/kind-version 2>/dev/null)" != "$KIND_VERSION" ]; then
  log "building kind $KIND_VERSION from the Go module proxy"
  GOBIN="$PWD/.tools/bin" nice -n 10 go install "sigs.k8s.io/kind@$KIND_VERSION"
  echo "$KIND_VERSION" >.tools/kind-version
fi
export PATH="$PWD/.tools/bin:$PATH"

scripts/dockerd.sh start >/dev/null
DOCKER_HOST=$(scripts/dockerd.sh host)
export DOCKER_HOST

node_image=${KIND_NODE_IMAGE:-}
if [ -z "$node_image" ]; then
  node_image=$(k8s/kind-node-image.sh)
  # The node image's own kubectl matches the cluster's version.
  kube_version=${KUBE_VERSION:-v1.34.2}
  cache=${RWG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/redis-ws-gateway}
  ln -sf "$cache/kind/$kube_version/bin/kubectl" .tools/bin/kubectl
fi

if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  log "cluster $cluster exists"
else
  log "creating cluster $cluster from $node_image"
  kind create cluster --name "$cluster" --config "${KIND_CONFIG:-k8s/kind-config.yaml}" \
    --image "$node_image" --wait 5m
fi
k8s/install-ingress.sh
log "cluster ready in $(( $(date +%s) - start ))s"
