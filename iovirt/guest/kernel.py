"""The guest kernel: Debian's ``linux-image-amd64`` as installed under /boot.

The guest kernel is chosen from what is installed in ``/boot`` and
``/lib/modules``, never from ``uname -r``: that is the host's kernel, which
may be a different build (or a container host's) with no modules here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from iovirt.guest.errors import HostPartMissing

_VERSION_KEY = re.compile(r"\d+|\D+")


@dataclass(frozen=True)
class GuestKernel:
    """An installed kernel: its version, image and module tree."""

    version: str
    vmlinuz: Path
    modules_dir: Path


def _version_key(version: str) -> list[tuple[int, int | str]]:
    # Numeric parts compare as numbers so that 6.1.0-56 sorts after 6.1.0-9.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in _VERSION_KEY.findall(version)]


def find_kernel(version: str | None = None, boot_dir: Path = Path("/boot"),
                modules_root: Path = Path("/lib/modules")) -> GuestKernel:
    """Return the installed kernel ``version``, or the newest one that has both parts.

    ``IOVIRT_GUEST_KERNEL`` in the environment picks a version when none is
    given. Raises :class:`HostPartMissing` when no kernel has both a
    ``vmlinuz-<ver>`` image and a ``<modules_root>/<ver>`` tree.
    """
    version = version or os.environ.get("IOVIRT_GUEST_KERNEL") or None
    if version is None:
        candidates = [p.name[len("vmlinuz-"):] for p in boot_dir.glob("vmlinuz-*")]
        candidates = [v for v in candidates if (modules_root / v / "kernel").is_dir()]
        if not candidates:
            raise HostPartMissing("a kernel with modules", f"{boot_dir}/vmlinuz-* and {modules_root}/*",
                                  "Debian package linux-image-amd64")
        version = max(candidates, key=_version_key)
    vmlinuz = boot_dir / f"vmlinuz-{version}"
    modules_dir = modules_root / version
    if not vmlinuz.is_file():
        raise HostPartMissing("kernel image", str(vmlinuz), "Debian package linux-image-amd64")
    if not (modules_dir / "kernel").is_dir():
        raise HostPartMissing("kernel modules", str(modules_dir), "Debian package linux-image-amd64")
    return GuestKernel(version=version, vmlinuz=vmlinuz, modules_dir=modules_dir)
