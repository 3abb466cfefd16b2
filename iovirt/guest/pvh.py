"""The guest kernel unpacked once, so QEMU boots it through its PVH entry point.

Booting Debian's ``vmlinuz`` (a bzImage) under TCG spends about 6 s before
the kernel prints its first line: the firmware's real-mode setup and the
kernel decompressing itself, all emulated.  The same kernel as an ELF
``vmlinux`` with a PVH entry note is loaded by QEMU straight into guest
memory and entered in 32-bit protected mode (the "x86/HVM direct boot ABI"
of Xen's ``arch-x86/hvm/start_info.h``, which QEMU's ``-kernel`` follows for
an ELF kernel with that note): the first line comes after about 0.8 s.

The payload is taken from the bzImage's setup header (``payload_offset``
and ``payload_length``, boot protocol 2.08, Linux's
``Documentation/x86/boot.rst``) and decompressed with Python's own
codecs.  A kernel this cannot unpack (another codec, an older boot
protocol) or without the PVH note is booted as the bzImage, as before.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import logging
import lzma
import zlib
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from iovirt.guest.initramfs import cache_dir, file_identity, write_cached
from iovirt.guest.kernel import GuestKernel

log = logging.getLogger(__name__)

# Linux boot protocol (Documentation/x86/boot.rst, "The real-mode kernel header").
_SETUP_SECTS = 0x1F1
_HEADER_MAGIC_AT = 0x202
_HEADER_MAGIC = b"HdrS"
_VERSION_AT = 0x206
_PAYLOAD_AT = 0x248  # payload_offset, then payload_length (u32 each); protocol 2.08 and later
_PAYLOAD_PROTOCOL = 0x0208
_SECTOR = 512

# Xen's public/elfnote.h: the 32-bit entry point of a PVH kernel, in a note named "Xen".
XEN_ELFNOTE_PHYS32_ENTRY = 18

# Bumped when what is written to the cache changes.
_FORMAT = b"iovirt-pvh-1"


class NotUnpackable(Exception):
    """The image is not a bzImage whose payload this module can decompress."""


def payload(image: bytes) -> bytes:
    """The compressed kernel inside bzImage ``image``; :class:`NotUnpackable` if there is none."""
    if image[_HEADER_MAGIC_AT:_HEADER_MAGIC_AT + 4] != _HEADER_MAGIC:
        raise NotUnpackable("no HdrS setup header")
    version = int.from_bytes(image[_VERSION_AT:_VERSION_AT + 2], "little")
    if version < _PAYLOAD_PROTOCOL:
        raise NotUnpackable(f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields")
    setup_sects = image[_SETUP_SECTS] or 4  # 0 means 4, for compatibility with old kernels
    start = (setup_sects + 1) * _SECTOR + int.from_bytes(image[_PAYLOAD_AT:_PAYLOAD_AT + 4], "little")
    length = int.from_bytes(image[_PAYLOAD_AT + 4:_PAYLOAD_AT + 8], "little")
    if not length or start + length > len(image):
        raise NotUnpackable(f"payload {start}+{length} outside the {len(image)}-byte image")
    return image[start:start + length]


def decompress(data: bytes) -> bytes:
    """``data`` decompressed by its magic: xz, gzip, bzip2 or LZMA; :class:`NotUnpackable` for the others.

    A stream that ends early is refused too: the kernel would be cut short.
    """
    decompressor: Any
    if data.startswith(b"\xfd7zXZ\x00"):
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif data.startswith(b"\x1f\x8b"):
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif data.startswith(b"BZh"):
        decompressor = bz2.BZ2Decompressor()
    elif data.startswith(b"\x5d\x00"):
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    else:
        raise NotUnpackable(f"payload codec with magic {data[:4].hex()} (only xz, gzip, bzip2, lzma)")
    try:
        out = decompressor.decompress(data)
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
        raise NotUnpackable(f"corrupt payload: {exc}") from exc
    if not decompressor.eof:
        raise NotUnpackable("corrupt payload: the stream ends early")
    return out


def has_pvh_entry(elf: bytes) -> bool:
    """Whether ELF image ``elf`` carries a ``XEN_ELFNOTE_PHYS32_ENTRY`` note (QEMU boots it through PVH)."""
    try:
        for segment in ELFFile(io.BytesIO(elf)).iter_segments():
            if not isinstance(segment, NoteSegment):
                continue
            for note in segment.iter_notes():
                if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
    except ELFError:
        return False
    return False


def unpack(image: bytes) -> bytes:
    """The PVH-bootable ELF inside bzImage ``image``; :class:`NotUnpackable` if it has none."""
    elf = decompress(payload(image))
    if not has_pvh_entry(elf):
        raise NotUnpackable("the kernel has no PVH entry note (CONFIG_PVH)")
    return elf


def boot_image(kernel: GuestKernel) -> Path:
    """What QEMU's ``-kernel`` should load: the cached unpacked ELF, or ``kernel.vmlinuz`` if it has none.

    The ELF is written once per kernel file (keyed by its path, size and
    mtime) under :func:`iovirt.guest.initramfs.cache_dir`
    (:func:`iovirt.guest.initramfs.write_cached`).
    """
    key = hashlib.sha256(_FORMAT + file_identity(kernel.vmlinuz)).hexdigest()[:16]
    path = cache_dir() / f"vmlinux-{kernel.version}-{key}"
    refused = path.with_name(path.name + ".bzimage-only")
    if path.exists():
        return path
    if refused.exists():
        return kernel.vmlinuz
    try:
        elf = unpack(kernel.vmlinuz.read_bytes())
    except NotUnpackable as exc:
        log.info("%s boots as a bzImage (slower under TCG): %s", kernel.vmlinuz, exc)
        write_cached(refused, f"{exc}\n".encode())
        return kernel.vmlinuz
    write_cached(path, elf)
    return path
