"""Dumps in lspci -x format, decoded by the real lspci -F (pciutils).

``lspci -F`` decodes everything that is in config space.  BAR *sizes* are
not in config space (Linux reports them from sysfs), so lspci prints no
``[size=…]`` for a dump; sizes are checked here with the sizing protocol
instead.  lspci 3.9 also prints the upper half of a 64-bit BAR of a dump as
an extra ``<unassigned>`` region (real QEMU dumps show the same).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from iovirt.pci import ExtendedCapability, PciBridge, PcieCapability, PciePortType, PciHost
from iovirt.pci import cli
from iovirt.pci.firmware import ConfigAccessor, size_bar
from iovirt.pci.lspci import format_function, format_host, title
from iovirt.pci.topology import build_default_host, make_msix_endpoint

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="lspci (pciutils) is not installed")


def lspci(dump: str, tmp_path: Path, *args: str) -> str:
    path = tmp_path / "dump.txt"
    path.write_text(dump)
    result = subprocess.run(
        [LSPCI, *args, "-F", str(path)], capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout


def section(output: str, bdf: str) -> str:
    """The -v output block of one function."""
    blocks = output.split("\n\n")
    return next(b for b in blocks if b.startswith(bdf))


@pytest.fixture(scope="module")
def host() -> PciHost:
    return build_default_host()


def test_dump_format(host: PciHost) -> None:
    fn = host.root_bus.function(2, 0)
    assert fn is not None
    text = format_function(fn, 4)
    lines = text.split("\n")
    assert lines[0] == "00:02.0 Unclassified device [00ff]: Red Hat, Inc. QEMU PCI Test Device (rev 02)"
    assert lines[1] == "00: 36 1b 05 00 06 00 10 00 02 00 ff 00 00 00 80 00"
    assert len(lines) == 1 + 256 + 2 and lines[-2:] == ["", ""]
    assert lines[256].startswith("ff0: ")
    assert all(re.fullmatch(r"[0-9a-f]{2,3}:( [0-9a-f]{2}){16}", line) for line in lines[1:257])
    assert format_function(fn, 1).count("\n") == 1 + 4 + 1
    assert format_function(fn, 3).count("\n") == 1 + 16 + 1
    conventional = host.find_function(1, 0, 0)
    assert conventional is not None
    assert format_function(conventional, 4).count("\n") == 1 + 16 + 1
    assert format_function(fn, 0) == lines[0] + "\n"


@needs_lspci
def test_titles_match_lspci(host: PciHost, tmp_path: Path) -> None:
    out = lspci(format_host(host, 3), tmp_path)
    expected = [title(f) for f in sorted(host.root_bus.walk(), key=lambda f: f.requester_id)]
    assert out.splitlines() == expected


@needs_lspci
def test_ids_decoded(host: PciHost, tmp_path: Path) -> None:
    out = lspci(format_host(host, 4), tmp_path, "-n")
    assert out.splitlines() == [
        "00:00.0 0600: 1b36:0008",
        "00:01.0 0604: 1b36:0001",
        "00:02.0 00ff: 1b36:0005 (rev 02)",
        "00:02.1 00ff: 1b36:0005 (rev 02)",
        "01:00.0 00ff: 1b36:0005 (rev 01)",
    ]


@needs_lspci
def test_bridge_decoded(host: PciHost, tmp_path: Path) -> None:
    out = section(lspci(format_host(host, 4), tmp_path, "-vvv"), "00:01.0")
    assert "PCI bridge: Red Hat, Inc. QEMU PCI-PCI bridge (prog-if 00 [Normal decode])" in out
    assert "Bus: primary=00, secondary=01, subordinate=01, sec-latency=0" in out
    assert "I/O behind bridge: c000-cfff [size=4K]" in out
    assert "Memory behind bridge: c0000000-c00fffff [size=1M]" in out
    assert "Prefetchable memory behind bridge: 00000000fff00000-00000000000fffff [disabled]" in out
    assert "Control: I/O+ Mem+ BusMaster+" in out


@needs_lspci
def test_conventional_endpoint_decoded(host: PciHost, tmp_path: Path) -> None:
    out = section(lspci(format_host(host, 4), tmp_path, "-vvv"), "01:00.0")
    assert "Subsystem: Red Hat, Inc. QEMU PCI Test Device" in out
    assert "Region 0: Memory at c0000000 (32-bit, non-prefetchable)\n" in out
    assert "Region 1: I/O ports at c000\n" in out
    assert "Expansion ROM at c0010000 [disabled]" in out
    assert "Interrupt: pin A routed to IRQ 0" in out
    assert "Capabilities: [40] MSI: Enable- Count=1/4 Maskable+ 64bit+" in out
    assert "Masking: 00000000  Pending: 00000000" in out
    assert "Express" not in out


def test_bar_sizes_by_sizing_protocol(host: PciHost) -> None:
    sizes = {}
    for bus, dev, fn, reg in [(1, 0, 0, 0x10), (1, 0, 0, 0x14), (0, 2, 0, 0x10), (0, 2, 0, 0x18)]:
        size, flags, _ = size_bar(ConfigAccessor(host, bus, dev, fn), reg)
        sizes[(bus, dev, fn, reg)] = (size, flags)
    assert sizes == {
        (1, 0, 0, 0x10): (0x1000, 0x0),
        (1, 0, 0, 0x14): (32, 0x1),
        (0, 2, 0, 0x10): (0x4000, 0x0),
        (0, 2, 0, 0x18): (0x100000, 0xC),
    }


@needs_lspci
def test_pcie_msix_endpoint_decoded(host: PciHost, tmp_path: Path) -> None:
    out = section(lspci(format_host(host, 4), tmp_path, "-vvv"), "00:02.0")
    assert "Region 0: Memory at c0100000 (32-bit, non-prefetchable)\n" in out
    assert "Region 2: Memory at 8000000000 (64-bit, prefetchable)\n" in out
    assert "Capabilities: [40] Power Management version 3" in out
    assert "Status: D0 NoSoftRst+ PME-Enable-" in out
    assert "Capabilities: [48] Express (v2) Endpoint, MSI 00" in out
    assert "RBE+ FLReset+" in out
    assert "MaxPayload 128 bytes, MaxReadReq 512 bytes" in out
    assert "LnkCap:\tPort #0, Speed 2.5GT/s, Width x1" in out
    assert "LnkSta:\tSpeed 2.5GT/s, Width x1" in out
    assert "Capabilities: [84] MSI-X: Enable- Count=8 Masked-" in out
    assert "Vector table: BAR=0 offset=00000000" in out
    assert "PBA: BAR=0 offset=00002000" in out
    assert "Capabilities: [100 v1] Vendor Specific Information: ID=0001 Rev=1 Len=00c" in out
    second = section(lspci(format_host(host, 4), tmp_path, "-vvv"), "00:02.1")
    assert "MSI-X: Enable- Count=4 Masked-" in second


@needs_lspci
def test_dump_levels_limit_what_lspci_sees(host: PciHost, tmp_path: Path) -> None:
    fn = host.root_bus.function(2, 0)
    assert fn is not None
    assert "Capabilities: <access denied>" in lspci(format_function(fn, 1), tmp_path, "-vvv")
    at256 = lspci(format_function(fn, 3), tmp_path, "-vvv")
    assert "MSI-X" in at256 and "[100 v1]" not in at256


@needs_lspci
def test_msix_state_seen_by_lspci(tmp_path: Path) -> None:
    host = PciHost()
    fn = make_msix_endpoint()
    host.root_bus.add_function(fn, 3)
    msix = fn.msix
    assert msix is not None
    fn.config_write(msix.offset + 3, 1, 0xC0)
    out = lspci(format_function(fn, 4), tmp_path, "-vvv")
    assert "MSI-X: Enable+ Count=8 Masked+" in out


@needs_lspci
def test_root_port_and_extended_sriov_capability(tmp_path: Path) -> None:
    host = PciHost()
    port = PciBridge(0x1B36, 0x000C, pcie=True)
    port.add_capability(PcieCapability(PciePortType.ROOT_PORT, slot=True, port_number=1))
    host.root_bus.add_function(port, 1)
    fn = make_msix_endpoint()
    # A raw SR-IOV capability (ID 0x10) through the generic extended-capability seam:
    # TotalVFs = InitialVFs = 4, First VF Offset 1, Stride 1, VF Device ID 0x0006.
    sriov = bytearray(0x3C)
    sriov[0x08:0x0A] = (4).to_bytes(2, "little")  # InitialVFs (at cap+0x0C)
    sriov[0x0A:0x0C] = (4).to_bytes(2, "little")  # TotalVFs
    sriov[0x10:0x12] = (1).to_bytes(2, "little")  # First VF Offset
    sriov[0x12:0x14] = (1).to_bytes(2, "little")  # VF Stride
    sriov[0x16:0x18] = (6).to_bytes(2, "little")  # VF Device ID
    sriov[0x18:0x1C] = (0x553).to_bytes(4, "little")  # Supported Page Sizes
    fn.add_extended_capability(ExtendedCapability(0x10, 1, bytes(sriov)))
    port.secondary_bus.add_function(fn, 0)
    port.config_write(0x18, 4, 0x00_01_01_00)
    out = lspci(format_host(host, 4), tmp_path, "-vvv")
    root = section(out, "00:01.0")
    assert "Express (v2) Root Port (Slot+), MSI 00" in root
    assert "LnkSta:\tSpeed 2.5GT/s, Width x1" in root and "DLActive+" in root
    assert "RootCtl:" in root
    ep = section(out, "01:00.0")
    assert "Capabilities: [100 v1] Vendor Specific Information" in ep
    assert "Capabilities: [10c v1] Single Root I/O Virtualization (SR-IOV)" in ep
    assert "Initial VFs: 4, Total VFs: 4" in ep
    assert "VF offset: 1, stride: 1, Device ID: 0006" in ep
    assert "Supported Page Size: 00000553" in ep


@needs_lspci
def test_cli_output_decodes(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="iovirt")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["lspci", "-xxxx"])
    assert args.hex == 4
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    decoded = subprocess.run(
        [LSPCI, "-vvv", "-F", "/dev/stdin"], input=out.getvalue(), capture_output=True,
        text=True, check=True, timeout=30,
    ).stdout
    assert decoded.count("MSI-X: Enable- Count=") == 4
    assert "00:01.0 PCI bridge" in decoded
    plain = parser.parse_args(["lspci"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        plain.func(plain)
    assert out.getvalue().splitlines()[0] == "00:00.0 Host bridge: Red Hat, Inc. QEMU PCIe Host bridge"
