# iovirt: the two commands of the README's quick start are `make demo` and `make test`.
# Both install what they need on a fresh Debian 12 machine (apt-get as root, pip).

PYTHON ?= python3
# Debian packages the demo and the tests use: lspci (pciutils) decodes our config
# space, QEMU + Debian's kernel + busybox boot real guests, DPDK and
# qemu-storage-daemon are the peers we are measured against; gcc and python3-dev
# compile the Cython extensions (liburing-dev: the blk data path's io_uring), python3-venv gives the wheel-install test its venv, socat (with its
# libraries) goes into the vsock guest's initramfs, tcpdump and tshark read the pcapng files the bench writes.
BENCH_PACKAGES := openvswitch-switch-dpdk
DEB_PACKAGES := gcc python3-dev liburing-dev python3-venv pciutils qemu-system-x86 qemu-system-common qemu-utils qemu-block-extra linux-image-amd64 busybox-static dpdk-dev iproute2 kmod cpio util-linux socat tcpdump tshark

.PHONY: demo test test-extensions test-slow test-pure typecheck deps bench-deps install build bench fuzz clean
# The test steps run one after another, in the order `test` lists them.
.NOTPARALLEL:

# apt-get installs whichever of $(1) are missing (apt-get update first).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt_install,$(DEB_PACKAGES))

# Only the benchmarks need Open vSwitch with DPDK (the port-to-port peer in benchmarks/vhost_user.py).
bench-deps:
	$(call apt_install,$(BENCH_PACKAGES))

install: deps
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'

# Rebuild the Cython extensions in place (after editing a .pyx).
build:
	$(PYTHON) setup.py build_ext --inplace

demo: install
	$(PYTHON) -m iovirt.demo

# Every step runs (-k) so one report shows them all; any failure fails `make test`.
test: install
	$(MAKE) --no-print-directory -k test-extensions test-slow test-pure typecheck

# The fast suites run on one pytest-xdist worker per core, each test file whole on one worker (its
# module fixtures built once).  The slow tests (real guests under TCG, peers, the wheel build) run one
# at a time: each already keeps the cores busy, and their timings assume so.
TEST_JOBS ?= $(shell nproc)
FAST := -m "not slow" -n $(TEST_JOBS) --dist loadfile

# The fast suite on the compiled extensions; a missing extension is an import error, not a fallback.
test-extensions:
	IOVIRT_REQUIRE_EXTENSIONS=1 $(PYTHON) -m pytest -q -ra $(FAST) tests

# The slow suite (real guests, external peers, the wheel install), on the compiled extensions.
test-slow:
	IOVIRT_REQUIRE_EXTENSIONS=1 $(PYTHON) -m pytest -q -ra -m slow tests

# The fast suite again on the pure-Python twins.
test-pure:
	IOVIRT_NO_EXTENSIONS=1 $(PYTHON) -m pytest -q -ra $(FAST) tests

typecheck:
	$(PYTHON) -m mypy iovirt

bench: install bench-deps
	for b in benchmarks/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

# The long fuzz campaign (tests/fuzz/, issue 12): protocol messages, then descriptor chains, against a real
# `iovirt serve`; the last line is JSON (messages/s, chains/s, crashes, hangs, tracebacks, drift).
# Knobs: FUZZ_MESSAGES, FUZZ_CHAINS (default 10 M each), FUZZ_SEED, FUZZ_WORKERS, FUZZ_SECONDS, FUZZ_WORKDIR.
# On 2 cores each half takes about 4-10 minutes (benchmarks/RESULTS.md, "Fuzzing").
fuzz: build
	PYTHONPATH=$(CURDIR) $(PYTHON) tests/fuzz/campaign.py

# The extensions and the C files Cython generated from each .pyx.
clean:
	rm -rf build dist *.egg-info
	find iovirt -name '*.so' -delete
	find iovirt -name '*.pyx' | while read -r pyx; do rm -f "$${pyx%.pyx}.c"; done
