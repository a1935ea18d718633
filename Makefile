# Every target sets up what it needs: a .venv with the project and its test extras.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo demo-qemu test lint typecheck unit bench clean qemu-deps pg-deps libvirt-deps

# The editable install is a plain path in a .pth file (editable_mode=compat), not
# setuptools' import finder, which costs every start of Python here ~12 ms (pathlib,
# importlib.util, fnmatch, re: jobctl's fast start needs none of them; bench_cli).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jobcore.demo $(DEMO_ARGS)

# The same demo on real QEMU processes and fresh qcow2 images.
demo-qemu: $(STAMP) qemu-deps
	$(BIN)/python -m jobcore.demo --qemu

# QEMU, and virtnbdbackup (with libnbd's Python binding, which it imports) for the drop-in
# libvirt module's tests, from Debian's packages, installed only when missing (tests never
# skip for lack of them).
qemu-deps:
	@command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null \
	  && command -v qemu-nbd >/dev/null && command -v virtnbdbackup >/dev/null \
	  && /usr/bin/python3 -c 'import nbd' 2>/dev/null || { \
	  echo "installing qemu-system-x86, qemu-utils, virtnbdbackup and python3-libnbd"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends qemu-system-x86 qemu-utils virtnbdbackup python3-libnbd; }

# PostgreSQL's server binaries (Debian's postgresql package; /usr/lib/postgresql/*/bin),
# installed only when missing: the tests start a private server of their own in a
# temporary directory (tests/pg_helpers.py), never the system service.
pg-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  && ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  echo "installing postgresql"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends postgresql; }

# A real libvirtd (Debian's monolithic daemon, its QEMU driver, virsh, libvirt-python for
# /usr/bin/python3) for the benchmarks only, which measure it beside jobcore in the same run
# (benchmarks/_libvirtd.py sets it up without systemd and cleans up after); installed only
# when missing. The tests never use it.
libvirt-deps: qemu-deps
	@command -v libvirtd >/dev/null && command -v virtlogd >/dev/null \
	  && command -v virsh >/dev/null && dpkg -s libvirt-daemon-driver-qemu >/dev/null 2>&1 \
	  && /usr/bin/python3 -c 'import libvirt' 2>/dev/null || { \
	  echo "installing libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients and python3-libvirt"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
	    python3-libvirt; }

lint: $(STAMP)
	$(BIN)/ruff check jobcore drivers tests benchmarks
	$(BIN)/ruff format --check jobcore drivers tests benchmarks
	$(BIN)/lint-imports --no-cache --no-logo  # the layering: [tool.importlinter] in pyproject.toml

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: $(STAMP) qemu-deps pg-deps lint typecheck unit

bench: $(STAMP) pg-deps libvirt-deps
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache *.egg-info
