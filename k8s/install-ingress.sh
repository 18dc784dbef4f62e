#!/usr/bin/env bash
# Installs the kind cluster's add-ons: Traefik as the ingress controller
# (IngressClass "traefik") and metrics-server for the HPA, from images built
# on this machine (k8s/addon-images.sh) and loaded into the nodes. Nothing is
# pulled from a registry.
#
# ingress-nginx, which this script installed before, cannot be built here:
# its controller image is OpenResty with Lua modules downloaded from outside
# any package registry, and the project is retired upstream (no releases
# after March 2026). The chart's Ingress is controller-neutral apart from the
# optional ingress-nginx timeout annotations.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${KIND_CLUSTER:-redis-ws-gateway}
context="kind-$cluster"
log() { printf 'install-ingress: [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

mapfile -t tags < <(k8s/addon-images.sh)
traefik=$(printf '%s\n' "${tags[@]}" | grep /traefik:)
metrics=$(printf '%s\n' "${tags[@]}" | grep /metrics-server:)
log "loading ${tags[*]} into kind"
kind load docker-image --name "$cluster" "${tags[@]}" >/dev/null

sed "s#IMAGE_PLACEHOLDER#$traefik#" k8s/addons/traefik.yaml | kubectl --context "$context" apply -f - >/dev/null
sed "s#IMAGE_PLACEHOLDER#$metrics#" k8s/addons/metrics-server.yaml | kubectl --context "$context" apply -f - >/dev/null
kubectl --context "$context" -n traefik rollout status deployment/traefik --timeout=180s
kubectl --context "$context" -n kube-system rollout status deployment/metrics-server --timeout=180s
kubectl --context "$context" apply -f k8s/addons/metrics-apiservice.yaml >/dev/null
kubectl --context "$context" wait apiservice/v1beta1.metrics.k8s.io --for=condition=Available --timeout=120s
log "Traefik serves Ingresses of class traefik on the node's port 80 (the host's 127.0.0.1:${KIND_INGRESS_PORT:-8880})"
