"""Area vtd-linux without a guest: QEMU-format trace lines against tables iovirt's driver built (issue 18).

The real-guest run is tests/realguest/test_vtd_linux_tables.py; here the trace is written by
hand in QEMU 7.2's log format, so that the parser's bookkeeping (which fills are still in
force) and the comparison's verdicts are checked one case at a time.
"""

from __future__ import annotations

import pytest

from iovirt.crosscheck.linux_tables import compare_memory
from iovirt.crosscheck.vtd_trace import VtdTraceError, parse_trace
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.vtd import VtdDriver, VtdUnit
from iovirt.vtd.tables import AW_39, PTE_R, PTE_W

SID = 0x0008  # 00:01.0
DID = 3
RO_IOVA, RO_GPA = 0xFFFFA000, 0x123000
RW_IOVA, RW_GPA = 0xFFFFB000, 0x2C1000
BIG_IOVA, BIG_GPA = 0x40000000, 0x400000  # a 2 MiB leaf
UNMAPPED_IOVA = 0xFFFFC000


@pytest.fixture
def tables():
    mem = GuestMemory.from_ranges([(0, 0x1000000)], backing="bytearray")
    drv = VtdDriver(VtdUnit(mem), mem, BumpAllocator(0x800000, 0x800000))
    drv.init()
    dom = drv.create_domain(DID, aw=AW_39)
    drv.attach(SID, dom)
    drv.map(dom, RO_IOVA, RO_GPA, 0x1000, PTE_R)
    drv.map(dom, RW_IOVA, RW_GPA, 0x1000, PTE_R | PTE_W)
    drv.map(dom, BIG_IOVA, BIG_GPA, 0x200000, PTE_R | PTE_W)
    yield mem, drv, dom
    mem.close()


def head(root: int, scalable: int = 0) -> list[str]:
    return [f"vtd_reg_dmar_root addr {root:#x} scalable {scalable}",
            "vtd_inv_desc_cc_global context invalidate globally",
            "vtd_inv_desc_iotlb_global iotlb invalidate global", "vtd_dmar_enable enable 1"]


def fill(iova: int, slpte: int, gpa: int, mask: int = 0xFFF, sid: int = SID, did: int = DID) -> list[str]:
    """The two lines QEMU prints for one IOTLB miss: the fill, then the translation's answer."""
    return [f"vtd_iotlb_page_update IOTLB page update sid {sid:#x} iova {iova + 0x10:#x} slpte {slpte:#x} "
            f"domain {did:#x}",
            f"vtd_dmar_translate dev {sid >> 8:02x}:{sid >> 3 & 0x1F:02x}.{sid & 7:02x} iova {iova:#x} -> gpa {gpa:#x} "
            f"mask {mask:#x}"]


def good_fills(mem, drv, dom) -> list[str]:
    lines = []
    for iova, gpa, mask in ((RO_IOVA, RO_GPA, 0xFFF), (RW_IOVA, RW_GPA, 0xFFF), (BIG_IOVA, BIG_GPA, 0x1FFFFF)):
        lines += fill(iova, mem.read_u64(drv.pte_address(dom, iova)), gpa, mask)
    return lines


def test_fills_in_force_agree_with_iovirts_walk(tables):
    mem, drv, dom = tables
    trace = parse_trace(head(drv.root_table) + good_fills(mem, drv, dom))
    result = compare_memory(trace, mem)
    assert [str(m) for m in result.mismatches] == []
    assert result.compared == 3
    assert result.by_perm == {PTE_R: 1, PTE_R | PTE_W: 2}
    assert result.requesters == {SID}
    assert result.skipped == {}


def test_a_wrong_address_a_wrong_permission_and_a_too_large_page_are_mismatches(tables):
    mem, drv, dom = tables
    ro, rw = (mem.read_u64(drv.pte_address(dom, iova)) for iova in (RO_IOVA, RW_IOVA))
    lines = head(drv.root_table) + fill(RO_IOVA, ro | PTE_W, RO_GPA) + fill(RW_IOVA, rw, RW_GPA + 0x1000)
    # QEMU saying 2 MiB where the tables map only the first 4 KiB page of the range.
    drv.map(dom, 0x80000000, 0x600000, 0x1000)
    lines += fill(0x80000000, 0x600083, 0x600000, 0x1FFFFF)
    result = compare_memory(parse_trace(lines), mem)
    assert result.compared == 3
    assert len(result.mismatches) == 3
    assert "perm 1" in str(result.mismatches[0]) and "perm 3" in str(result.mismatches[0])


def test_invalidated_and_unmapped_pages_are_skipped_and_a_refill_is_compared(tables):
    mem, drv, dom = tables
    lines = head(drv.root_table) + good_fills(mem, drv, dom)
    # Page-selective invalidation of the read-only page (AM 0), a domain flush of another domain.
    lines += ["vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x3 addr 0xffffa000 mask 0x0",
              "vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x7"]
    # A fill of a page Linux unmapped since (leaf cleared, invalidation not issued yet).
    drv.map(dom, UNMAPPED_IOVA, 0x300000, 0x1000)
    lines += fill(UNMAPPED_IOVA, mem.read_u64(drv.pte_address(dom, UNMAPPED_IOVA)), 0x300000)
    drv.unmap(dom, UNMAPPED_IOVA, 0x1000, flush=False)
    result = compare_memory(parse_trace(lines), mem)
    assert result.mismatches == []
    assert result.compared == 2
    assert result.skipped == {"invalidated after the fill (mapping may have changed)": 1,
                              "unmapped at dump (leaf cleared, invalidation not yet issued)": 1}
    # Refilled after its invalidation: compared again.
    lines += fill(RO_IOVA, mem.read_u64(drv.pte_address(dom, RO_IOVA)), RO_GPA)
    result = compare_memory(parse_trace(lines), mem)
    assert (result.compared, result.mismatches) == (3, [])
    assert "invalidated after the fill (mapping may have changed)" not in result.skipped


def test_a_context_cache_invalidation_or_a_new_root_covers_every_page(tables):
    mem, drv, dom = tables
    for event in ("vtd_inv_desc_cc_device context invalidate device 00:01.00",
                  f"vtd_reg_dmar_root addr {drv.root_table:#x} scalable 0"):
        trace = parse_trace(head(drv.root_table) + good_fills(mem, drv, dom) + [event])
        assert (len(trace.current), trace.invalidated, trace.fills) == (0, 3, 3)


def test_a_fill_without_its_translation_line_is_counted_not_compared(tables):
    mem, drv, dom = tables
    lines = head(drv.root_table) + fill(RO_IOVA, mem.read_u64(drv.pte_address(dom, RO_IOVA)), RO_GPA)[:1]
    trace = parse_trace(lines)
    assert (trace.fills, trace.unpaired, len(trace.current)) == (0, 1, 0)


@pytest.mark.parametrize("lines, problem", [
    ([], "no vtd_reg_dmar_root"),
    (head(0x1000, scalable=1), "scalable-mode"),
    (head(0x1000)[:-1], "translation is off"),
])
def test_a_trace_iovirt_cannot_walk_is_refused(lines, problem):
    with pytest.raises(VtdTraceError, match=problem):
        compare_memory(parse_trace(lines), GuestMemory.from_ranges([(0, 0x1000)], backing="bytearray"))
