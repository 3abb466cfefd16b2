"""The device translators' C miss handler (``iovirt.vtd._dma_c``) against the Python reference.

The C handler serves the common miss itself and sends everything else to
``DmaRemapper.translate``; whichever way a request goes, the answer, the
unit's caches (IOTLB contents and order, context cache), the devices'
C-level copies and the fault log must end exactly as the reference
(``_dma_py.DmaTranslatorBase``: every miss through ``DmaRemapper.translate``)
leaves them.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt import _accel
from iovirt.memory import Access, BumpAllocator, GuestMemory
from iovirt.vtd import DmarFault, DmaTranslator, VtdDriver, VtdUnit
from iovirt.vtd import regs as R
from iovirt.vtd import _dma_py
from iovirt.vtd.tables import (
    AW_39, AW_48, ENTRY_SIZE, PTE_R, PTE_W, TT_DEVICE_TLB, TT_PASS_THROUGH, context_entry,
)

from vtd_memory import MEM_SIZE, TABLES_BASE, TABLES_SIZE, RecordingSink
from twins import error_record

RW = PTE_R | PTE_W
K4 = 0x1000
IOVA = 0x40_0000  # 2 MiB aligned, inside a 39-bit space
P = 0x10_0000  # data pages
BIG_IOVA, BIG_GPA = IOVA + 0x20_0000, 0x60_0000  # one 2 MiB leaf
#: (source id, how it is attached): a fast-path candidate with and without FPD, a device-TLB
#: context, a pass-through one, and one with no context at all.
SID_ML, SID_DT, SID_PT, SID_NONE = 0x0008, 0x0010, 0x0018, 0x0020
SIDS = (SID_ML, SID_DT, SID_PT, SID_NONE)
OTHER_GPA = 0x30_0000  # where domain 2 maps IOVA


class ReferenceTranslator(_dma_py.DmaTranslatorBase):
    """A device translator whose every miss goes through ``DmaRemapper.translate``."""

    def __init__(self, remapper, source_id: int) -> None:
        super().__init__(remapper, source_id)
        remapper.add_translator(self)

    forget = DmaTranslator.forget


def c_extension():
    """The ``_dma_c`` module; fails the test if it was expected and did not load."""
    if _accel.NO_EXTENSIONS:
        pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
    try:
        from iovirt.vtd import _dma_c
    except ImportError:
        pytest.fail("the Cython VT-d miss-path extension did not load (build it: pip install -e .)")
    return _dma_c


class Machine:
    """Memory, a unit with a small IOTLB and fault log, one domain and four requesters."""

    def __init__(self, translator_cls: type, aw: int = AW_48, fpd: bool = False) -> None:
        self.mem = GuestMemory.from_ranges([(0, MEM_SIZE)])
        self.sink = RecordingSink()
        self.unit = VtdUnit(self.mem, self.sink, iotlb_capacity=5, num_fault_records=4)
        self.drv = VtdDriver(self.unit, self.mem, BumpAllocator(TABLES_BASE, TABLES_SIZE))
        self.drv.init()
        self.dom = self.drv.create_domain(1, aw)
        self.drv.attach(SID_ML, self.dom, fpd=fpd)
        self.drv.attach(SID_DT, self.dom, tt=TT_DEVICE_TLB)
        self.drv.attach(SID_PT, self.dom, tt=TT_PASS_THROUGH)
        self.drv.map(self.dom, IOVA, P, K4, RW)
        self.drv.map(self.dom, IOVA + K4, P + K4, K4, PTE_R)
        self.drv.map(self.dom, IOVA + 2 * K4, P + 2 * K4, K4, PTE_W)
        # IOVA + 3 pages: never mapped.
        self.drv.map(self.dom, IOVA + 4 * K4, P + 4 * K4, 2 * K4, RW)
        self.drv.map(self.dom, BIG_IOVA, BIG_GPA, 0x20_0000, RW)
        self.other = self.drv.create_domain(2, aw)
        self.drv.map(self.other, IOVA, OTHER_GPA, 2 * K4, RW)
        self.drv.enable_translation()
        self.translators = {sid: translator_cls(self.unit.dma, sid) for sid in SIDS}

    def retarget(self, domain) -> None:
        """Point SID_ML's context entry at ``domain`` in memory only, as a driver mid-change would."""
        lo, hi = context_entry(domain.pgd, domain.did, domain.aw)
        entry = self.drv.context_tables[SID_ML >> 8] + (SID_ML & 0xFF) * ENTRY_SIZE
        self.mem.write_u64(entry + 8, hi)
        self.mem.write_u64(entry, lo)

    def translate(self, sid: int, iova: int, length: int, access: Access):
        try:
            return self.translators[sid].fill(iova, length, access)
        except DmarFault as exc:
            return error_record(exc)

    def state(self):
        """Everything the reference and the C path must agree on."""
        fault_regs = [self.unit.mmio_read(R.FRCD + 8 * i, 8) for i in range(8)]
        return (
            list(self.unit.dma.iotlb.entries.items()),  # order too: eviction takes the oldest
            dict(self.unit.dma.context_cache.entries),
            {sid: (t.did, t.cache.entries()) for sid, t in self.translators.items()},
            fault_regs, self.unit.mmio_read(R.FSTS, 4), list(self.sink.msis),
        )


def test_device_translators_use_the_c_miss_handler():
    assert issubclass(DmaTranslator, c_extension().DmaTranslatorBase)


def count_reference_calls(machine: Machine) -> list:
    calls = []
    reference = machine.unit.dma.translate

    def counting(*args):
        calls.append(args[:2])
        return reference(*args)

    machine.unit.dma.translate = counting
    return calls


def test_a_plain_miss_never_reaches_the_python_path():
    c_extension()
    m = Machine(DmaTranslator)
    calls = count_reference_calls(m)
    t = m.translators[SID_ML]
    assert m.translate(SID_ML, IOVA + 0x10, 8, Access.READ) == [(P + 0x10, 8)]
    assert calls == [(SID_ML, IOVA + 0x10)]  # the context was not cached yet
    assert m.translate(SID_ML, IOVA + 4 * K4 + 0xFF8, 16, Access.WRITE) == [
        (P + 4 * K4 + 0xFF8, 8), (P + 5 * K4, 8)]
    assert m.translate(SID_ML, BIG_IOVA + 0x12345, 4, Access.READ) == [(BIG_GPA + 0x12345, 4)]
    assert len(calls) == 1  # walks, IOTLB inserts and copies all in C
    assert m.unit.dma.iotlb.entries[(1, (BIG_IOVA + 0x12345) >> 12)] == (
        BIG_GPA + 0x12000, RW, BIG_IOVA, BIG_IOVA + 0x20_0000)
    assert t.cache.lookup(IOVA + 5 * K4, K4) == (P + 5 * K4, K4, RW)
    m.translate(SID_ML, IOVA + K4, 4, Access.WRITE)  # read-only page: a fault, reported by the reference
    assert len(calls) == 2


def test_a_stale_unit_iotlb_entry_is_served_until_invalidated():
    c_extension()
    m = Machine(DmaTranslator)
    calls = count_reference_calls(m)
    t = m.translators[SID_ML]
    m.translate(SID_ML, IOVA, 8, Access.READ)
    m.drv.map(m.dom, IOVA, P + 0x8000, K4, RW)  # remapped in memory, not flushed
    t.cache.invalidate_all()  # only the device's copy goes: the unit still holds the old entry
    assert m.translate(SID_ML, IOVA, 8, Access.READ) == [(P, 8)]
    m.drv.flush_iotlb(m.dom, IOVA, K4)
    assert m.translate(SID_ML, IOVA, 8, Access.READ) == [(P + 0x8000, 8)]
    assert len(calls) == 1  # only the first request, for the context entry


def test_a_stale_context_entry_is_served_until_invalidated():
    c_extension()
    m = Machine(DmaTranslator)
    calls = count_reference_calls(m)
    t = m.translators[SID_ML]
    assert m.translate(SID_ML, IOVA, 8, Access.READ) == [(P, 8)]
    m.retarget(m.other)  # the context entry now names domain 2: not flushed
    m.drv.flush_iotlb_domain(m.dom)
    assert m.translate(SID_ML, IOVA, 8, Access.READ) == [(P, 8)]  # the cached context: domain 1
    assert t.did == m.dom.did
    m.drv.flush_context_device(SID_ML, m.dom.did)
    assert m.translate(SID_ML, IOVA, 8, Access.READ) == [(OTHER_GPA, 8)]
    assert t.did == m.other.did and t.cache.entries() == [(IOVA, OTHER_GPA, K4, RW)]
    assert len(calls) == 2  # the two context-cache misses


DMA = st.tuples(
    st.just("dma"), st.sampled_from(SIDS),
    st.sampled_from([IOVA, IOVA + K4, IOVA + 2 * K4, IOVA + 3 * K4, IOVA + 4 * K4, BIG_IOVA, BIG_IOVA + 0x1F_F000,
                     (1 << 39) - K4, (1 << 39) + IOVA, (1 << 48) - K4, (1 << 48) + IOVA]),  # + aliases beyond AW
    st.integers(0, K4 - 1), st.integers(1, 2 * K4 + 16),
    st.sampled_from([Access.READ, Access.WRITE, Access.READ | Access.WRITE]),
)
CHANGES = st.one_of(
    st.tuples(st.just("flush_page"), st.integers(0, 5)),
    st.tuples(st.just("flush_domain")),
    st.tuples(st.just("flush_context")),
    st.tuples(st.just("remap"), st.integers(0, 5), st.sampled_from([PTE_R, PTE_W, RW])),
    st.tuples(st.just("drop_copy"), st.sampled_from(SIDS)),
    st.tuples(st.just("retarget"), st.booleans()),
    st.tuples(st.just("toggle_te")),
    st.tuples(st.just("service_faults")),
)
OPS = st.one_of(DMA, DMA, DMA, CHANGES)  # mostly requests


def apply(m: Machine, op):
    kind = op[0]
    if kind == "dma":
        _, sid, base, offset, length, access = op
        return m.translate(sid, base + offset, length, access)
    if kind == "flush_page":
        m.drv.flush_iotlb(m.dom, IOVA + op[1] * K4, K4)
    elif kind == "flush_domain":
        m.drv.flush_iotlb_domain(m.dom)
    elif kind == "flush_context":
        m.drv.flush_context_device(SID_ML, m.dom.did)
    elif kind == "remap":  # a changed mapping, not flushed: stale entries stay in use
        m.drv.map(m.dom, IOVA + op[1] * K4, P + 0x10_0000 + op[1] * K4, K4, op[2])
    elif kind == "retarget":  # not flushed: the cached context stays in use until flush_context
        m.retarget(m.other if op[1] else m.dom)
    elif kind == "drop_copy":
        m.translators[op[1]].cache.invalidate_all()
    elif kind == "toggle_te":
        if m.unit.dma.enabled:
            m.drv.disable_translation()
        else:
            m.drv.enable_translation()
    elif kind == "service_faults":
        for i in range(4):
            m.unit.mmio_write(R.FRCD + 16 * i + 8, 8, R.FRCD_HI_F)
        m.unit.mmio_write(R.FSTS, 4, R.FSTS_W1C)
    return None


def run_twins(ops, aw: int = AW_48, fpd: bool = False) -> None:
    """Apply ``ops`` to a machine with the build's translators and one with the reference's."""
    fast, ref = Machine(DmaTranslator, aw, fpd), Machine(ReferenceTranslator, aw, fpd)
    try:
        for op in ops:
            assert apply(fast, op) == apply(ref, op), op
            assert fast.state() == ref.state(), op
    finally:
        fast.mem.close()
        ref.mem.close()


def dma(sid: int, iova: int, length: int = 8, access: Access = Access.READ):
    return ("dma", sid, iova, 0, length, access)


def test_a_full_unit_iotlb_evicts_its_oldest_entry_from_every_copy():
    pages = [IOVA, IOVA + 4 * K4, IOVA + 5 * K4, BIG_IOVA, BIG_IOVA + K4, BIG_IOVA + 2 * K4, BIG_IOVA + 3 * K4]
    run_twins([dma(SID_ML, IOVA)] + [dma(sid, page) for page in pages for sid in (SID_ML, SID_DT)])


def test_translation_toggled_off_and_on_keeps_the_cached_context_and_refills_the_copy():
    run_twins([dma(SID_ML, IOVA), ("toggle_te",), dma(SID_ML, IOVA), ("toggle_te",),
               dma(SID_ML, IOVA), dma(SID_ML, IOVA + 4 * K4)])


def test_faults_in_the_middle_of_a_request_are_recorded_once_with_the_request():
    run_twins([dma(SID_ML, IOVA), dma(SID_ML, IOVA + 0xFF0, 0x20, Access.WRITE),  # second page read-only
               dma(SID_ML, IOVA + 2 * K4 + 0xFF0, 0x1020, Access.READ),  # write-only, then unmapped
               dma(SID_ML, (1 << 48) - 8, 16), dma(SID_ML, (1 << 48) + IOVA)], fpd=False)
    run_twins([dma(SID_ML, IOVA), dma(SID_ML, IOVA + K4, 4, Access.WRITE)], fpd=True)


@settings(max_examples=200, deadline=None)
@given(aw=st.sampled_from([AW_39, AW_48]), fpd=st.booleans(), ops=st.lists(OPS, min_size=1, max_size=40))
def test_every_request_ends_as_the_reference_leaves_it(aw, fpd, ops):
    run_twins(ops, aw, fpd)
