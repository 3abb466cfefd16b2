"""Bad input from a guest: random tables and descriptors end in faults or IQE, never other exceptions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from iovirt.memory import Access, BumpAllocator, GuestMemory
from iovirt.vtd import DmarFault, VtdConfigError, VtdDriver, VtdUnit
from iovirt.vtd import regs as R

u64 = st.integers(0, 2**64 - 1)
# Values that often look like real entries: small addresses inside the 64 KiB memory.
entry = st.one_of(u64, st.integers(0, 0xFFFF).map(lambda a: (a & ~0xFFF) | 3), st.just(0))


@settings(max_examples=200, deadline=None)
@given(words=st.lists(entry, min_size=8, max_size=8), iova=u64, access=st.sampled_from([1, 2, 3]))
def test_random_tables_only_fault(words, iova, access):
    mem = GuestMemory.from_ranges([(0, 0x10000)], backing="bytearray")
    unit = VtdUnit(mem)
    # Root table at 0; context table at 0x1000; the first table level at 0x2000 and below.
    for i, value in enumerate(words):
        mem.write_u64((i // 2) * 0x1000 + (i % 2) * 8, value)
    unit.mmio_write(R.RTADDR, 8, 0)
    unit.mmio_write(R.GCMD, 4, R.SRTP)
    unit.mmio_write(R.GCMD, 4, R.TE)
    for sid in (0x0000, 0x0001):
        try:
            pieces = unit.translate(sid, iova % (1 << 49), 16, Access(access))
        except DmarFault as exc:
            assert exc.fault_reason in range(1, 0xE)
        else:
            assert sum(n for _, n in pieces) == 16


@settings(max_examples=200, deadline=None)
@given(descs=st.lists(st.tuples(u64, u64), min_size=1, max_size=6), tail=st.integers(0, 0x7FFF))
def test_random_descriptors_end_in_progress_or_iqe(descs, tail):
    mem = GuestMemory.from_ranges([(0, 0x10000)], backing="bytearray")
    unit = VtdUnit(mem)
    for i, (lo, hi) in enumerate(descs):
        mem.write_u64(0x1000 + 16 * i, lo)
        mem.write_u64(0x1000 + 16 * i + 8, hi)
    unit.mmio_write(R.IQA, 8, 0x1000)
    unit.mmio_write(R.GCMD, 4, R.QIE)
    unit.mmio_write(R.IQT, 8, (tail % 260) << 4)
    head = unit.mmio_read(R.IQH, 8)
    assert head == (tail % 260) << 4 or unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE


@settings(max_examples=200, deadline=None)
@given(lo=u64, hi=u64, address=st.integers(0, 2**64 - 1), data=st.integers(0, 2**32 - 1))
def test_random_irtes_and_msis_only_block(lo, hi, address, data):
    mem = GuestMemory.from_ranges([(0, 0x10000)], backing="bytearray")
    unit = VtdUnit(mem)
    for i in range(4):
        mem.write_u64(0x2000 + 16 * i, lo)
        mem.write_u64(0x2000 + 16 * i + 8, hi)
    unit.mmio_write(R.IRTA, 8, 0x2000 | 1)
    unit.mmio_write(R.GCMD, 4, R.SIRTP)
    unit.mmio_write(R.GCMD, 4, R.IRE)
    result = unit.remap_msi(0x100, address, data)
    assert result is None or result[0] >> 20 == 0xFEE


def test_driver_refuses_unsupported_address_width():
    mem = GuestMemory.from_ranges([(0, 0x100000)], backing="bytearray")
    drv = VtdDriver(VtdUnit(mem), mem, BumpAllocator(0x80000, 0x80000))
    drv.init()
    with pytest.raises(VtdConfigError):
        drv.create_domain(1, aw=3)  # 57-bit: not in SAGAW


def test_unit_refuses_bad_record_count():
    with pytest.raises(VtdConfigError):
        VtdUnit(GuestMemory.from_ranges([(0, 0x1000)], backing="bytearray"), num_fault_records=0)
