"""DMA remapping: source id -> context entry -> second-level translation (legacy mode).

VT-d spec 3.4 (root and context tables), 3.7 (second-level translation),
7.2 (faults).  A request is identified by its source id
(``bus << 8 | dev << 3 | fn``), so each SR-IOV VF, having its own routing
id, translates through its own context entry.

The hit path is one context-cache lookup per request and one IOTLB lookup
per 4 KiB page; everything else (the root/context fetch, the page walk)
happens on a miss, and only successful results are cached.

In front of that, each device's :class:`DmaTranslator` keeps a C-level copy
of the IOTLB entries it has used (a :class:`~iovirt.virtio.iotlb.CachedTranslator`),
which the accelerated ring looks up without the GIL.  The copy only ever
holds entries that the unit's own IOTLB holds for the device's current
context: every entry the unit's caches drop (any invalidation, by register
or queue, at any granularity, and eviction), every context-cache drop for
the device and every change of GSTS.TES drops the copies too.  So a device
sees exactly what the unit's caches serve, stale entries included, until
software invalidates them (spec 6.5).

A miss of that copy calls the translator's ``fill``, from
``DmaTranslatorBase``: the C twin in ``_dma_c.pyx`` when it is built, else
the reference in ``_dma_py.py`` (``IOVIRT_NO_EXTENSIONS=1`` forces it; see
:mod:`iovirt._accel`).  The C one serves the common miss (context cached,
each page from the unit's IOTLB or a successful walk inserted into it,
access allowed) on the unit's own caches, and hands anything else, faults
included, to :meth:`DmaRemapper.translate`, which stays the model of
record; the reference sends every miss there.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from iovirt import _accel
from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.vtd import _dma_py
from iovirt.vtd.caches import ContextCache, ContextCacheEntry, Iotlb, IotlbEntry
from iovirt.vtd.faults import (
    FR_ADDR_BEYOND_AW,
    FR_CONTEXT_INVALID,
    FR_CONTEXT_NOT_PRESENT,
    FR_CONTEXT_RSVD,
    FR_CONTEXT_TABLE_INVALID,
    FR_READ,
    FR_ROOT_NOT_PRESENT,
    FR_ROOT_RSVD,
    FR_ROOT_TABLE_INVALID,
    FR_WRITE,
    DmarFault,
    FaultRecorder,
)
from iovirt.vtd.regs import ADDR_MASK, HAW, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from iovirt.vtd.tables import (
    AW_39,
    AW_48,
    CTX_HI_RSVD,
    CTX_LO_RSVD,
    ENTRY_SIZE,
    ROOT_HI_RSVD,
    ROOT_LO_RSVD,
    ROOT_P,
    TT_DEVICE_TLB,
    TT_MULTI_LEVEL,
    TT_PASS_THROUGH,
    aw_levels,
    decode_context,
    levels_width,
)
from iovirt.vtd.errors import WalkError
from iovirt.vtd.walk import table_walker

if TYPE_CHECKING:
    from iovirt.vtd._dma_py import IMPLEMENTATION, DmaTranslatorBase
else:
    _impl = _accel.load("iovirt.vtd._dma_c") or _dma_py
    IMPLEMENTATION, DmaTranslatorBase = _impl.IMPLEMENTATION, _impl.DmaTranslatorBase

_READ = int(Access.READ)
_WRITE = int(Access.WRITE)
_PAGE_OFFSET = (1 << PAGE_SHIFT) - 1


class DmaRemapper:
    """The DMA-remapping half of a VT-d unit: context cache, IOTLB and the translate path.

    ``enabled`` mirrors GSTS.TES and ``root_table`` the root-table address
    latched by the last SRTP (``None`` before the first one); both are set
    by :class:`iovirt.vtd.unit.VtdUnit`.
    """

    def __init__(self, memory: GuestMemory, faults: FaultRecorder, iotlb_capacity: int) -> None:
        self.memory = memory
        self.faults = faults
        self._translators: weakref.WeakSet[DmaTranslator] = weakref.WeakSet()
        self.context_cache = ContextCache(on_drop=self._context_dropped)
        self.iotlb = Iotlb(iotlb_capacity, on_drop=self._iotlb_dropped)
        self._enabled = False
        self.root_table: int | None = None
        self._walk = table_walker(memory)

    @property
    def enabled(self) -> bool:
        """GSTS.TES: whether DMA requests are translated."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value != self._enabled:
            # The devices' copies hold translations that are only right with TES set as it was.
            for translator in list(self._translators):
                translator.forget()
        self._enabled = value

    def add_translator(self, translator: "DmaTranslator") -> None:
        """Keep ``translator``'s C-level cache coherent with this unit's caches (held weakly)."""
        self._translators.add(translator)

    def _context_dropped(self, source_id: int | None) -> None:
        for translator in list(self._translators):
            if source_id is None or translator.source_id == source_id:
                translator.forget()

    def _iotlb_dropped(self, did: int | None, vpn: int | None) -> None:
        for translator in list(self._translators):
            if did is None or translator.did == did:
                if vpn is None:
                    translator.cache.invalidate_all()
                else:
                    translator.cache.invalidate(vpn << PAGE_SHIFT, PAGE_SIZE)

    def translate(
        self, source_id: int, addr: int, length: int, access: Access, shadow: DmaTranslatorBase | None = None
    ) -> list[tuple[int, int]]:
        """Guest-physical pieces for a DMA of ``[addr, addr+length)``, split at 4 KiB pages.

        Raises :class:`~iovirt.vtd.faults.DmarFault` (a
        :class:`~iovirt.memory.TranslationFault`) after recording the fault.
        With translation disabled, addresses pass unchanged.  ``shadow``
        (the requesting device's translator) gets a copy of every IOTLB entry
        used.
        """
        if not self._enabled:
            return [(addr, length)]
        acc = int(access)
        ctx = self.context_cache.entries.get(source_id)
        if ctx is None:
            ctx = self._load_context(source_id, addr, length, acc)
        did, tt, levels, slptptr, fpd = ctx
        end = addr + length
        limit = 1 << (HAW if tt == TT_PASS_THROUGH else levels_width(levels))
        if end > limit:
            raise self._fault(source_id, FR_ADDR_BEYOND_AW, addr, length, acc, max(addr, limit), fpd)
        if tt == TT_PASS_THROUGH:
            return [(addr, length)]
        iotlb = self.iotlb.entries
        copy = None
        if shadow is not None:
            if shadow.did != did:
                shadow.forget()
                shadow.did = did
            copy = shadow.cache.insert
        pieces = []
        while addr < end:
            vpn = addr >> PAGE_SHIFT
            entry = iotlb.get((did, vpn))
            if entry is None:
                entry = self._fill(source_id, ctx, addr, length, acc)
            if entry[1] & acc != acc:
                reason = FR_READ if acc & _READ and not entry[1] & _READ else FR_WRITE
                raise self._fault(source_id, reason, addr, length, acc, addr, fpd)
            if copy is not None:
                # One 4 KiB entry per unit IOTLB entry, so that the copy drops exactly what the unit drops.
                copy(vpn << PAGE_SHIFT, entry[0], PAGE_SIZE, entry[1])
            next_page = (vpn + 1) << PAGE_SHIFT
            n = (end if end < next_page else next_page) - addr
            pieces.append((entry[0] | (addr & _PAGE_OFFSET), n))
            addr += n
        return pieces

    def _fill(self, source_id: int, ctx: ContextCacheEntry, addr: int, length: int, acc: int) -> IotlbEntry:
        """IOTLB miss: walk the tables and cache the page's translation."""
        did, _tt, levels, slptptr, fpd = ctx
        try:
            leaf, shift, perm = self._walk(slptptr, levels, addr)
        except WalkError as exc:
            raise self._fault(source_id, exc.fault_reason, addr, length, acc, addr, fpd) from None
        if not perm:
            reason = FR_READ if acc & _READ else FR_WRITE
            raise self._fault(source_id, reason, addr, length, acc, addr, fpd)
        leaf_mask = (1 << shift) - 1
        leaf_start = addr & ~leaf_mask
        entry = (leaf + (addr & leaf_mask & PAGE_MASK), perm, leaf_start, leaf_start + (1 << shift))
        self.iotlb.insert(did, addr >> PAGE_SHIFT, entry)
        return entry

    def _load_context(self, source_id: int, addr: int, length: int, acc: int) -> ContextCacheEntry:
        """Context-cache miss: fetch and check the root and context entries (spec 9.1, 9.3)."""
        mem = self.memory

        def fault(reason: int, fpd: bool = False) -> DmarFault:
            return self._fault(source_id, reason, addr, length, acc, addr, fpd)

        if self.root_table is None:
            raise fault(FR_ROOT_TABLE_INVALID)
        try:
            root_addr = self.root_table + (source_id >> 8) * ENTRY_SIZE
            rlo, rhi = mem.read_u64(root_addr), mem.read_u64(root_addr + 8)
        except GuestMemoryError:
            raise fault(FR_ROOT_TABLE_INVALID) from None
        if not rlo & ROOT_P:
            raise fault(FR_ROOT_NOT_PRESENT)
        if rlo & ROOT_LO_RSVD or rhi & ROOT_HI_RSVD:
            raise fault(FR_ROOT_RSVD)
        try:
            ctx_addr = (rlo & ADDR_MASK) + (source_id & 0xFF) * ENTRY_SIZE
            clo, chi = mem.read_u64(ctx_addr), mem.read_u64(ctx_addr + 8)
        except GuestMemoryError:
            raise fault(FR_CONTEXT_TABLE_INVALID) from None
        ce = decode_context(clo, chi)
        # FPD is honoured even in a not-present context entry (spec 9.3).
        if not ce.present:
            raise fault(FR_CONTEXT_NOT_PRESENT, ce.fpd)
        if clo & CTX_LO_RSVD or chi & CTX_HI_RSVD:
            raise fault(FR_CONTEXT_RSVD)
        if ce.tt not in (TT_MULTI_LEVEL, TT_DEVICE_TLB, TT_PASS_THROUGH):
            # A translation type the unit does not support is invalid programming of the context entry
            # (3h); Dh is for translation requests the TT field blocks, and these requests are untranslated.
            raise fault(FR_CONTEXT_INVALID, ce.fpd)
        # AW must be a width SAGAW reports whatever the translation type (spec 9.3: with pass-through it
        # must name the largest one; fault reason 3h covers an AW the unit does not support).
        if ce.aw not in (AW_39, AW_48):
            raise fault(FR_CONTEXT_INVALID, ce.fpd)
        entry = (ce.did, ce.tt, aw_levels(ce.aw), ce.slptptr, ce.fpd)
        self.context_cache.entries[source_id] = entry
        return entry

    def _fault(
        self, source_id: int, reason: int, addr: int, length: int, acc: int, fault_addr: int, fpd: bool
    ) -> DmarFault:
        """Record a fault and build the exception for the requester."""
        # A request that writes at all is reported as a write (FRCD.T = 0);
        # a permission fault is reported with the direction that was denied.
        is_read = reason == FR_READ or (reason != FR_WRITE and not acc & _WRITE)
        recorded = self.faults.record(source_id, reason, fault_addr, is_read, fpd)
        return DmarFault(addr, length, Access(acc), source_id, reason, fault_addr, recorded)


class DmaTranslator(DmaTranslatorBase):
    """One requester's view of the IOMMU: an :class:`iovirt.memory.Translator`.

    ``memory.with_translator(unit.dma_translator(sid))`` gives a device an
    IOVA view of guest memory without the device knowing.  Its ``cache``
    holds the unit's IOTLB entries this device used, for domain ``did``
    (``None`` until the first translation); the accelerated ring hits it
    without the GIL, and ``fill`` (a miss) asks the unit.
    """

    def __init__(self, remapper: DmaRemapper, source_id: int) -> None:
        super().__init__(remapper, source_id)
        remapper.add_translator(self)

    def forget(self) -> None:
        """Drop every cached translation (the device's context or the unit's state changed)."""
        self.cache.invalidate_all()
        self.did = None


def implementations() -> dict[str, type]:
    """Every importable ``DmaTranslatorBase`` implementation by name (for tests)."""
    return _accel.implementations("iovirt.vtd._dma_c", _dma_py, "DmaTranslatorBase")
