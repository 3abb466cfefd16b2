# iovirt: the two commands of the README's quick start are `make demo` and `make test`.
# Both install what they need on a fresh Debian 12 machine (apt-get as root, pip).

PYTHON ?= python3
# Debian packages the demo and the tests use: lspci (pciutils) decodes our config
# space, QEMU + Debian's kernel + busybox boot real guests, DPDK and
# qemu-storage-daemon are the peers we are measured against.
DEB_PACKAGES := pciutils qemu-system-x86 qemu-system-common qemu-utils qemu-block-extra linux-image-amd64 busybox-static dpdk-dev iproute2 kmod cpio util-linux

.PHONY: demo test deps install build bench clean

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

install: deps
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'

# Rebuild the Cython extension in place (after editing a .pyx).
build:
	$(PYTHON) setup.py build_ext --inplace

demo: install
	$(PYTHON) -m iovirt.demo

test: install
	IOVIRT_REQUIRE_EXTENSIONS=1 $(PYTHON) -m pytest -q -ra tests

bench: install
	for b in benchmarks/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

clean:
	rm -rf build *.egg-info iovirt/**/*.so iovirt/virtio/_queue_c.c
