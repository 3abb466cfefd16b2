"""The PF's SR-IOV capability as the real ``lspci -vvv -F`` (pciutils) decodes it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from iovirt.sriov import SriovLayoutError
from iovirt.sriov.lspci import sriov_dump
from iovirt.sriov.machine import VF_BAR_WINDOW

LSPCI = shutil.which("lspci")
needs_lspci = pytest.mark.skipif(LSPCI is None, reason="lspci (pciutils) is not installed")


def lspci(dump: str, tmp_path: Path, *args: str) -> str:
    path = tmp_path / "dump.txt"
    path.write_text(dump)
    result = subprocess.run([LSPCI, *args, "-F", str(path)], capture_output=True, text=True, check=True, timeout=30)
    return result.stdout


def block(output: str, bdf: str) -> str:
    return next(b for b in output.split("\n\n") if b.startswith(bdf))


@needs_lspci
@pytest.mark.parametrize("num_vfs", [1, 7])
def test_lspci_decodes_the_pf_sriov_capability(tmp_path, num_vfs) -> None:
    dump = sriov_dump(num_vfs)
    pf = block(lspci(dump, tmp_path, "-vvv"), "00:03.0")
    sriov = pf[pf.index("Single Root I/O Virtualization (SR-IOV)") :]
    assert "IOVCtl:\tEnable+ Migration- Interrupt- MSE+ ARIHierarchy-" in sriov
    assert f"Initial VFs: 16, Total VFs: 16, Number of VFs: {num_vfs}, Function Dependency Link: 00" in sriov
    assert "VF offset: 8, stride: 1, Device ID: 1041" in sriov
    assert "Supported Page Size: 00000553, System Page Size: 00000001" in sriov
    # The VF BARs the PCI core assigned: VF BAR1 (MSI-X, 32-bit), VF BAR4 (virtio structures, 64-bit).
    base = VF_BAR_WINDOW[0]
    assert f"Region 1: Memory at {base:08x} (32-bit, non-prefetchable)" in sriov
    assert f"Region 4: Memory at {base + 16 * 0x1000:016x} (64-bit, prefetchable)" in sriov


@needs_lspci
def test_lspci_lists_every_vf_with_raw_ids(tmp_path) -> None:
    listing = lspci(sriov_dump(7), tmp_path, "-n")
    vf_lines = [line for line in listing.splitlines() if re.match(r"00:0[45]\.", line)]
    assert [line.split()[0] for line in vf_lines] == ["00:04.0", "00:04.1", "00:04.2", "00:04.3",
                                                      "00:04.4", "00:04.5", "00:04.6"]
    # lspci -F reads the raw bytes: a VF's Vendor/Device ID are 0xFFFF (§9.3.4.1.1-2).
    assert all("0200: ffff:ffff" in line for line in vf_lines)
    vf = block(lspci(sriov_dump(2), tmp_path, "-vvv"), "00:04.1")
    # Its own MSI-X (not enabled: no driver bound to VFs here) and virtio capabilities,
    # which lspci cannot name under Vendor ID 0xFFFF.
    assert "MSI-X: Enable- Count=3 Masked-" in vf and "Vendor Specific Information" in vf
    assert "Region" not in vf  # header BARs read 0


def test_dump_titles_show_linux_ids_and_bad_counts_are_refused() -> None:
    text = sriov_dump(2, level=0)
    assert text.splitlines()[-3:-1] == [
        "00:04.0 Ethernet controller: Red Hat, Inc. Virtio 1.0 network device (rev 01)",
        "00:04.1 Ethernet controller: Red Hat, Inc. Virtio 1.0 network device (rev 01)",
    ]
    with pytest.raises(SriovLayoutError, match="expected 0-224"):
        sriov_dump(225)


def test_cli_option(capsys) -> None:
    import argparse

    from iovirt.pci import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["lspci", "-x", "--sriov-vfs", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "00:04.1 Ethernet controller" in out and "00:04.2" not in out
    assert "\n00: ff ff ff ff 00 00 10 00 01 00 00 02" in out  # a VF: raw IDs 0xFFFF, Command 0
    args = parser.parse_args(["lspci", "--sriov-vfs", "-1"])
    assert args.func(args) == 2
    assert "expected 0-224" in capsys.readouterr().err
