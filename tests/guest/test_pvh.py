"""The guest kernel unpacked for QEMU's PVH boot (iovirt/guest/pvh.py), without booting.

The boot itself is what every real-guest test does; here: the payload is
found through the setup header, each codec round-trips, the installed
Debian kernel unpacks to an ELF that QEMU will enter through PVH, and an
image that cannot be unpacked falls back to the bzImage.
"""

from __future__ import annotations

import bz2
import gzip
import lzma

import pytest

from iovirt.guest import find_kernel
from iovirt.guest.kernel import GuestKernel
from iovirt.guest.guest import Guest
from iovirt.guest.pvh import (
    XEN_ELFNOTE_PHYS32_ENTRY,
    NotUnpackable,
    boot_image,
    decompress,
    has_pvh_entry,
    payload,
    unpack,
)

KERNEL = find_kernel()


def _bzimage(body: bytes, setup_sects: int = 1, version: int = 0x020F, magic: bytes = b"HdrS") -> bytes:
    """A minimal bzImage: the setup sectors with their header, then ``body`` as the whole payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = magic
    setup[0x206:0x208] = version.to_bytes(2, "little")
    setup[0x248:0x24C] = (16).to_bytes(4, "little")  # the payload after 16 bytes of decompressor
    setup[0x24C:0x250] = len(body).to_bytes(4, "little")
    return bytes(setup) + bytes(16) + body


@pytest.mark.parametrize("codec", [lzma.compress, gzip.compress, bz2.compress,
                                   lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)],
                         ids=["xz", "gzip", "bzip2", "lzma"])
def test_each_codec_round_trips_through_the_setup_header(codec):
    data = bytes(range(256)) * 64
    assert decompress(payload(_bzimage(codec(data)))) == data


def test_setup_sects_zero_means_four():
    image = bytearray(_bzimage(b"\x1f\x8bxx", setup_sects=4))
    image[0x1F1] = 0
    assert payload(bytes(image)) == b"\x1f\x8bxx"


@pytest.mark.parametrize("image, why", [
    (_bzimage(b"x", magic=b"NoPe"), "no HdrS"),
    (_bzimage(b"x", version=0x0207), "boot protocol 2.7"),
    (_bzimage(b"x")[:-1], "outside"),
    (b"", "no HdrS"),
])
def test_a_bad_setup_header_is_not_unpackable(image, why):
    with pytest.raises(NotUnpackable, match=why):
        payload(image)


@pytest.mark.parametrize("data, why", [
    (b"\x28\xb5\x2f\xfd zstd", "only xz, gzip, bzip2, lzma"),
    (b"\xfd7zXZ\x00 truncated", "corrupt payload"),
    (b"\x1f\x8b\x08\x00 truncated", "corrupt payload"),
])
def test_an_unknown_or_corrupt_payload_is_not_unpackable(data, why):
    with pytest.raises(NotUnpackable, match=why):
        decompress(data)


def test_a_payload_that_is_no_pvh_elf_is_refused():
    with pytest.raises(NotUnpackable, match="no PVH entry note"):
        unpack(_bzimage(lzma.compress(b"\x7fELF" + bytes(60))))
    assert not has_pvh_entry(b"not an elf")


def test_the_debian_kernel_unpacks_to_an_elf_with_the_pvh_note(tmp_path, monkeypatch):
    monkeypatch.setenv("IOVIRT_CACHE_DIR", str(tmp_path))
    path = boot_image(KERNEL)
    assert path.parent == tmp_path and path.read_bytes()[:4] == b"\x7fELF"
    assert has_pvh_entry(path.read_bytes()), f"no note of type {XEN_ELFNOTE_PHYS32_ENTRY}"
    assert boot_image(KERNEL) == path  # cached: the same file, not unpacked again
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_a_kernel_that_cannot_be_unpacked_boots_as_the_bzimage(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("IOVIRT_CACHE_DIR", str(tmp_path / "cache"))
    vmlinuz = tmp_path / "vmlinuz-x"
    vmlinuz.write_bytes(_bzimage(b"\x28\xb5\x2f\xfd zstd"))
    kernel = GuestKernel(version="x", vmlinuz=vmlinuz, modules_dir=KERNEL.modules_dir)
    with caplog.at_level("INFO", logger="iovirt.guest.pvh"):
        assert boot_image(kernel) == vmlinuz
    assert "boots as a bzImage" in caplog.text and "only xz, gzip, bzip2, lzma" in caplog.text
    caplog.clear()
    assert boot_image(kernel) == vmlinuz  # remembered: not read again
    assert caplog.text == ""


def test_a_guest_loads_the_unpacked_kernel(tmp_path):
    with Guest(tmp_path, script="exit 0") as g:
        g.start()
        g.wait_result(timeout=120)
    command = (tmp_path / "guest-qemu.cmd").read_text()
    assert f"-kernel {g.machine.boot_image}" in command and g.machine.boot_image != KERNEL.vmlinuz
