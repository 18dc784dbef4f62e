# The README's two commands are `make demo` and `make test`; everything else
# here serves development and the kind e2e path.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
HELM := $(CURDIR)/.tools/bin/helm
IMAGE ?= redis-ws-gateway:dev
KIND_CLUSTER ?= redis-ws-gateway
PYTEST_ARGS ?=

.PHONY: setup setup-demo demo test lint unit integration chart-test e2e-local e2e kind-up kind-down image deploy bench clean

# Everything `make test` needs (dev tools, helm, chromium, haproxy).
setup:
	@scripts/setup.sh test

# Only what the demo runs: redis-server and the package. No Go, no browser.
setup-demo:
	@scripts/setup.sh demo

demo: setup-demo
	@$(VENV)/bin/redis-ws-gateway demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check service wire clients/python clients/js/scripts bench tests scripts
	$(VENV)/bin/ruff format --check service wire clients/python clients/js/scripts bench tests scripts
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

# --- kind ----------------------------------------------------------------------
# Everything runs on a private Docker engine (scripts/dockerd.sh; RWG_DOCKER=system
# uses the machine's own). Where no image registry is reachable, the node
# image, the ingress controller, metrics-server and Redis are built here from
# Debian packages and the Go module proxy, and cached (docs/OPERATIONS.md).
KIND_INGRESS_PORT ?= 8880
KIND_ENV = PATH="$(CURDIR)/.tools/bin:$$PATH" DOCKER_HOST="$$(scripts/dockerd.sh host)"
UPGRADE_IMAGE = $(firstword $(subst :, ,$(IMAGE))):$(lastword $(subst :, ,$(IMAGE)))-upgrade

image: setup
	scripts/build-image.sh $(IMAGE)

kind-up: setup
	KIND_CLUSTER=$(KIND_CLUSTER) KIND_INGRESS_PORT=$(KIND_INGRESS_PORT) k8s/kind-up.sh

# The cluster, then the private Docker engine that kind-up started.
kind-down:
	$(KIND_ENV) kind delete cluster --name $(KIND_CLUSTER)
	scripts/dockerd.sh stop

deploy: setup
	scripts/build-image.sh $(IMAGE)
	$(KIND_ENV) kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	$(KIND_ENV) $(HELM) upgrade --install gw chart -f k8s/values-kind.yaml \
	  --set image.repository=$(firstword $(subst :, ,$(IMAGE))) \
	  --set image.tag=$(lastword $(subst :, ,$(IMAGE))) --wait --timeout 5m

# The cluster, the release with the e2e layer, `helm test`, then the same
# suite as e2e-local against it through the ingress. A second tag of the same
# image is loaded for the suite's `helm upgrade` test. Whatever the outcome,
# the cluster and the engine are stopped at the end (E2E_KEEP=1 keeps them up
# to look around; `make kind-down` stops them then), as the tests do with
# their own redis-server and dockerd.
e2e: setup
	@start=$$(date +%s); set -e; \
	[ "$(E2E_KEEP)" = 1 ] || trap '$(MAKE) --no-print-directory kind-down' EXIT; \
	$(MAKE) --no-print-directory kind-up; \
	$(MAKE) --no-print-directory deploy; \
	$(KIND_ENV) docker tag $(IMAGE) $(UPGRADE_IMAGE); \
	$(KIND_ENV) kind load docker-image $(UPGRADE_IMAGE) --name $(KIND_CLUSTER); \
	$(KIND_ENV) $(HELM) upgrade gw chart --reuse-values -f tests/e2e/values-kind-e2e.yaml --wait --timeout 5m; \
	$(KIND_ENV) $(HELM) test gw --timeout 5m; \
	$(KIND_ENV) E2E_TARGET=kind E2E_KUBE_CONTEXT=kind-$(KIND_CLUSTER) \
	  E2E_URL=ws://localhost:$(KIND_INGRESS_PORT)/ws HELM=$(HELM) \
	  E2E_UPGRADE_TAG=$(lastword $(subst :, ,$(UPGRADE_IMAGE))) \
	  $(VENV)/bin/pytest tests/e2e --timeout 900 $(PYTEST_ARGS); \
	echo "make e2e: passed in $$(( $$(date +%s) - start ))s"

bench: setup
	$(VENV)/bin/redis-ws-bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache artifacts
