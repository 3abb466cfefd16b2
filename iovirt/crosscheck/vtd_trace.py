"""QEMU's intel-iommu trace (``-trace``, log back-end, ``-D FILE``) read as translations still in force.

QEMU 7.2 prints one line per event, ``NAME FORMATTED-ARGS`` (hw/i386/trace-events
in QEMU's tree).  The events used, and what each gives:

- ``vtd_reg_dmar_root`` -- the root-table address latched by SRTP (spec 10.4.6, 11.4.5),
  and whether it is a scalable-mode table;
- ``vtd_dmar_enable`` -- GSTS.TES;
- ``vtd_iotlb_page_update`` -- an IOTLB fill: the requester (source id), the IOVA, the
  leaf second-level entry (its R/W bits are the page's permission) and the domain;
- ``vtd_dmar_translate`` -- the answer of the same translation: bus, device, function,
  the IOVA and the address QEMU translated it to, both aligned to the leaf page, and the
  page's address mask;
- ``vtd_inv_desc_iotlb_*`` and ``vtd_inv_desc_cc_*`` -- the queued invalidations software
  issued (spec 6.5.2).

A fill says what the tables held when QEMU walked them.  Software may change a mapping
afterwards, but it must then invalidate before the IOVA translates anywhere else (spec 6.5:
the hardware may keep using the cached entry until then); Linux frees an IOVA for reuse
only after that invalidation, strict or lazy.  So the last fill of a page that no later
invalidation covered is still the page's mapping at the end of the trace -- or the page
has been unmapped (the leaf cleared, its invalidation still waiting in Linux's lazy flush
queue).  :func:`parse_trace` keeps exactly those fills; the others are counted as
invalidated.  A context-cache invalidation may come with a new context for any requester
(a new domain, a new table), so it is taken as covering every page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from iovirt.vtd.tables import PTE_PERM


class VtdTraceError(ValueError):
    """The trace cannot be compared: no root table, a scalable-mode table, translation off."""


@dataclass(frozen=True)
class Fill:
    """One translation QEMU cached: ``source_id`` (bus<<8 | devfn) and ``iova`` -> ``addr`` with ``perm``.

    ``iova`` and ``addr`` are aligned to the leaf page, ``mask`` is its size minus one;
    ``perm`` holds the R/W bits of the leaf entry; ``line`` is the fill's line in the trace.
    """

    source_id: int
    iova: int
    addr: int
    mask: int
    perm: int
    domain: int
    line: int


@dataclass
class VtdTrace:
    """What a trace says: the root table, and the fills still in force at its end (:func:`parse_trace`)."""

    root_table: int | None = None
    scalable: bool = False
    enabled: bool = False
    fills: int = 0
    """IOTLB fills read (every ``vtd_iotlb_page_update`` matched with its translation)."""
    unpaired: int = 0
    """Fills without the ``vtd_dmar_translate`` line of the same translation (not compared)."""
    current: dict[tuple[int, int], Fill] = field(default_factory=dict)
    """The last fill of each (source id, page) that no later invalidation covers."""
    invalidated_pages: set[tuple[int, int]] = field(default_factory=set)
    """Pages a fill of which an invalidation covered afterwards (some may have been refilled since)."""

    @property
    def invalidated(self) -> int:
        """Pages whose last fill an invalidation covered afterwards (the mapping may have changed)."""
        return len(self.invalidated_pages - self.current.keys())

    def check_comparable(self) -> int:
        """The root-table address, or :class:`VtdTraceError` when the trace cannot be walked by iovirt."""
        if self.root_table is None:
            raise VtdTraceError("the trace has no vtd_reg_dmar_root: was the event enabled, did the guest set RTADDR?")
        if self.scalable:
            raise VtdTraceError("the root table is a scalable-mode one; iovirt models legacy mode only")
        if not self.enabled:
            raise VtdTraceError("translation is off at the end of the trace (no vtd_dmar_enable 1 after the last 0)")
        return self.root_table


#: ``-trace`` patterns naming every event :func:`parse_trace` reads.
TRACE_EVENTS = (
    "vtd_reg_dmar_root", "vtd_dmar_enable", "vtd_iotlb_page_update", "vtd_dmar_translate",
    "vtd_inv_desc_iotlb_*", "vtd_inv_desc_cc_*",
)

_HEX = r"0x([0-9a-f]+)"
_ROOT = re.compile(rf"vtd_reg_dmar_root addr {_HEX} (?:extended|scalable) (\d)")
_ENABLE = re.compile(r"vtd_dmar_enable enable (\d)")
_FILL = re.compile(rf"vtd_iotlb_page_update IOTLB page update sid {_HEX} iova {_HEX} slpte {_HEX} domain {_HEX}")
_XLATE = re.compile(
    rf"vtd_dmar_translate dev ([0-9a-f]+):([0-9a-f]+)\.([0-9a-f]+) iova {_HEX} -> gpa {_HEX} mask {_HEX}"
)
_INV_DOMAIN = re.compile(rf"vtd_inv_desc_iotlb_domain iotlb invalidate whole domain {_HEX}")
_INV_PAGES = re.compile(rf"vtd_inv_desc_iotlb_pages iotlb invalidate domain {_HEX} addr {_HEX} mask {_HEX}")
_PAGE_SHIFT = 12


def parse_trace(lines: Iterable[str]) -> VtdTrace:
    """Read a trace in order; keep the last fill of each page unless a later invalidation covers it.

    An invalidation event this parser does not know in detail (global, PASID-based, any
    context-cache one) is taken as covering every page, which can only move fills from
    compared to skipped.
    """
    trace = VtdTrace()
    pending: dict[int, tuple[int, int, int, int]] = {}  # source id -> (iova, slpte, domain, line)
    for number, line in enumerate(lines, 1):
        name = line.split(" ", 1)[0]
        if name == "vtd_iotlb_page_update":
            m = _FILL.match(line)
            if m:
                sid, iova, slpte, domain = (int(g, 16) for g in m.groups())
                if sid in pending:
                    trace.unpaired += 1
                pending[sid] = (iova, slpte, domain, number)
        elif name == "vtd_dmar_translate":
            m = _XLATE.match(line)
            if m:
                _pair(trace, pending, m)
        elif name == "vtd_reg_dmar_root":
            m = _ROOT.match(line)
            if m:
                trace.root_table, trace.scalable = int(m.group(1), 16), m.group(2) == "1"
                _invalidate(trace, lambda f: True)
        elif name == "vtd_dmar_enable":
            m = _ENABLE.match(line)
            if m:
                trace.enabled = m.group(1) == "1"
        elif name == "vtd_inv_desc_iotlb_domain":
            m = _INV_DOMAIN.match(line)
            did = int(m.group(1), 16) if m else None
            _invalidate(trace, lambda f: did is None or f.domain == did)
        elif name == "vtd_inv_desc_iotlb_pages":
            m = _INV_PAGES.match(line)
            if m:
                # Page-selective invalidation: 2^AM pages from ADDR (spec 6.5.2.3).
                did, start, am = (int(g, 16) for g in m.groups())
                end = start + (1 << (_PAGE_SHIFT + am))
                _invalidate(trace, lambda f: f.domain == did and f.iova < end and start <= f.iova + f.mask)
            else:
                _invalidate(trace, lambda f: True)
        elif name.startswith(("vtd_inv_desc_iotlb", "vtd_inv_desc_cc")):
            _invalidate(trace, lambda f: True)
    trace.unpaired += len(pending)
    return trace


def _pair(trace: VtdTrace, pending: dict[int, tuple[int, int, int, int]], m: re.Match[str]) -> None:
    """Join a translation's answer to the fill it follows (a hit has no pending fill and is ignored)."""
    bus, dev, fn, iova, addr, mask = (int(g, 16) for g in m.groups())
    sid = bus << 8 | dev << 3 | fn
    fill = pending.get(sid)
    if fill is None or fill[0] & ~mask != iova:
        return
    del pending[sid]
    _iova, slpte, domain, line = fill
    trace.fills += 1
    # A refill of a page replaces its older fill: only the last one says what the tables hold now.
    trace.current[(sid, iova)] = Fill(sid, iova, addr, mask, slpte & PTE_PERM, domain, line)


def _invalidate(trace: VtdTrace, covers: Callable[[Fill], bool]) -> None:
    stale = [key for key, fill in trace.current.items() if covers(fill)]
    for key in stale:
        del trace.current[key]
    trace.invalidated_pages.update(stale)
