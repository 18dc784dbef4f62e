#!/usr/bin/env bash
# Builds the Kubernetes server binaries (kubeadm, kubelet, kubectl, the
# control plane and kube-proxy) from the k8s.io/kubernetes module on the Go
# module proxy, for a kind node image made without any image registry.
#
# The module's go.mod points the k8s.io/* staging modules at ./staging/...,
# which the module zip does not carry (they are modules of their own), so the
# replaces are dropped and the staging modules pinned to their published
# v0.<minor>.<patch>, the same code the release tags. The version is stamped
# with -ldflags because kubeadm compares the binaries' versions.
#
# Usage: k8s/build-kubernetes.sh OUT_DIR   (KUBE_VERSION, default below)
set -euo pipefail

KUBE_VERSION=${KUBE_VERSION:-v1.34.2}
out=${1:?usage: build-kubernetes.sh OUT_DIR}
log() { printf 'build-kubernetes: %s\n' "$*" >&2; }

components=(kubeadm kubelet kubectl kube-apiserver kube-controller-manager kube-scheduler kube-proxy)
missing=0
for c in "${components[@]}"; do [ -x "$out/$c" ] || missing=1; done
if [ "$missing" = 0 ] && [ "$(cat "$out/.version" 2>/dev/null)" = "$KUBE_VERSION" ]; then
  log "$KUBE_VERSION binaries already in $out"
  exit 0
fi

staging="v0.${KUBE_VERSION#v1.}"
export GOWORK=off GOFLAGS=-mod=mod CGO_ENABLED=0
log "fetching k8s.io/kubernetes@$KUBE_VERSION from the Go module proxy"
moddir=$(cd /tmp && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
[ -d "$moddir" ] || { log "module download failed"; exit 1; }

src="$out/.src"
rm -rf "$src"
mkdir -p "$src"
# The module cache is read-only; the build edits go.mod, so it works on a copy.
# vendor/ matches the original go.mod only, so it is left behind.
tar -C "$moddir" --exclude=./vendor --exclude=./staging -cf - . | tar -C "$src" -xf -
chmod -R u+w "$src"
rm -f "$src/go.work" "$src/go.work.sum"
sed -i -e '/=> \.\/staging\//d' \
  -e "s#^\(\s*k8s\.io/[a-z0-9-]*\) v0\.0\.0\$#\1 $staging#" "$src/go.mod"

ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

log "resolving the published staging modules ($staging)"
(cd "$src" && go mod download >/dev/null 2>&1 || true)
pkgs=()
for c in "${components[@]}"; do pkgs+=("./cmd/$c"); done
log "compiling ${components[*]} (several minutes on 2 cores; nice'd)"
start=$(date +%s)
# go build prints nothing until it is done; say every minute what is built.
(cd "$src" && nice -n 10 go build -trimpath -ldflags "-s -w $ldflags" -o "$out/" "${pkgs[@]}") &
build=$!
while kill -0 "$build" 2>/dev/null; do
  for _ in $(seq 60); do kill -0 "$build" 2>/dev/null || break; sleep 1; done
  kill -0 "$build" 2>/dev/null || break
  done_now=$(for c in "${components[@]}"; do [ "$out/$c" -nt "$src/go.mod" ] && printf '%s ' "$c"; done)
  log "still compiling after $(( $(date +%s) - start ))s; done: ${done_now:-none yet}"
done
wait "$build"
log "compiled in $(( $(date +%s) - start ))s"
cp "$src/build/pause/linux/pause.c" "$out/pause.c"
rm -rf "$src"
echo "$KUBE_VERSION" > "$out/.version"
"$out/kubeadm" version -o short
