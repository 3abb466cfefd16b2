"""Register file rules: reset values, CAP/ECAP advertisement, access widths, GCMD/GSTS."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from iovirt.memory import Access, GuestMemory, TranslationFault
from iovirt.vtd import VtdUnit
from iovirt.vtd import regs as R


def test_version_and_capabilities(unit):
    assert unit.mmio_read(R.VER, 4) == 0x10
    cap = unit.mmio_read(R.CAP, 8)
    sagaw = (cap >> 8) & 0x1F
    assert sagaw == 0b00110  # 39-bit (3-level) and 48-bit (4-level)
    assert (cap >> 16) & 0x3F == 47  # MGAW
    assert (cap >> 34) & 0xF == 0b11  # 2 MiB and 1 GiB pages
    assert cap & (1 << 39)  # PSI
    assert (cap >> 40) & 0xFF == 7  # NFR = 8 records
    assert ((cap >> 24) & 0x3FF) * 16 == R.FRCD
    assert not cap & (1 << 4)  # RWBF: no write-buffer flushing needed
    assert not cap & (1 << 7)  # CM: not-present entries are not cached
    ecap = unit.mmio_read(R.ECAP, 8)
    for bit in (R.ECAP_QI, R.ECAP_DT, R.ECAP_IR, R.ECAP_PT):
        assert ecap & bit
    assert ((ecap >> 8) & 0x3FF) * 16 == R.IVA


def test_fault_record_count_is_configurable(mem):
    unit = VtdUnit(mem, num_fault_records=3)
    assert (unit.mmio_read(R.CAP, 8) >> 40) & 0xFF == 2


def test_64_bit_register_reads_as_two_halves(unit):
    cap = unit.mmio_read(R.CAP, 8)
    assert unit.mmio_read(R.CAP, 4) == cap & 0xFFFFFFFF
    assert unit.mmio_read(R.CAP + 4, 4) == cap >> 32


def test_64_bit_register_written_as_two_halves(unit):
    unit.mmio_write(R.RTADDR, 4, 0x12345000)
    unit.mmio_write(R.RTADDR + 4, 4, 0x00000067)
    assert unit.mmio_read(R.RTADDR, 8) == 0x67_12345000


def test_reset_values(unit):
    assert unit.mmio_read(R.GSTS, 4) == 0
    assert unit.mmio_read(R.FSTS, 4) == 0
    assert unit.mmio_read(R.FECTL, 4) == R.CTL_IM  # fault events masked until the driver unmasks
    assert unit.mmio_read(R.IECTL, 4) == R.CTL_IM


def test_read_only_registers_ignore_writes(unit):
    cap = unit.mmio_read(R.CAP, 8)
    unit.mmio_write(R.CAP, 8, 0)
    unit.mmio_write(R.VER, 4, 0xFF)
    unit.mmio_write(R.GSTS, 4, 0xFFFFFFFF)
    unit.mmio_write(R.IQH, 8, 0x100)
    assert unit.mmio_read(R.CAP, 8) == cap
    assert unit.mmio_read(R.VER, 4) == 0x10
    assert unit.mmio_read(R.GSTS, 4) == 0
    assert unit.mmio_read(R.IQH, 8) == 0


def test_reserved_bits_are_not_writable(unit):
    unit.mmio_write(R.RTADDR, 8, 0xFFFF_FFFF_FFFF_FFFF)
    assert unit.mmio_read(R.RTADDR, 8) == R.ADDR_MASK  # TTM (legacy only) and bits above HAW
    unit.mmio_write(R.FEADDR, 4, 0xFEE00003)
    assert unit.mmio_read(R.FEADDR, 4) == 0xFEE00000
    unit.mmio_write(R.IRTA, 8, 0x5000 | R.IRTA_EIME | 0x7)
    assert unit.mmio_read(R.IRTA, 8) == 0x5007  # EIME is reserved: ECAP.EIM = 0
    unit.mmio_write(R.IQT, 8, 0xFFFF_FFFF)
    assert unit.mmio_read(R.IQT, 8) == R.IQ_INDEX_MASK


def test_bad_access_sizes_read_zero_and_are_ignored(unit):
    unit.mmio_write(R.RTADDR, 8, 0x5000)
    for offset, size in ((R.RTADDR, 2), (R.RTADDR + 1, 4), (R.RTADDR + 4, 8), (R.RTADDR, 1), (R.RTADDR, 16)):
        assert unit.mmio_read(offset, size) == 0
        unit.mmio_write(offset, size, 0xFFFFFFFF)
    assert unit.mmio_read(R.RTADDR, 8) == 0x5000


def test_unimplemented_offsets_read_zero(unit):
    assert unit.mmio_read(0x400, 4) == 0
    unit.mmio_write(0x400, 4, 1)
    assert unit.mmio_read(0x400, 4) == 0


def test_gcmd_reads_zero_and_srtp_latches_rtaddr(unit):
    unit.mmio_write(R.RTADDR, 8, 0x3000)
    unit.mmio_write(R.GCMD, 4, R.SRTP)
    assert unit.mmio_read(R.GCMD, 4) == 0
    assert unit.mmio_read(R.GSTS, 4) == R.SRTP  # RTPS
    assert unit.dma.root_table == 0x3000
    unit.mmio_write(R.RTADDR, 8, 0x7000)  # not used until the next SRTP
    assert unit.dma.root_table == 0x3000
    unit.mmio_write(R.GCMD, 4, R.SRTP)
    assert unit.dma.root_table == 0x7000


def test_persistent_bits_follow_the_written_value(unit):
    unit.mmio_write(R.GCMD, 4, R.TE)
    assert unit.mmio_read(R.GSTS, 4) == R.TE and unit.dma.enabled
    # Linux's pattern: read GSTS, drop the one-shot status bits, set/clear one bit.
    sts = unit.mmio_read(R.GSTS, 4) & 0x96FFFFFF
    unit.mmio_write(R.GCMD, 4, sts | R.CFI)
    assert unit.mmio_read(R.GSTS, 4) == R.TE | R.CFI
    unit.mmio_write(R.GCMD, 4, R.CFI)
    assert unit.mmio_read(R.GSTS, 4) == R.CFI and not unit.dma.enabled


def test_one_shot_status_bits_stay_across_later_commands(unit):
    unit.mmio_write(R.GCMD, 4, R.SRTP)
    unit.mmio_write(R.GCMD, 4, R.SIRTP)
    unit.mmio_write(R.GCMD, 4, R.TE)
    assert unit.mmio_read(R.GSTS, 4) == R.SRTP | R.SIRTP | R.TE


def test_write_buffer_flush_completes_at_once(unit):
    unit.mmio_write(R.GCMD, 4, R.WBF)
    assert not unit.mmio_read(R.GSTS, 4) & R.WBF  # WBFS clear: flush done


def test_sirtp_latches_irta_and_ire_enables(unit):
    unit.mmio_write(R.IRTA, 8, 0x9000 | 3)
    unit.mmio_write(R.GCMD, 4, R.SIRTP)
    assert unit.irq.table == 0x9000 and unit.irq.table_entries == 16
    unit.mmio_write(R.GCMD, 4, R.IRE)
    assert unit.mmio_read(R.GSTS, 4) == R.SIRTP | R.IRE
    assert unit.irq.enabled


def test_enabling_qi_resets_iqh(unit):
    unit.regs[R.IQH] = 0x50
    unit.mmio_write(R.IQA, 8, 0x4000)
    unit.mmio_write(R.GCMD, 4, R.QIE)
    assert unit.mmio_read(R.GSTS, 4) == R.QIE
    assert unit.mmio_read(R.IQH, 8) == 0


def test_register_invalidation_ignored_while_qi_enabled(unit):
    unit.mmio_write(R.IQA, 8, 0x4000)
    unit.mmio_write(R.GCMD, 4, R.QIE)
    unit.mmio_write(R.CCMD, 8, R.CCMD_ICC | 1 << R.CCMD_CIRG_SHIFT)
    assert unit.mmio_read(R.CCMD, 8) >> R.CCMD_CAIG_SHIFT & 3 == 0
    assert not unit.mmio_read(R.CCMD, 8) & R.CCMD_ICC


def test_ccmd_triggers_on_the_upper_half_write(unit):
    unit.dma.context_cache.entries[0x100] = (1, 0, 4, 0x1000, False)
    unit.mmio_write(R.CCMD, 4, 0)  # low half: DID/SID
    assert unit.dma.context_cache.entries
    unit.mmio_write(R.CCMD + 4, 4, (R.CCMD_ICC | 1 << R.CCMD_CIRG_SHIFT) >> 32)
    assert not unit.dma.context_cache.entries
    ccmd = unit.mmio_read(R.CCMD, 8)
    assert not ccmd & R.CCMD_ICC and (ccmd >> R.CCMD_CAIG_SHIFT) & 3 == 1


def test_reset_restores_power_on_state(unit, drv):
    drv.enable_translation()
    unit.reset()
    assert unit.mmio_read(R.GSTS, 4) == 0
    assert unit.mmio_read(R.RTADDR, 8) == 0
    assert not unit.dma.enabled and unit.dma.root_table is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x2FF), st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**64 - 1)),
                max_size=30))
def test_random_register_writes_never_raise(writes):
    """Bad input from a guest driver ends in faults or IQE, never an exception."""
    memory = GuestMemory.from_ranges([(0, 0x20000)], backing="bytearray")
    unit = VtdUnit(memory)
    for offset, size, value in writes:
        unit.mmio_write(offset, size, value)
        unit.mmio_read(offset, size)
    unit.remap_msi(0x100, 0xFEE00010, 0)
    try:
        unit.translate(0x100, 0x1000, 8, Access.READ)
    except TranslationFault:  # the one documented outcome besides success
        pass
