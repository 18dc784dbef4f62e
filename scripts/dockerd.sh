#!/usr/bin/env bash
# A private Docker engine for the image build, the container smoke test and
# kind: its own data root, exec root, pidfile and socket under the cache
# directory, so it never touches a system Docker or another checkout's state,
# and its image cache (the stand-in base image, build layers, the kind node
# image) survives between runs.
#
#   scripts/dockerd.sh start   # prints "started" or "running"; waits until it answers
#   scripts/dockerd.sh stop    # stops the engine this script started
#   scripts/dockerd.sh host    # prints the DOCKER_HOST value to use
#
# A working DOCKER_HOST, or a system engine answering `docker info`, is used
# instead when RWG_DOCKER=system (a machine with Docker Desktop or a daemon of
# its own).
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${RWG_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/redis-ws-gateway}
root="$cache/docker"
sock="$root/docker.sock"
pidfile="$root/dockerd.pid"
logfile="$root/dockerd.log"
log() { printf 'dockerd: %s\n' "$*" >&2; }

answers() { DOCKER_HOST="unix://$sock" timeout 20 docker info >/dev/null 2>&1; }

case "${1:-}" in
  host)
    if [ "${RWG_DOCKER:-private}" = system ]; then
      echo "${DOCKER_HOST:-unix:///var/run/docker.sock}"
    else
      echo "unix://$sock"
    fi
    ;;
  start)
    if [ "${RWG_DOCKER:-private}" = system ]; then
      timeout 20 docker info >/dev/null || { log "RWG_DOCKER=system but 'docker info' fails"; exit 1; }
      echo running
      exit 0
    fi
    if answers; then
      echo running
      exit 0
    fi
    if ! command -v dockerd >/dev/null 2>&1; then
      log "dockerd not found: run scripts/setup.sh (installs Debian's docker.io)"
      exit 1
    fi
    if [ "$(id -u)" != 0 ]; then
      log "a private dockerd needs root; run as root, or use RWG_DOCKER=system with an engine you already have"
      exit 1
    fi
    mkdir -p "$root/data" "$root/exec"
    # A pidfile left by an engine that died would make dockerd refuse to start.
    if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then rm -f "$pidfile"; fi
    rm -f "$sock"
    # setsid: the engine outlives this script and the shell that ran it. No
    # default bridge: builds and the smoke test use the host network, and kind
    # makes a network of its own, so docker0 (which a system engine may own)
    # is left alone.
    # The runtime wrapper: see scripts/runc-bounded-caps (kind's privileged
    # nodes on machines whose own capability set is incomplete).
    setsid dockerd \
      --add-runtime "bounded-caps=$PWD/scripts/runc-bounded-caps" \
      --default-runtime bounded-caps \
      --data-root "$root/data" \
      --exec-root "$root/exec" \
      --pidfile "$pidfile" \
      --host "unix://$sock" \
      --bridge none \
      >>"$logfile" 2>&1 </dev/null &
    for _ in $(seq 120); do
      if answers; then
        echo started
        exit 0
      fi
      if ! kill -0 $! 2>/dev/null; then
        log "dockerd exited; last lines of $logfile:"
        tail -n 20 "$logfile" >&2
        exit 1
      fi
      sleep 0.5
    done
    log "dockerd did not answer within 60s; see $logfile"
    exit 1
    ;;
  stop)
    [ "${RWG_DOCKER:-private}" = system ] && exit 0
    [ -f "$pidfile" ] || exit 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid"
      # dockerd stops its containers (10 s each at most) before it exits.
      for _ in $(seq 240); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      if kill -0 "$pid" 2>/dev/null; then log "dockerd $pid still running after 120s"; exit 1; fi
    fi
    rm -f "$pidfile"
    ;;
  *)
    echo "usage: $0 start|stop|host" >&2
    exit 2
    ;;
esac
