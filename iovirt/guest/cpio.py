"""A writer for the cpio "newc" format, the one the kernel unpacks as initramfs.

Format: Documentation/driver-api/early-userspace/buffer-format.rst in the
kernel tree. Each entry is the magic ``070701``, thirteen 8-digit hex
fields, the NUL-terminated name padded to a 4-byte boundary, then the data
padded likewise; ``TRAILER!!!`` ends the archive. Archives may be
concatenated (the kernel unpacks each in turn), which is how a per-guest
script is laid over a cached base image.
"""

from __future__ import annotations

import stat

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Builds a newc archive in memory; entries get fixed owner (root) and mtime (0)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.lstrip("/").encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._chunks += [header, encoded, _pad4(len(header) + len(encoded)), data, _pad4(len(data))]
        self._ino += 1

    def directory(self, name: str, perm: int = 0o755) -> None:
        """Add a directory (its parents must be added first)."""
        self._entry(name, stat.S_IFDIR | perm, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file with contents ``data``."""
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        """Add a symbolic link ``name`` -> ``target``."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node (the kernel's unpacker mknods it; no root needed here)."""
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        """Append the trailer and return the archive."""
        self._entry(_TRAILER, 0, nlink=1)
        return b"".join(self._chunks)
