"""RegisterFile.redefine: a unit configured to another implementation's register choices (crosscheck)."""

import pytest

from iovirt.memory import GuestMemory
from iovirt.vtd import regs as R
from iovirt.vtd.regfile import RegSpec
from iovirt.vtd.unit import VtdUnit


def test_redefine_replaces_value_and_write_mask():
    unit = VtdUnit(GuestMemory.from_ranges([(0, 1 << 20)], backing="bytes"), num_fault_records=1)
    unit.regs.redefine(RegSpec("CAP", R.CAP, 8, 0x1234))
    unit.regs.redefine(RegSpec("RTADDR", R.RTADDR, 8, rw=R.PAGE_MASK & ((1 << 64) - 1)))
    assert unit.mmio_read(R.CAP, 8) == 0x1234
    unit.mmio_write(R.RTADDR, 8, 1 << 60 | 0x5000)
    assert unit.mmio_read(R.RTADDR, 8) == 1 << 60 | 0x5000
    unit.reset()
    assert unit.mmio_read(R.CAP, 8) == 0x1234 and unit.mmio_read(R.RTADDR, 8) == 0


def test_redefine_keeps_the_width():
    unit = VtdUnit(GuestMemory.from_ranges([(0, 1 << 20)], backing="bytes"))
    with pytest.raises(ValueError):
        unit.regs.redefine(RegSpec("CAP", R.CAP, 4, 0))
