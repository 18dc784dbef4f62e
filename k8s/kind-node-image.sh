#!/usr/bin/env bash
# Builds a kind node image on a machine that reaches no image registry:
#   1. Kubernetes server binaries from source (k8s/build-kubernetes.sh)
#   2. etcd, CoreDNS and crictl from the Go module proxy (k8s/build-go-binaries.sh)
#   3. the control-plane, kube-proxy, etcd, CoreDNS and pause images from them,
#      on the local Debian stand-in base (scripts/base-image.sh)
#   4. a kind base image from Debian's packages and kind's images/base files
#      (k8s/node/Dockerfile.base)
#   5. the node image: base + kubeadm/kubelet/kubectl + the images preloaded
#      into the node's containerd, as `kind build node-image` does
# Everything is cached under $RWG_CACHE_DIR/kind/<version>, and the images
# in the private Docker engine, so a second run only checks. Prints the node
# image's tag.
#
# Usage: k8s/kind-node-image.sh   (KUBE_VERSION, default in build-kubernetes.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

export KUBE_VERSION=${KUBE_VERSION:-v1.34.2}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
cache=${RWG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/redis-ws-gateway}/kind/$KUBE_VERSION
# The tag names the recipe too, so a change to the node's files or to this
# script builds a new image (the binaries stay cached) instead of reusing a
# stale one.
recipe=$(cat k8s/node/* "$0" | sha256sum | cut -c1-10)
node_tag=${KIND_NODE_IMAGE:-redis-ws-gateway/kind-node:$KUBE_VERSION-$recipe}
log() { printf 'kind-node-image: [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

scripts/dockerd.sh start >/dev/null
DOCKER_HOST=$(scripts/dockerd.sh host)
export DOCKER_HOST DOCKER_BUILDKIT=0

if docker image inspect "$node_tag" >/dev/null 2>&1; then
  log "$node_tag is cached"
  echo "$node_tag"
  exit 0
fi
total_start=$(date +%s)
mkdir -p "$cache"
bin="$cache/bin"

log "step 1/5: Kubernetes $KUBE_VERSION binaries"
k8s/build-kubernetes.sh "$bin"
log "step 2/5: etcd, CoreDNS, crictl"
k8s/build-go-binaries.sh "$bin" etcd coredns crictl
if [ ! -x "$bin/pause" ]; then
  # The pause container must outlive everything, reap zombies and never
  # need a libc in its (empty) image: a static build of upstream's pause.c.
  gcc -Os -Wall -static -DVERSION="v$("$bin/kubeadm" config images list --kubernetes-version "$KUBE_VERSION" | sed -n 's#.*/pause:##p')" \
    -o "$bin/pause" "$bin/pause.c"
fi

log "step 3/5: control-plane images"
base=$(scripts/base-image.sh)
mapfile -t required < <("$bin/kubeadm" config images list --kubernetes-version "$KUBE_VERSION")
ctx="$cache/images"
rm -rf "$ctx"
mkdir -p "$ctx/runtime"
# kube-proxy programs iptables/nftables and conntrack; the other components
# share the same base layer so the node stores it once.
cat >"$ctx/runtime/Dockerfile" <<DOCKERFILE
FROM $base
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      iptables nftables conntrack ipset kmod \
    && rm -rf /var/lib/apt/lists/*
DOCKERFILE
runtime_tag=redis-ws-gateway/kube-runtime:bookworm
docker image inspect "$runtime_tag" >/dev/null 2>&1 \
  || docker build -q --network host -t "$runtime_tag" "$ctx/runtime" >/dev/null

images=()
for image in "${required[@]}"; do
  name=${image##*/}; name=${name%%:*}
  dir="$ctx/$name"
  mkdir -p "$dir"
  case "$name" in
    kube-apiserver|kube-controller-manager|kube-scheduler|kube-proxy)
      cp "$bin/$name" "$dir/"
      printf 'FROM %s\nCOPY %s /usr/local/bin/%s\n' "$runtime_tag" "$name" "$name" >"$dir/Dockerfile"
      ;;
    etcd)
      cp "$bin/etcd" "$dir/"
      printf 'FROM %s\nCOPY etcd /usr/local/bin/etcd\nENTRYPOINT ["/usr/local/bin/etcd"]\n' "$base" >"$dir/Dockerfile"
      ;;
    coredns)
      cp "$bin/coredns" "$dir/"
      # Root, unlike upstream's image (non-root with a file capability on
      # the binary): kubeadm's Deployment adds NET_BIND_SERVICE for port 53,
      # which a root process can use as it is.
      printf 'FROM %s\nCOPY coredns /coredns\nENTRYPOINT ["/coredns"]\n' "$base" >"$dir/Dockerfile"
      ;;
    pause)
      cp "$bin/pause" "$dir/"
      printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$dir/Dockerfile"
      pause_image=$image
      ;;
    *) log "no recipe for $image"; exit 1 ;;
  esac
  docker build -q -t "$image" "$dir" >/dev/null
  log "  built $image"
  images+=("$image")
done

log "step 4/5: kind base image from Debian packages"
base_ctx="$cache/node-base"
rm -rf "$base_ctx"
mkdir -p "$base_ctx"
kind_src=$(cd /tmp && go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
cp -r "$kind_src/images/base/files" "$base_ctx/files"
chmod -R u+w "$base_ctx"
cp k8s/node/Dockerfile.base k8s/node/10-kind-ptp.conflist "$base_ctx/"
node_base=redis-ws-gateway/kind-base:bookworm
docker build --network host --build-arg "BASE_IMAGE=$base" -f "$base_ctx/Dockerfile.base" \
  -t "$node_base" "$base_ctx" >"$cache/node-base.log" 2>&1 \
  || { tail -n 30 "$cache/node-base.log" >&2; exit 1; }
# containerd must run the same pause image the kubelet is told about.
log "step 5/5: node image (binaries in, ${#images[@]} images preloaded)"
cid=$(docker run -d --privileged --entrypoint=sleep "$node_base" infinity)
trap 'docker rm -f -v "$cid" >/dev/null 2>&1 || true' EXIT
for b in kubeadm kubelet kubectl crictl; do
  docker cp "$bin/$b" "$cid:/usr/bin/$b"
done
docker exec "$cid" sh -c "printf '%s' '$KUBE_VERSION' > /kind/version \
  && sed -i 's#sandbox_image = .*#sandbox_image = \"$pause_image\"#' /etc/containerd/config.toml"
docker exec "$cid" bash -c 'nohup containerd >/tmp/containerd.log 2>&1 &
  for i in $(seq 50); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done
  cat /tmp/containerd.log; exit 1'
docker save "${images[@]}" \
  | docker exec -i "$cid" ctr --namespace=k8s.io images import --all-platforms --no-unpack --digests - >/dev/null
docker exec "$cid" ctr --namespace=k8s.io images list -q | grep -v -e '^sha256:' -e '^import-' \
  | sed 's/^/kind-node-image:   in node: /' >&2
# Stopped cleanly, so its metadata is complete when committed; `sleep` as
# PID 1 does not reap, hence a zombie counts as gone.
docker exec "$cid" sh -c 'pkill containerd; for i in $(seq 100); do
  ps -o stat= -C containerd | grep -qv "^Z" || exit 0; sleep 0.2; done; exit 1'
docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' "$cid" "$node_tag" >/dev/null
log "built $node_tag in $(( $(date +%s) - total_start ))s"
echo "$node_tag"
