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
from iovirt.sriov.capability import SriovCapability
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


# Two VFs, VF BAR0 in the root port's window, VF Enable and VF MSE; each VF's own Command.MSE written
# as Linux does (read-only 0 in a VF; QEMU 7.2 decodes only once it is set).  Then VF MSE is cleared.
VF_MSE = """
w sriov 0x10 2 0x2
w sriov 0x24 4 0xc0000000
w sriov 0x28 4 0x0
w sriov 0x8 2 0x9
w vf 0x1004 2 0x2
w vf 0x2004 2 0x2
r vfbar 0x200c 4
r vfbar 0x600c 4
r vfbar 0x7000 4
r vfbar 0xa00c 4
r vf 0x1004 2
w sriov 0x8 2 0x1
r vfbar 0x200c 4
"""


@needs_qemu
def test_vf_mse_decides_whether_vf_bars_decode(area):
    ops = parse_ops(VF_MSE)
    # VF 0 and 1 decode (Vector Control masked, PBA clear), VF 2 does not exist; VF MSE clear: none decodes.
    assert area.run_iovirt(ops)[6:] == [1, 1, 0, 0xFFFFFFFF, 0, None, 0xFFFFFFFF]
    assert area.run_qemu(ops)[6:] == [1, 1, 0, 0, 0x2, None, 1]
    result = AreaResult(area.name)
    compare(area, ops, result)
    assert result.mismatches == []
    assert sorted(e.condition for e in result.expected) == [
        "sriov-unclaimed-read", "sriov-vf-command-mse", "sriov-vf-decode-differs"]


@needs_qemu
def test_a_model_whose_vfs_decode_without_vf_mse_is_caught(area, monkeypatch):
    # A mutant: VF BARs decode whenever VF Enable is set, VF MSE or not.  Caught where QEMU does not decode
    # either (no VF Command.MSE written); where it does (VF_MSE's last read) QEMU's departure hides it.
    monkeypatch.setattr(SriovCapability, "vf_memory_enabled", property(lambda self: True))
    ops = parse_ops(VF_MSE.replace("w vf 0x1004 2 0x2\nw vf 0x2004 2 0x2\n", ""))
    result = AreaResult(area.name)
    compare(area, ops, result)
    [mismatch] = result.mismatches
    assert str(mismatch.ops[-1]) == "r vfbar 0x200c 4"
    assert mismatch.qemu == 0 and mismatch.iovirt == 1
    assert len(mismatch.ops) < len(ops)
    assert parse_ops(mismatch.replay_text()) == mismatch.ops
