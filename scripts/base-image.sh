#!/usr/bin/env bash
# Makes a local stand-in for python:3.11-slim when no image registry can be
# reached: Debian bookworm (minbase) with its own Python 3.11, imported into
# the Docker engine as a local tag. The Dockerfile is unchanged; it is built
# with --build-arg PYTHON_IMAGE=<this tag>. Built once: an existing tag is
# reused. Prints the tag.
#
# The machine's CA bundle is copied in and pip is pointed at it, so that pip
# inside the build reaches the package index exactly as the host's pip does
# (a TLS-inspecting proxy's CA, if the host trusts one, is trusted too).
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${RWG_BASE_IMAGE:-redis-ws-gateway-base:bookworm-python3.11}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { printf 'base-image: %s\n' "$*" >&2; }

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag"
  exit 0
fi
command -v debootstrap >/dev/null 2>&1 || { log "debootstrap not found: run scripts/setup.sh"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/rwg-base.XXXXXX")
rootfs="$work/rootfs"
cleanup() {
  # debootstrap mounts /proc and /sys in the target while it runs.
  for m in proc sys dev/pts dev; do umount -l "$rootfs/$m" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

start=$(date +%s)
log "debootstrap --variant=minbase bookworm (about a minute)"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

cat >"$rootfs/etc/apt/sources.list" <<SRC
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
SRC
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
# No daemon may start inside the chroot.
printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
chmod +x "$rootfs/usr/sbin/policy-rc.d"

log "installing python3 python3-venv python3-dev python-is-python3 ca-certificates"
# python3-dev: without Python.h the package's C extensions would not build
# and the Dockerfile's import check would stop the build.
chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev python-is-python3 ca-certificates >/dev/null \
    && apt-get clean && rm -rf /var/lib/apt/lists/*' || { log "apt-get in the chroot failed"; exit 1; }

if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
rm -f "$rootfs/usr/sbin/policy-rc.d" "$rootfs/etc/resolv.conf"
: >"$rootfs/etc/resolv.conf"

log "importing as $tag"
tar --numeric-owner -C "$rootfs" -cf - . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
log "done in $(( $(date +%s) - start ))s"
echo "$tag"
