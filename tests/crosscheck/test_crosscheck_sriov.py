"""Area sriov against QEMU's nvme SR-IOV (hw/pci/pcie_sriov.c) through qtest and ECAM: a bounded seed set (issue 18)."""

from __future__ import annotations

import json
import time

import pytest

from iovirt.cli import main
from iovirt.crosscheck.area import AreaResult, compare, run_area
from iovirt.crosscheck.areas import AREAS
from iovirt.crosscheck.ops import Op, parse_ops
from iovirt.crosscheck.qtest import qemu_available
from iovirt.crosscheck.sriov import SriovArea
from iovirt.sriov.regs import PCI_SRIOV_CTRL_VFE

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def area():
    with SriovArea() as a:
        yield a


def test_sriov_is_registered():
    assert AREAS["sriov"] is SriovArea


@needs_qemu
def test_iovirt_is_configured_from_qemu(area):
    layout = area.layout
    assert layout.total_vfs == 4 and layout.vf_device_id == 0x0010
    assert layout.routing[(4, False)] == (1, 1)
    assert area.sriov.total_vfs == 4 and area.sriov.vf_device_id == 0x0010
    assert area.sriov.vf_bars[0].size == 0x4000
    assert area.vf_devfns == [1, 2, 3, 4, 5]


@needs_qemu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sriov_agrees_with_qemu(area, seed):
    started = time.monotonic()
    result = run_area(area, seed, 4000)
    assert result.compared == 4000
    assert [m.replay_text() for m in result.mismatches] == []
    assert time.monotonic() - started < 20


ENABLE = """
w sriov 0x10 2 0x2
r vf 0x203c 4
w sriov 0x8 2 0x9
r sriov 0x8 2
r vf 0x1008 4
r vf 0x2008 4
r vf 0x3008 4
r vf 0x1100 4
"""


@needs_qemu
def test_vfs_appear_at_their_routing_ids_on_both_sides(area):
    ops = parse_ops(ENABLE)
    qemu = area.run_qemu(ops)
    assert qemu == area.run_iovirt(ops)
    # Before VF Enable nothing answers; after it VF 1 and 2 do (Class Code 010802h, Revision 2), VF 3 does not.
    assert qemu[1] == 0xFFFFFFFF
    assert qemu[3] == PCI_SRIOV_CTRL_VFE | 0x8
    assert qemu[4:7] == [0x01080202, 0x01080202, 0xFFFFFFFF]
    assert qemu[7] & 0xFFFF == 0x000E  # the VF's ARI capability at 0x100


@needs_qemu
def test_a_broken_model_is_caught_and_shrunk(area, monkeypatch):
    # A mutant: First VF Offset one too far, so every VF lands one function after its routing ID.
    layout = area.layout
    shifted = {key: (offset + 1, stride) for key, (offset, stride) in layout.routing.items()}
    monkeypatch.setattr(layout, "routing", shifted)
    ops = [
        Op("r", "sriov", 0x8, 2),
        Op("w", "sriov", 0x20, 4, 0x1),
        Op("w", "sriov", 0x10, 2, 0x3),
        Op("r", "vf", 0x1000, 4),
        Op("w", "sriov", 0x8, 2, 0x1),
        Op("r", "vf", 0x2008, 4),
        Op("r", "vf", 0x1008, 4),
    ]
    result = AreaResult(area.name)
    compare(area, ops, result)
    [mismatch] = result.mismatches
    assert [str(op) for op in mismatch.ops] == ["w sriov 0x10 2 0x3", "w sriov 0x8 2 0x1", "r vf 0x1008 4"]
    assert mismatch.qemu == 0x01080202 and mismatch.iovirt == 0xFFFFFFFF
    assert parse_ops(mismatch.replay_text()) == mismatch.ops


@needs_qemu
def test_cli_writes_the_json_report(tmp_path):
    out = tmp_path / "report.json"
    assert main(["crosscheck", "--area", "sriov", "--seed", "5", "--ops", "2000", "--json", str(out)]) == 0
    counts = json.loads(out.read_text())["areas"]["sriov"]
    assert counts["compared"] == 2000 and counts["mismatches"] == 0
    assert counts["expected_differences"] > 0
