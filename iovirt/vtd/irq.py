"""Interrupt remapping: remappable-format MSIs through the IRTE table (VT-d spec 5.1, 9.10).

A remappable MSI carries a handle (address bits 19:5 and bit 2) and, when
SHV is set, a subhandle in data bits 15:0; their sum indexes the interrupt
remapping table at IRTA.  The IRTE gives destination, vector, delivery mode
and trigger mode and says which source ids may use it (SVT/SQ/SID).  The
result is handed on as a compatibility-format MSI ``(address, data)`` for
the LAPIC router.  This model advertises no EIM (xAPIC destinations, 8-bit
APIC id in DST bits 15:8) and no posted interrupts.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, TypedDict

from iovirt.memory import GuestMemory, GuestMemoryError
from iovirt.vtd.caches import InterruptEntryCache
from iovirt.vtd.faults import (
    FR_IR_COMPAT_BLOCKED,
    FR_IR_ENTRY_NOT_PRESENT,
    FR_IR_INDEX_OVER,
    FR_IR_IRTE_RSVD,
    FR_IR_REQ_RSVD,
    FR_IR_ROOT_INVALID,
    FR_IR_SID_INVALID,
    FaultRecorder,
)

log = logging.getLogger(__name__)

U64 = (1 << 64) - 1
IRTE_SIZE = 16
MSI_ADDR_BASE = 0xFEE00000
MSI_ADDR_IF_REMAPPABLE = 1 << 4  # interrupt format bit
MSI_ADDR_SHV = 1 << 3
MSI_ADDR_HANDLE15 = 1 << 2
MSI_ADDR_HANDLE_SHIFT = 5

# -- IRTE (spec 9.10) -----------------------------------------------------------
IRTE_P = 1 << 0
IRTE_FPD = 1 << 1
IRTE_DM = 1 << 2  # destination mode: 1 = logical
IRTE_RH = 1 << 3  # redirection hint
IRTE_TM = 1 << 4  # trigger mode: 1 = level
IRTE_DLM_SHIFT = 5
IRTE_IM = 1 << 15  # IRTE mode: posted (reserved here, CAP.PI = 0)
IRTE_V_SHIFT = 16
IRTE_DST_SHIFT = 32
IRTE_XAPIC_DEST_SHIFT = 40  # DST bits 15:8 hold the xAPIC id
IRTE_LO_RSVD = 0x7000 | IRTE_IM | 0xFF << 24 | 0xFF << 32 | 0xFFFF << 48
IRTE_HI_SQ_SHIFT = 16
IRTE_HI_SVT_SHIFT = 18
IRTE_HI_RSVD = U64 & ~0xFFFFF
SVT_NONE = 0
SVT_SID = 1  # match SID, ignoring the function bits SQ names
SVT_BUS = 2  # requester bus within [SID 15:8, SID 7:0]
#: SQ encodings: the source-id bits the SVT_SID check ignores.
_SQ_IGNORED_BITS = (0, 0b100, 0b110, 0b111)
#: Delivery modes 011 and 110 are reserved (spec 9.10).
_DLM_RESERVED = frozenset({3, 6})


class Irte(NamedTuple):
    """A decoded, valid IRTE (what the interrupt entry cache holds)."""

    dest: int
    vector: int
    dlm: int
    tm: int
    dm: int
    rh: int
    svt: int
    sq: int
    sid: int
    fpd: bool


class IrteFields(TypedDict, total=False):
    """The optional fields of :func:`irte`, for callers that pass them through."""

    dlm: int
    tm: int
    dm: int
    rh: int
    svt: int
    sq: int
    sid: int
    fpd: bool
    present: bool


def irte(
    vector: int,
    dest: int,
    *,
    dlm: int = 0,
    tm: int = 0,
    dm: int = 0,
    rh: int = 0,
    svt: int = SVT_NONE,
    sq: int = 0,
    sid: int = 0,
    fpd: bool = False,
    present: bool = True,
) -> tuple[int, int]:
    """Encode a remapped-format IRTE ``(lo, hi)`` with an xAPIC destination id ``dest``."""
    lo = (
        (IRTE_P if present else 0)
        | (IRTE_FPD if fpd else 0)
        | (IRTE_DM if dm else 0)
        | (IRTE_RH if rh else 0)
        | (IRTE_TM if tm else 0)
        | (dlm & 7) << IRTE_DLM_SHIFT
        | (vector & 0xFF) << IRTE_V_SHIFT
        | (dest & 0xFF) << IRTE_XAPIC_DEST_SHIFT
    )
    hi = (sid & 0xFFFF) | (sq & 3) << IRTE_HI_SQ_SHIFT | (svt & 3) << IRTE_HI_SVT_SHIFT
    return lo, hi


def remappable_msi(handle: int, subhandle: int | None = None) -> tuple[int, int]:
    """The remappable-format MSI ``(address, data)`` a driver programs into a device."""
    address = (
        MSI_ADDR_BASE
        | (handle & 0x7FFF) << MSI_ADDR_HANDLE_SHIFT
        | MSI_ADDR_IF_REMAPPABLE
        | (MSI_ADDR_SHV if subhandle is not None else 0)
        | (MSI_ADDR_HANDLE15 if handle & 0x8000 else 0)
    )
    return address, (subhandle or 0) & 0xFFFF


def compat_msi(entry: Irte) -> tuple[int, int]:
    """The compatibility-format MSI (Intel SDM 10.11) an IRTE turns into."""
    address = MSI_ADDR_BASE | entry.dest << 12 | entry.rh << 3 | entry.dm << 2
    # Level-triggered messages carry "assert" in data bit 14.
    data = entry.vector | entry.dlm << 8 | entry.tm << 14 | entry.tm << 15
    return address, data


def source_allowed(entry: Irte, source_id: int) -> bool:
    """The IRTE's source-id validation (SVT/SQ/SID, spec 9.10)."""
    if entry.svt == SVT_SID:
        mask = 0xFFFF & ~_SQ_IGNORED_BITS[entry.sq]
        return source_id & mask == entry.sid & mask
    if entry.svt == SVT_BUS:
        return entry.sid >> 8 <= source_id >> 8 <= entry.sid & 0xFF
    return True


class InterruptRemapper:
    """The interrupt-remapping half of a VT-d unit.

    ``enabled`` mirrors GSTS.IRES, ``compat_allowed`` GSTS.CFIS, and
    ``table``/``table_entries`` the IRTA latched by the last SIRTP; the unit
    sets them.
    """

    def __init__(self, memory: GuestMemory, faults: FaultRecorder) -> None:
        self.memory = memory
        self.faults = faults
        self.iec: InterruptEntryCache[Irte] = InterruptEntryCache()
        self.enabled = False
        self.compat_allowed = False
        self.table: int | None = None
        self.table_entries = 0

    def remap_msi(self, source_id: int, address: int, data: int) -> tuple[int, int] | None:
        """Translate an MSI write into a compatibility-format ``(address, data)``, or ``None``.

        ``None`` means the interrupt is blocked; the fault is recorded
        (unless the IRTE's FPD suppresses it).
        """
        low = address & 0xFFFFFFFF
        if low >> 20 != MSI_ADDR_BASE >> 20:
            log.warning("MSI write to %#x from %#06x is outside the interrupt address range; dropped",
                        address, source_id)
            return None
        if not self.enabled:
            return address, data
        if not low & MSI_ADDR_IF_REMAPPABLE:
            if self.compat_allowed:
                return address, data
            self._fault(source_id, FR_IR_COMPAT_BLOCKED, 0)
            return None
        handle = (low >> MSI_ADDR_HANDLE_SHIFT) & 0x7FFF | (0x8000 if low & MSI_ADDR_HANDLE15 else 0)
        if address >> 32 or data >> 16:
            self._fault(source_id, FR_IR_REQ_RSVD, handle)
            return None
        index = handle + (data & 0xFFFF if low & MSI_ADDR_SHV else 0)
        if index >= self.table_entries:
            self._fault(source_id, FR_IR_INDEX_OVER, index)
            return None
        entry = self.iec.entries.get(index)
        if entry is None:
            entry = self._fetch(source_id, index)
            if entry is None:
                return None
        if not source_allowed(entry, source_id):
            self._fault(source_id, FR_IR_SID_INVALID, index, entry.fpd)
            return None
        return compat_msi(entry)

    def _fetch(self, source_id: int, index: int) -> Irte | None:
        """Interrupt-entry-cache miss: read, check and cache the IRTE."""
        if self.table is None:
            self._fault(source_id, FR_IR_ROOT_INVALID, index)
            return None
        try:
            addr = self.table + index * IRTE_SIZE
            lo, hi = self.memory.read_u64(addr), self.memory.read_u64(addr + 8)
        except GuestMemoryError:
            self._fault(source_id, FR_IR_ROOT_INVALID, index)
            return None
        fpd = bool(lo & IRTE_FPD)
        if not lo & IRTE_P:
            self._fault(source_id, FR_IR_ENTRY_NOT_PRESENT, index, fpd)
            return None
        dlm = (lo >> IRTE_DLM_SHIFT) & 7
        svt = (hi >> IRTE_HI_SVT_SHIFT) & 3
        if lo & IRTE_LO_RSVD or hi & IRTE_HI_RSVD or dlm in _DLM_RESERVED or svt == 3:
            self._fault(source_id, FR_IR_IRTE_RSVD, index, fpd)
            return None
        entry = Irte(
            dest=(lo >> IRTE_XAPIC_DEST_SHIFT) & 0xFF,
            vector=(lo >> IRTE_V_SHIFT) & 0xFF,
            dlm=dlm,
            tm=1 if lo & IRTE_TM else 0,
            dm=1 if lo & IRTE_DM else 0,
            rh=1 if lo & IRTE_RH else 0,
            svt=svt,
            sq=(hi >> IRTE_HI_SQ_SHIFT) & 3,
            sid=hi & 0xFFFF,
            fpd=fpd,
        )
        self.iec.entries[index] = entry
        return entry

    def _fault(self, source_id: int, reason: int, index: int, fpd: bool = False) -> None:
        # Interrupt requests are writes; FI bits 63:48 carry the index (spec 11.4.14).
        self.faults.record(source_id, reason, (index & 0xFFFF) << 48, is_read=False, fpd=fpd)
