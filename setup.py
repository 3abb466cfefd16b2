"""Build iovirt and its Cython extensions.

``IOVIRT_NO_EXTENSIONS=1`` at build time builds no extension (pure Python).
"""

import os

from setuptools import Extension, find_packages, setup

NO_EXTENSIONS = os.environ.get("IOVIRT_NO_EXTENSIONS", "") not in ("", "0")

EXTENSIONS = [
    Extension("iovirt.virtio._queue_c", ["iovirt/virtio/_queue_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio._iotlb_c", ["iovirt/virtio/_iotlb_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.vtd._walk_c", ["iovirt/vtd/_walk_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.vtd._dma_c", ["iovirt/vtd/_dma_c.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio.net._datapath", ["iovirt/virtio/net/_datapath.pyx"], extra_compile_args=["-O3"]),
    Extension("iovirt.virtio.blk._datapath", ["iovirt/virtio/blk/_datapath.pyx"], extra_compile_args=["-O3"]),
]

if NO_EXTENSIONS:
    print("*** iovirt: pure Python build (IOVIRT_NO_EXTENSIONS set) ***")
    ext_modules = []
else:
    from Cython.Build import cythonize

    ext_modules = cythonize(EXTENSIONS, language_level=3)

setup(
    name="iovirt",
    version="0.1.0",
    description="I/O-virtualization device models: virtio rings, vhost-user, PCI, SR-IOV, VT-d, LAPIC timers",
    packages=find_packages(include=["iovirt", "iovirt.*"]),
    package_data={"iovirt": ["**/*.pyx", "**/*.pxd"]},
    python_requires=">=3.11",
    install_requires=["pyelftools", "scapy"],
    extras_require={"test": ["pytest", "hypothesis"]},
    ext_modules=ext_modules,
    entry_points={
        "console_scripts": ["iovirt = iovirt.cli:main"],
        "pytest11": [
            "iovirt_bench = iovirt.bench.pytest_plugin",
            "iovirt_conformance = iovirt.conformance.pytest_plugin",
        ],
    },
)
