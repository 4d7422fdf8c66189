# Two commands on a fresh machine:
#   make run    set up .venv and serve on 127.0.0.1:50051 with a file store and a dev token in ./var
#   make test   set up .venv with the dev tools, then ruff, mypy, the genproto check and pytest
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
VAR    := var
LISTEN ?= 127.0.0.1:50051

# Real NBD clients and QEMU guests for the frontend's tests; nbd-client, kmod and e2fsprogs
# build the guest that runs the frontend itself (tests/guest/rootfs.py); podman, runc and
# mmdebstrap (images from Debian's packages) for the container tests (Debian packages).
DEBIAN_TEST_PACKAGES := qemu-system-x86 qemu-utils libnbd-bin fio busybox-static nbdkit prometheus dnsmasq-base \
	nbd-client kmod e2fsprogs podman runc netavark aardvark-dns mmdebstrap
# checkov pins half of PyPI: it gets a venv of its own.
CHECKOV_VERSION := 3.3.30

.PHONY: run test lint lint-deploy typecheck check-genproto genproto pytest bench certs clean debian-test-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.run-stamp

# var/ is make run's own development state: a new dev token replaces the tokens file.
$(VAR)/dev-token: | $(VENV)/.run-stamp
	mkdir -p -m 0700 $(VAR)
	rm -f $(VAR)/tokens.toml
	$(BIN)/netswap-server gen-token dev --quota 4GiB --tokens $(VAR)/tokens.toml --token-out $@
	@echo "dev token (keep it; it is not shown again): $$(cat $@)"

run: $(VENV)/.run-stamp $(VAR)/dev-token
	@echo
	@echo "In another terminal, swap 64 MiB out and back in and verify every byte:"
	@echo "  $(BIN)/netswap --server $(LISTEN) --token-file $(VAR)/dev-token demo --size 64MiB"
	@echo
	$(BIN)/netswap-server --listen $(LISTEN) --store file:$(VAR)/store --capacity 8GiB \
		--tokens $(VAR)/tokens.toml

test: $(VENV)/.dev-stamp debian-test-deps lint lint-deploy typecheck check-genproto pytest

debian-test-deps:
	@missing=$$(for p in $(DEBIAN_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing test tools: $$missing"; \
		apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null; \
	fi

lint: $(VENV)/.dev-stamp
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy cannot follow the package-dir mapping (netswap.server lives in server/),
# so it checks a tree of symlinks that has the installed shape.
.venv-checkov/.stamp:
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q checkov==$(CHECKOV_VERSION)
	touch $@

# Deployment files, checked by the tools their ecosystems use.
lint-deploy: $(VENV)/.dev-stamp debian-test-deps .venv-checkov/.stamp
	$(BIN)/hadolint deploy/Dockerfile
	$(BIN)/yamllint --strict -c deploy/.yamllint deploy
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
	$(BIN)/kubernetes-validate --strict --quiet deploy/k8s/*.yaml
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml
	.venv-checkov/bin/checkov --config-file deploy/checkov.yaml

typecheck: $(VENV)/.dev-stamp
	rm -rf build/typecheck && mkdir -p build/typecheck/netswap
	cp proto/netswap/__init__.py proto/netswap/py.typed build/typecheck/netswap/
	ln -s ../../../proto/netswap/v1 build/typecheck/netswap/v1
	ln -s ../../../common build/typecheck/netswap/common
	ln -s ../../../server build/typecheck/netswap/server
	ln -s ../../../client build/typecheck/netswap/client
	$(BIN)/mypy -p netswap
	$(BIN)/mypy tests $(wildcard bench/*.py)

check-genproto: $(VENV)/.dev-stamp
	PYTHON=$(BIN)/python scripts/genproto.sh --check

genproto: $(VENV)/.dev-stamp
	PYTHON=$(BIN)/python scripts/genproto.sh

pytest: $(VENV)/.dev-stamp
	$(BIN)/pytest -q

# Development CA, server certificate and client certificates (alice, bob) in var/certs.
certs: $(VENV)/.dev-stamp
	$(BIN)/netswap-server gen-dev-certs $(VAR)/certs --principal alice --principal bob

# The performance suite: one table, bench/results/results.{json,png}.
bench: $(VENV)/.dev-stamp debian-test-deps
	$(BIN)/pip install -q 'matplotlib==3.11.2' 'py-spy==0.4.3'
	$(BIN)/python bench/suite.py

clean:
	rm -rf build $(VENV) .mypy_cache .pytest_cache .ruff_cache
