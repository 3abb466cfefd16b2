"""Area vtd-regs against QEMU's intel-iommu through qtest and QMP: a bounded seed set (issue 18)."""

from __future__ import annotations

import pytest

from iovirt.crosscheck.area import AreaResult, compare, run_area
from iovirt.crosscheck.areas import AREAS
from iovirt.crosscheck.ops import parse_ops
from iovirt.crosscheck.qtest import qemu_available
from iovirt.crosscheck.vtd_regs import VtdRegsArea
from iovirt.vtd import regs as R

needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")


@pytest.fixture(scope="module")
def area():
    with VtdRegsArea() as a:
        yield a


@needs_qemu
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtd_regs_agree_with_qemu(area, seed):
    result = run_area(area, seed, 4000)
    assert result.compared == 4000
    assert [m.replay_text() for m in result.mismatches] == []


# Enable QI on a queue at 0x200000 holding one wait descriptor (status 0xCAFE to the first status slot),
# run it, disable QI, read IQH (0 on both: spec 11.4.10) and GSTS.
QUEUE = """
w reg 0x90 8 0x200000
w ram 0x0 16 0x2100000000cafe00000025
w reg 0x18 4 0x4000000
w reg 0x88 8 0x10
r reg 0x80 8
w reg 0x18 4 0x0
r reg 0x80 8
r reg 0x1c 4
"""


@needs_qemu
def test_a_wait_descriptor_runs_and_disabling_qi_resets_iqh_on_both_sides(area):
    ops = parse_ops(QUEUE)
    nothing = (0,) * 8
    expected = [nothing, None, nothing, (0xCAFE,) + (0,) * 7, 0x10, nothing, 0, 0]
    assert area.run_qemu(ops) == expected
    assert area.run_iovirt(ops) == expected


@needs_qemu
def test_a_model_that_keeps_iqh_when_qi_is_disabled_is_caught(area, monkeypatch):
    # A mutant: the unit's GCMD handler as before the fix (IQH survives QI being disabled).
    unit = area.unit
    original = unit._gcmd_written

    def keep_iqh(write):
        head = unit.regs[R.IQH]
        original(write)
        if not unit.regs[R.GSTS] & R.QIE:
            unit.regs[R.IQH] = head

    monkeypatch.setattr(unit, "_gcmd_written", keep_iqh)
    monkeypatch.setitem(unit._handlers, R.GCMD, keep_iqh)
    result = AreaResult(area.name)
    compare(area, parse_ops(QUEUE), result)
    [mismatch] = result.mismatches
    assert str(mismatch.ops[-1]) == "r reg 0x80 8"
    assert mismatch.qemu == 0 and mismatch.iovirt == 0x10
    assert parse_ops(mismatch.replay_text()) == mismatch.ops


def test_the_area_is_registered():
    assert AREAS["vtd-regs"] is VtdRegsArea
