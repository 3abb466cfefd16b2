"""Build iovirt and its Cython extensions.

``IOVIRT_NO_EXTENSIONS=1`` at build time builds no extension (pure Python).

The blk data path links liburing (Debian ``liburing-dev``) when its header
is found; without it the extension is built all the same and its block I/O
runs on a thread pool (``iovirt info`` says which engine runs).
"""

import os
from pathlib import Path

from setuptools import Extension, find_packages, setup

NO_EXTENSIONS = os.environ.get("IOVIRT_NO_EXTENSIONS", "") not in ("", "0")


def _liburing() -> dict[str, list]:
    """Build options for liburing if its header is there (``liburing-dev``), else none (the thread-pool engine)."""
    if not any(Path(d, "liburing.h").exists() for d in ("/usr/include", "/usr/local/include")):
        print("*** iovirt: liburing.h not found: blk I/O will run on a thread pool (apt-get install liburing-dev) ***")
        return {}
    return {"define_macros": [("IOVIRT_HAVE_LIBURING", "1")], "libraries": ["uring"]}


EXTENSIONS = [
    Extension("iovirt.virtio._queue_c", ["iovirt/virtio/_queue_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio._packed_c", ["iovirt/virtio/_packed_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio._dirtylog_c", ["iovirt/virtio/_dirtylog_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio._iotlb_c", ["iovirt/virtio/_iotlb_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.vtd._walk_c", ["iovirt/vtd/_walk_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.vtd._dma_c", ["iovirt/vtd/_dma_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio.net._datapath_c", ["iovirt/virtio/net/_datapath_c.pyx"], extra_compile_args=["-O3"]),
    Extension(
        "iovirt.virtio.blk._datapath_c", ["iovirt/virtio/blk/_datapath_c.pyx"], extra_compile_args=["-O3"], **_liburing()
    ),
    Extension("iovirt.virtio.scsi._datapath_c", ["iovirt/virtio/scsi/_datapath_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.bench._rawpath_c", ["iovirt/bench/_rawpath_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.vhost_user._handoff_c", ["iovirt/vhost_user/_handoff_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.vhost_user._kickloop_c", ["iovirt/vhost_user/_kickloop_c.pyx"], extra_compile_args=["-O3"]),
]

if NO_EXTENSIONS:
    print("*** iovirt: pure Python build (IOVIRT_NO_EXTENSIONS set) ***")
    ext_modules = []
else:
    from Cython.Build import cythonize

    # Every core translates and compiles: the wheel is built from the sdist in a fresh environment each time.
    ext_modules = cythonize(EXTENSIONS, language_level=3, nthreads=os.cpu_count() or 1)

setup(
    name="iovirt",
    version="0.1.0",
    description="I/O-virtualization device models: virtio rings, vhost-user, PCI, SR-IOV, VT-d, LAPIC timers",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["iovirt", "iovirt.*"]),
    package_data={"iovirt": ["**/*.pyx", "**/*.pxd", "conformance/*.json"]},
    python_requires=">=3.11",
    install_requires=["pyelftools", "scapy"],
    # build: the wheel-install test makes an sdist and a wheel; mypy: `make test` type-checks;
    # pytest-xdist: `make test` runs the fast suites on every core.
    extras_require={"test": ["pytest", "pytest-xdist", "hypothesis", "build", "mypy"]},
    ext_modules=ext_modules,
    options={"build_ext": {"parallel": os.cpu_count() or 1}},
    entry_points={
        "console_scripts": ["iovirt = iovirt.cli:main"],
        "pytest11": [
            "iovirt_bench = iovirt.bench.pytest_plugin",
            "iovirt_conformance = iovirt.conformance.pytest_plugin",
        ],
    },
)
