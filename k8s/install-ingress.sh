#!/usr/bin/env bash
# Installs ingress-nginx into the kind cluster made from k8s/kind-config.yaml.
#
# Runs on a developer machine with normal internet access: the manifest comes
# from the ingress-nginx project's git repository and its images from the
# Kubernetes project's image registry. CI machines without that access cannot
# run the kind path; the chart's own tests (tests/chart) need no network.
#
# ingress-nginx is retired upstream (no releases after March 2026). It is kept
# here because the chart's Ingress targets its annotations; the chart's
# HTTPRoute (httpRoute.enabled) is the way forward with a Gateway API
# implementation.
set -euo pipefail

version="${INGRESS_NGINX_VERSION:-controller-v1.13.3}"
manifest="${INGRESS_NGINX_MANIFEST:-https://raw.githubusercontent.com/kubernetes/ingress-nginx/${version}/deploy/static/provider/kind/deploy.yaml}"
context="${KUBE_CONTEXT:-kind-redis-ws-gateway}"

kubectl --context "$context" apply -f "$manifest"

# `kubectl wait` fails at once when no pod matches yet.
for _ in $(seq 60); do
  if kubectl --context "$context" get pods --namespace ingress-nginx \
      --selector=app.kubernetes.io/component=controller --output name | grep -q .; then
    break
  fi
  sleep 2
done

# The controller turns ready only after the admission webhook's certificate
# exists; an Ingress applied before that is rejected by the webhook.
kubectl --context "$context" wait --namespace ingress-nginx \
  --for=condition=ready pod --selector=app.kubernetes.io/component=controller \
  --timeout=180s

echo "ingress-nginx is ready; http://gateway.localtest.me/ reaches Ingresses with that host"
