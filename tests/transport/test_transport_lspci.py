"""The virtio-net and virtio-blk functions dumped in lspci -xxxx format and decoded by the real lspci -F.

BAR sizes are not in a dump (lspci takes them from sysfs), so they are checked
with the sizing protocol; lspci 3.9 prints the upper half of a 64-bit BAR of a
dump as an extra ``<unassigned>`` region.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
from pathlib import Path

import pytest

from iovirt.pci import cli, walk_capabilities, walk_extended_capabilities
from iovirt.pci.firmware import ConfigAccessor, size_bar
from iovirt.pci.lspci import format_function

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="lspci (pciutils) is not installed")


def decode(text: str, tmp_path: Path) -> str:
    path = tmp_path / "dump.txt"
    path.write_text(text)
    return subprocess.run(
        [LSPCI, "-vvv", "-F", str(path)], capture_output=True, text=True, check=True, timeout=30
    ).stdout


@needs_lspci
@pytest.mark.parametrize(
    "which, title, msix_count",
    [
        ("net", "00:03.0 Ethernet controller: Red Hat, Inc. Virtio 1.0 network device (rev 01)", 3),
        ("blk", "00:04.0 SCSI storage controller: Red Hat, Inc. Virtio 1.0 block device (rev 01)", 2),
    ],
)
def test_virtio_function_decoded(rig, tmp_path, which, title, msix_count):
    fn = getattr(rig, which)
    out = decode(format_function(fn, 4), tmp_path)
    assert out.splitlines()[0] == title
    assert "Subsystem: Red Hat, Inc." in out
    assert "Control: I/O- Mem+ BusMaster+" in out
    assert "Interrupt: pin A" in out
    msix_bar = fn.bars[1].address
    virtio_bar = fn.bars[4].address
    assert f"Region 1: Memory at {msix_bar:x} (32-bit, non-prefetchable)" in out
    assert f"Region 4: Memory at {virtio_bar:x} (64-bit, prefetchable)" in out
    assert "Region 0:" not in out and "Region 2:" not in out and "Expansion ROM" not in out
    caps = walk_capabilities(fn.config_read)
    assert [c for c, _ in caps] == [0x10, 0x11, 0x09, 0x09, 0x09, 0x09, 0x09]
    at = dict((c, o) for c, o in caps)
    assert f"Capabilities: [{at[0x10]:x}] Express (v2) Endpoint, MSI 00" in out
    assert "DevCap:\tMaxPayload 128 bytes" in out and "FLReset+" in out
    assert "LnkSta:\tSpeed 2.5GT/s, Width x1" in out
    assert f"Capabilities: [{at[0x11]:x}] MSI-X: Enable- Count={msix_count} Masked-" in out
    assert "Vector table: BAR=1 offset=00000000" in out and "PBA: BAR=1 offset=00000800" in out
    vendor = [o for c, o in caps if c == 0x09]
    expected = [
        ("CommonCfg", "BAR=4 offset=00000000 size=0000003c"),
        ("Notify", "BAR=4 offset=00003000 size=00001000 multiplier=00000004"),
        ("ISR", "BAR=4 offset=00001000 size=00000001"),
        ("DeviceCfg", "BAR=4 offset=00002000 size=00001000"),
        ("<unknown>", "BAR=0 offset=00000000 size=00000000"),  # PCI_CFG (type 5): pciutils has no name
    ]
    for offset, (name, where) in zip(vendor, expected):
        assert f"Capabilities: [{offset:x}] Vendor Specific Information: VirtIO: {name}\n\t\t{where}" in out
    # PCI Express function with an empty extended list.
    assert walk_extended_capabilities(fn.config_read) == []


def test_bar_sizes_by_sizing_protocol(rig):
    rid = rig.net.requester_id
    cfg = ConfigAccessor(rig.host, rid >> 8, rid >> 3 & 0x1F, rid & 7)
    assert size_bar(cfg, 0x14)[:1] == (0x1000,)
    size, flags, used = size_bar(cfg, 0x20)
    assert (size, flags & 0xC, used) == (0x4000, 0xC, 2)
    assert size_bar(cfg, 0x10)[0] == 0 and size_bar(cfg, 0x18)[0] == 0


@needs_lspci
def test_cli_lists_virtio_functions(tmp_path):
    parser = argparse.ArgumentParser(prog="iovirt")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["lspci", "-xxxx"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    decoded = decode(out.getvalue(), tmp_path)
    assert "00:03.0 Ethernet controller: Red Hat, Inc. Virtio 1.0 network device (rev 01)" in decoded
    assert "00:04.0 SCSI storage controller: Red Hat, Inc. Virtio 1.0 block device (rev 01)" in decoded
    assert decoded.count("VirtIO: CommonCfg") == 2 and decoded.count("MSI-X: Enable- Count=") == 4
    assert "00:01.0 PCI bridge" in decoded and "01:00.0" in decoded
