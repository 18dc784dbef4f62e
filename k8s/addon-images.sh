#!/usr/bin/env bash
# Images the e2e cluster needs besides Kubernetes' own, built here on the
# Debian stand-in base because no image registry is reachable:
#   redis-ws-gateway/redis:bookworm        Debian's redis-server, for the chart's bundled Redis
#   redis-ws-gateway/traefik:<version>     the ingress controller
#   redis-ws-gateway/metrics-server:<ver>  resource metrics for the HPA
# Binaries come from k8s/build-go-binaries.sh, cached under
# $RWG_CACHE_DIR/addons. Prints one tag per line.
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${RWG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/redis-ws-gateway}/addons
export TRAEFIK_VERSION=${TRAEFIK_VERSION:-v3.6.4}
export METRICS_SERVER_VERSION=${METRICS_SERVER_VERSION:-v0.8.0}
log() { printf 'addon-images: [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

scripts/dockerd.sh start >/dev/null
DOCKER_HOST=$(scripts/dockerd.sh host)
export DOCKER_HOST DOCKER_BUILDKIT=0
base=$(scripts/base-image.sh)

image() {  # tag, then the Dockerfile on stdin; the context is $cache/bin
  local tag=$1
  if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "$tag"
    return 0
  fi
  local ctx
  ctx=$(mktemp -d "$cache/ctx.XXXXXX")
  cat >"$ctx/Dockerfile"
  cp "$cache"/bin/* "$ctx/" 2>/dev/null || true
  docker build -q --network host -t "$tag" "$ctx" >/dev/null
  rm -rf "$ctx"
  log "built $tag"
  echo "$tag"
}

mkdir -p "$cache/bin"
redis_tag=redis-ws-gateway/redis:bookworm
if ! docker image inspect "$redis_tag" >/dev/null 2>&1; then
  image "$redis_tag" <<DOCKERFILE
FROM $base
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/*
# The chart runs it as 999:1000 with a writable /data; no passwd entry needed.
WORKDIR /data
CMD ["redis-server"]
DOCKERFILE
else
  echo "$redis_tag"
fi

log "traefik $TRAEFIK_VERSION and metrics-server $METRICS_SERVER_VERSION binaries"
k8s/build-go-binaries.sh "$cache/bin" traefik metrics-server
image "redis-ws-gateway/traefik:$TRAEFIK_VERSION" <<DOCKERFILE
FROM $base
COPY traefik /usr/local/bin/traefik
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/traefik"]
DOCKERFILE
image "redis-ws-gateway/metrics-server:$METRICS_SERVER_VERSION" <<DOCKERFILE
FROM $base
COPY metrics-server /usr/local/bin/metrics-server
USER 1000:1000
ENTRYPOINT ["/usr/local/bin/metrics-server"]
DOCKERFILE
