"""Host programs in the guest: a dynamically linked Debian binary and its libraries as initramfs files.

The base image is busybox only.  A test that needs a program busybox lacks
(``socat`` for AF_VSOCK streams) takes the host's binary with the libraries
``ldd`` names into the script overlay (:func:`iovirt.guest.initramfs.script_overlay`):
everything goes into ``/lib`` (the base image has no ``/lib64``), and
``/bin/NAME`` is a wrapper that runs the binary through the dynamic loader
with ``--library-path /lib``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from iovirt.guest.errors import HostPartMissing

_LDD_PATH = re.compile(r"(/\S+) \(0x[0-9a-f]+\)$")


def program_files(name: str, package: str) -> dict[str, bytes]:
    """Initramfs files (path -> bytes) that make the host's ``name`` runnable as ``/bin/name`` in the guest."""
    binary = shutil.which(name)
    if binary is None:
        raise HostPartMissing(name, name, f"Debian package {package}")
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    files: dict[str, bytes] = {}
    loader = ""
    for line in out.splitlines():
        match = _LDD_PATH.search(line.strip())
        if match is None:
            continue  # linux-vdso: not a file
        lib = Path(match.group(1))
        files[f"lib/{lib.name}"] = lib.read_bytes()
        if lib.name.startswith("ld-linux"):
            loader = lib.name
    if not loader:
        raise HostPartMissing(name, binary, "a dynamically linked binary (ldd names no loader)")
    files[f"lib/{name}.bin"] = Path(binary).read_bytes()
    files[f"bin/{name}"] = f'#!/bin/sh\nexec /lib/{loader} --library-path /lib /lib/{name}.bin "$@"\n'.encode()
    return files
