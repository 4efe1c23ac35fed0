# ringfence: the two set-up commands are `make demo` and `make test`. Both build everything
# they need from a fresh clone: Debian packages (when missing, as root), .venv, the project.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_STAMP := .venv/.installed
DEB_PACKAGES := nftables iptables conntrack iproute2 procps chromium
DEB_BINARIES := nft iptables-restore conntrack ip ps chromium

.PHONY: deb-check setup demo test check proto proto-check mypy lint-imports bench clean
.PHONY: package package-deb-check FORCE

setup: $(VENV_STAMP) package-deb-check

# Debian packages the isolation backends, namespace tests and browser tests (chromium) need.
# Installed only when one of their binaries is missing and we are root; otherwise say what is
# missing and go on (the tests that need them skip outside CI and fail inside it).
deb-check:
	@missing=""; for b in $(DEB_BINARIES); do command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian packages for:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PACKAGES)) >/dev/null; \
	  else echo "warning: missing$$missing (run as root to install $(DEB_PACKAGES))"; fi; fi

$(VENV_STAMP): pyproject.toml | deb-check
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip install -q --upgrade pip 2>/dev/null
	@$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c "import grpc, cryptography, psutil, watchdog, scapy"
	@touch $(VENV_STAMP)

# Tools `make package` and its tests need (lintian, patchelf, systemd-analyze, dpkg-deb);
# pyinstaller comes with the dev extras. Installed like deb-check: only when missing, as root.
PACKAGING_DEB_PACKAGES := lintian patchelf systemd dpkg-dev
PACKAGING_BINARIES := lintian patchelf systemd-analyze dpkg-deb
package-deb-check:
	@missing=""; for b in $(PACKAGING_BINARIES); do command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing Debian packages for:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(PACKAGING_DEB_PACKAGES)) >/dev/null; \
	  else echo "warning: missing$$missing (run as root to install $(PACKAGING_DEB_PACKAGES))"; fi; fi

# Release artifacts in dist/ (one-file agent, .debs, signatures, SHA256SUMS); rebuilt only when
# a source changed or RELEASE_KEY is given. Without RELEASE_KEY a development key is generated
# into build/release-key/ and its path printed.
PACKAGE_SOURCES := $(shell git ls-files agent isolation evidence proto server collector packaging docs/deployment.md pyproject.toml 2>/dev/null)
package: dist/SHA256SUMS

dist/SHA256SUMS: $(PACKAGE_SOURCES) $(if $(RELEASE_KEY),FORCE) | $(VENV_STAMP) package-deb-check
	$(PY) packaging/build.py --dist dist $(if $(RELEASE_KEY),--release-key $(RELEASE_KEY))

FORCE:

proto: setup
	PATH=$(CURDIR)/.venv/bin:$$PATH $(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
	  --mypy_out=. --mypy_grpc_out=. proto/ringfence.proto

mypy: setup
	$(PY) -m mypy

lint-imports: setup
	.venv/bin/lint-imports

test: setup mypy
	$(PY) -m pytest -q

demo: setup
	$(PY) -m server.demo

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf .venv .pytest_cache .mypy_cache build dist .demo
