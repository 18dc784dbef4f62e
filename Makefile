# The README's two commands are `make demo` and `make test`; everything else
# here serves development and the kind e2e path.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HELM := $(CURDIR)/.tools/bin/helm
IMAGE ?= redis-ws-gateway:dev
KIND_CLUSTER ?= redis-ws-gateway
PYTEST_ARGS ?=

.PHONY: setup demo test lint unit integration chart-test e2e-local e2e kind-up kind-down image deploy bench clean

setup:
	@scripts/setup.sh

demo: setup
	@$(VENV)/bin/redis-ws-gateway demo

lint: setup
	$(VENV)/bin/ruff check service tests scripts
	$(VENV)/bin/ruff format --check service tests scripts
	$(VENV)/bin/mypy

test: setup lint
	HELM=$(HELM) $(VENV)/bin/pytest $(PYTEST_ARGS)

unit: setup
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

chart-test: setup
	HELM=$(HELM) $(VENV)/bin/pytest tests/chart $(PYTEST_ARGS)

# Several gateway processes behind a local load balancer, with Redis: the same
# suite that `make e2e` runs against kind. Also part of `make test`.
e2e-local: setup
	E2E_TARGET=local $(VENV)/bin/pytest tests/e2e $(PYTEST_ARGS)

# --- kind (needs a Docker engine and kind on the developer's machine) --------

define need_docker
	@command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 || { \
	  echo "make $@: needs a running Docker engine (docker info failed). This target"; \
	  echo "builds the image and runs it in kind; use 'make e2e-local' where there is none."; exit 2; }
	@command -v kind >/dev/null 2>&1 || { \
	  echo "make $@: needs kind (https://kind.sigs.k8s.io) on PATH"; exit 2; }
	@command -v kubectl >/dev/null 2>&1 || { echo "make $@: needs kubectl on PATH"; exit 2; }
endef

# Builds with the repository's Dockerfile on a private Docker engine
# (scripts/dockerd.sh); where python:3.11-slim cannot be pulled, on a local
# Debian stand-in base (scripts/base-image.sh).
image: setup
	scripts/build-image.sh $(IMAGE)

kind-up:
	$(need_docker)
	kind get clusters | grep -qx $(KIND_CLUSTER) || kind create cluster --name $(KIND_CLUSTER) --config k8s/kind-config.yaml
	k8s/install-ingress.sh

kind-down:
	$(need_docker)
	kind delete cluster --name $(KIND_CLUSTER)

deploy: setup
	$(need_docker)
	$(MAKE) image
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	$(HELM) upgrade --install gw chart -f k8s/values-kind.yaml \
	  --set image.repository=$(firstword $(subst :, ,$(IMAGE))) \
	  --set image.tag=$(lastword $(subst :, ,$(IMAGE))) --wait --timeout 5m

e2e: setup
	$(need_docker)
	$(MAKE) kind-up
	$(MAKE) deploy
	$(HELM) upgrade gw chart --reuse-values -f tests/e2e/values-kind-e2e.yaml --wait --timeout 5m
	E2E_TARGET=kind E2E_KUBE_CONTEXT=kind-$(KIND_CLUSTER) \
	  $(VENV)/bin/pytest tests/e2e --timeout 900 $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/redis-ws-gateway bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache artifacts
