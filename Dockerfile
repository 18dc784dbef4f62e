# syntax=docker/dockerfile:1

# Both stages must use the same Python: the venv's interpreter links point at
# the base image's /usr/local/bin/python3.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Pure Python on top of its dependencies, which all ship manylinux wheels: no
# compiler in either stage.
# Dependencies first, from pyproject.toml alone with a placeholder package,
# so editing source does not invalidate this (slow) layer.
# The wire module (wire/) is the gateway's one in-repo dependency.
COPY wire/ /build/wire/
COPY service/pyproject.toml /build/deps/pyproject.toml
RUN mkdir -p /build/deps/src/redis_ws_gateway \
    && touch /build/deps/src/redis_ws_gateway/__init__.py \
    && pip install --prefer-binary /build/wire /build/deps \
    && pip uninstall --yes redis-ws-gateway

COPY service/ /build/service/
# A regular (not editable) install: the final image gets the venv, not the
# source tree. pip byte-compiles here because the runtime filesystem is
# read-only. The client and the bench are other distributions: not here.
RUN pip install --no-deps /build/service \
    && python -c "import redis_ws_gateway.cli"


FROM ${PYTHON_IMAGE}

# tini as PID 1 reaps zombies and forwards SIGTERM to the gateway, which
# runs its own drain on it; Debian's package avoids fetching a binary from
# outside the package archive.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

# A numeric USER lets the kubelet verify runAsNonRoot without a passwd
# lookup; 10001 stays clear of the distribution's system id range.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    REDIS_WS_GATEWAY_HOST=0.0.0.0 \
    REDIS_WS_GATEWAY_PORT=8889

LABEL org.opencontainers.image.title="redis-ws-gateway" \
      org.opencontainers.image.description="Forwards Redis pub/sub and Redis Streams to WebSocket clients"

USER 10001:10001
# 8889: /ws, /publish, health. 9090: metrics, admin, console, when
# REDIS_WS_GATEWAY_INTERNAL_PORT is set (the chart sets it).
EXPOSE 8889 9090

# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz itself.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["redis-ws-gateway", "serve"]
