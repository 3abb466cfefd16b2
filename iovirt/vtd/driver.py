"""A driver-side helper that programs a VT-d unit the way Linux's intel-iommu does.

Used by the tests and by the in-process platform; it only talks to the unit
through ``mmio_read``/``mmio_write`` and to guest memory, like a real
driver.  The sequence follows Linux ``drivers/iommu/intel/`` (``dmar.c``,
``iommu.c``, ``irq_remapping.c``):

1. ``init()``: queued invalidation (IQT=0, IQA, GCMD.QIE, wait for QIES) if
   ECAP.QI, else register-based invalidation; a root table (SRTP, wait for
   RTPS); global context-cache and IOTLB invalidation.
2. ``create_domain`` / ``attach``: a second-level page table per domain;
   context tables allocated per bus on demand; a device-selective
   context-cache flush after each context-entry change.
3. ``map`` (no flush needed for not-present -> present with CAP.CM=0) and
   ``unmap`` (page-selective IOTLB flush, plus device-IOTLB for ATS users).
4. ``enable_translation``: GCMD.TE, wait for TES.
5. ``setup_interrupt_remapping``: IRT, IRTA, SIRTP, global IEC flush, IRE,
   compatibility-format interrupts blocked unless asked for.

Guest memory for tables comes from a :class:`~iovirt.memory.BumpAllocator`.
The driver is a raising API: :class:`VtdDriverError` when the hardware
refuses or reports an invalidation-queue error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.vtd import regs as R
from iovirt.vtd.errors import VtdConfigError, VtdError
from iovirt.vtd.invalidation import (
    DESC_CONTEXT,
    DESC_DEVICE_IOTLB,
    DESC_DEVTLB_S,
    DESC_DID_SHIFT,
    DESC_FM_SHIFT,
    DESC_G_SHIFT,
    DESC_IEC,
    DESC_IEC_G_INDEX,
    DESC_IEC_IIDX_SHIFT,
    DESC_IEC_IM_SHIFT,
    DESC_IOTLB,
    DESC_SID_SHIFT,
    DESC_SIZE,
    DESC_WAIT,
    DESC_WAIT_SDATA_SHIFT,
    DESC_WAIT_SW,
)
from iovirt.vtd.irq import IrteFields, irte
from iovirt.vtd.tables import (
    AW_39,
    AW_48,
    CONTEXT_ENTRIES,
    ENTRY_SIZE,
    PTE_PERM,
    PTE_PS,
    PTE_R,
    PTE_W,
    TT_DEVICE_TLB,
    TT_MULTI_LEVEL,
    aw_levels,
    context_entry,
    pte,
    root_entry,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # PEP 692 **kwargs typing (typing.Unpack from 3.12)


class MmioTarget(Protocol):
    """The register interface the driver programs (a :class:`~iovirt.vtd.unit.VtdUnit`)."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class VtdDriverError(VtdError):
    """The hardware did not do what the driver asked; ``operation`` names the step."""

    def __init__(self, operation: str, detail: str) -> None:
        super().__init__(f"VT-d driver {operation}: {detail}")
        self.operation = operation
        self.detail = detail


@dataclass
class Domain:
    """A DMA-remapping domain: an id, a second-level page table and its devices."""

    did: int
    aw: int
    pgd: int
    devices: dict[int, int] = field(default_factory=dict)  # source id -> translation type

    @property
    def levels(self) -> int:
        """Page-table depth (3 for 39-bit, 4 for 48-bit)."""
        return aw_levels(self.aw)


_PAGE_SHIFTS = (30, 21, 12)  # 1 GiB, 2 MiB, 4 KiB leaves


class VtdDriver:
    """Programs a VT-d unit: root/context tables, page tables, invalidation, IR."""

    def __init__(
        self,
        unit: MmioTarget,
        memory: GuestMemory,
        allocator: BumpAllocator,
        *,
        queued_invalidation: bool = True,
        queue_order: int = 0,
    ) -> None:
        self.unit = unit
        self.memory = memory
        self.allocator = allocator
        self.cap = unit.mmio_read(R.CAP, 8)
        self.ecap = unit.mmio_read(R.ECAP, 8)
        self.use_qi = queued_invalidation and bool(self.ecap & R.ECAP_QI)
        self.queue_order = queue_order
        self.root_table = 0
        self.context_tables: dict[int, int] = {}
        self.domains: dict[int, Domain] = {}
        self.irt = 0
        self.irt_entries = 0
        self._gcmd = 0  # persistent GCMD bits, as Linux keeps iommu->gcmd
        self._queue = 0
        self._queue_entries = 0
        self._tail = 0
        self._status_addr = 0
        self._wait_seq = 0

    # -- bring-up ---------------------------------------------------------------
    def init(self) -> None:
        """Queued invalidation (if used), root table, global cache flushes."""
        if self.use_qi:
            self._enable_qi()
        self.root_table = self._alloc_zeroed(R.PAGE_SIZE)
        self.unit.mmio_write(R.RTADDR, 8, self.root_table)
        self._command(R.SRTP, R.SRTP, "set root table pointer")
        self.flush_context_global()
        self.flush_iotlb_global()

    def _enable_qi(self) -> None:
        self._queue_entries = 256 << self.queue_order
        self._queue = self._alloc_zeroed(R.PAGE_SIZE << self.queue_order)
        self._status_addr = self.allocator.alloc(4, 4)
        self.unit.mmio_write(R.IQT, 8, 0)
        self.unit.mmio_write(R.IQA, 8, self._queue | self.queue_order)
        self._tail = 0
        self._set_persistent(R.QIE, True, "enable queued invalidation")

    def enable_translation(self) -> None:
        """GCMD.TE: start remapping DMA."""
        self._set_persistent(R.TE, True, "enable translation")

    def disable_translation(self) -> None:
        """Clear GCMD.TE: DMA passes untranslated."""
        self._set_persistent(R.TE, False, "disable translation")

    def _set_persistent(self, bit: int, on: bool, what: str) -> None:
        self._gcmd = (self._gcmd | bit) if on else (self._gcmd & ~bit)
        self._command(0, bit if on else 0, what, mask=bit)

    def _command(self, one_shot: int, expect: int, what: str, mask: int | None = None) -> None:
        """Write GCMD (persistent bits plus ``one_shot``) and check GSTS took it."""
        self.unit.mmio_write(R.GCMD, 4, self._gcmd | one_shot)
        mask = expect if mask is None else mask
        if self.unit.mmio_read(R.GSTS, 4) & mask != expect:
            raise VtdDriverError(what, f"GSTS {self.unit.mmio_read(R.GSTS, 4):#x} does not show {mask:#x}")

    # -- domains and devices ------------------------------------------------------
    def create_domain(self, did: int, aw: int = AW_48) -> Domain:
        """A new domain with an empty second-level table of the given address width."""
        sagaw = (self.cap >> R.CAP_SAGAW_SHIFT) & 0x1F
        if aw not in (AW_39, AW_48) or not sagaw & (1 << aw):
            raise VtdConfigError("aw", aw, f"an AW the unit supports (SAGAW {sagaw:#x})")
        if did in self.domains:
            raise VtdConfigError("did", did, "an unused domain id")
        domain = Domain(did, aw, self._alloc_zeroed(R.PAGE_SIZE))
        self.domains[did] = domain
        return domain

    def attach(self, source_id: int, domain: Domain, tt: int = TT_MULTI_LEVEL, fpd: bool = False) -> None:
        """Point ``source_id``'s context entry at ``domain`` and flush its cached context."""
        for other in self.domains.values():
            other.devices.pop(source_id, None)
        lo, hi = context_entry(domain.pgd, domain.did, domain.aw, tt, fpd)
        self._write_context(source_id, lo, hi)
        domain.devices[source_id] = tt
        self.flush_context_device(source_id, domain.did)
        self.flush_iotlb_domain(domain)

    def detach(self, source_id: int) -> None:
        """Clear ``source_id``'s context entry (its DMA then faults) and flush."""
        for domain in self.domains.values():
            if domain.devices.pop(source_id, None) is not None:
                self._write_context(source_id, 0, 0)
                self.flush_context_device(source_id, domain.did)
                self.flush_iotlb_domain(domain)

    def _write_context(self, source_id: int, lo: int, hi: int) -> None:
        bus = source_id >> 8
        table = self.context_tables.get(bus)
        if table is None:
            table = self._alloc_zeroed(CONTEXT_ENTRIES * ENTRY_SIZE)
            self.context_tables[bus] = table
            rlo, rhi = root_entry(table)
            self.memory.write_u64(self.root_table + bus * ENTRY_SIZE + 8, rhi)
            self.memory.write_u64(self.root_table + bus * ENTRY_SIZE, rlo)
        addr = table + (source_id & 0xFF) * ENTRY_SIZE
        # The present bit lives in the low word: write it last (Linux does the same).
        self.memory.write_u64(addr, 0)
        self.memory.write_u64(addr + 8, hi)
        self.memory.write_u64(addr, lo)

    # -- page tables ------------------------------------------------------------------
    def map(self, domain: Domain, iova: int, gpa: int, size: int, perm: int = PTE_R | PTE_W) -> None:
        """Map ``[iova, iova+size)`` to ``gpa`` with the largest pages alignment allows.

        No flush: with CAP.CM=0 a not-present entry is never cached.  A
        changed present mapping needs :meth:`flush_iotlb` to take effect.
        """
        if (iova | gpa | size) & (R.PAGE_SIZE - 1):
            raise VtdDriverError("map", f"iova {iova:#x}, gpa {gpa:#x}, size {size:#x} must be 4 KiB aligned")
        sllps = (self.cap >> R.CAP_SLLPS_SHIFT) & 3
        while size:
            for shift in _PAGE_SHIFTS:
                level = (shift - 12) // 9 + 1
                if level > 1 and not sllps & (1 << (level - 2)):
                    continue
                page = 1 << shift
                if not (iova | gpa) & (page - 1) and size >= page:
                    break
            slot = self._slot(domain, iova, level, create=True)
            self.memory.write_u64(slot, pte(gpa, perm, large=level > 1))
            iova += page
            gpa += page
            size -= page

    def unmap(self, domain: Domain, iova: int, size: int, flush: bool = True) -> None:
        """Clear the leaves covering ``[iova, iova+size)`` and (by default) flush them."""
        start, end = iova, iova + size
        while iova < end:
            slot, shift = self._leaf_slot(domain, iova)
            if slot is None:
                iova = ((iova >> shift) + 1) << shift
                continue
            self.memory.write_u64(slot, 0)
            iova = ((iova >> shift) + 1) << shift
        if flush:
            self.flush_iotlb(domain, start, size)

    def pte_address(self, domain: Domain, iova: int) -> int | None:
        """Where the leaf entry translating ``iova`` lives (for tests that edit tables)."""
        return self._leaf_slot(domain, iova)[0]

    def _slot(self, domain: Domain, iova: int, leaf_level: int, create: bool) -> int:
        table = domain.pgd
        for level in range(domain.levels, leaf_level, -1):
            slot = table + ((iova >> (12 + 9 * (level - 1))) & 0x1FF) * 8
            entry = self.memory.read_u64(slot)
            if entry & PTE_PERM and entry & PTE_PS:
                raise VtdDriverError("map", f"{iova:#x} lies in a large page at level {level}; unmap it first")
            if not entry & PTE_PERM:
                nxt = self._alloc_zeroed(R.PAGE_SIZE)
                self.memory.write_u64(slot, pte(nxt, PTE_R | PTE_W))
                table = nxt
            else:
                table = entry & R.ADDR_MASK
        return table + ((iova >> (12 + 9 * (leaf_level - 1))) & 0x1FF) * 8

    def _leaf_slot(self, domain: Domain, iova: int) -> tuple[int | None, int]:
        table = domain.pgd
        for level in range(domain.levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            slot = table + ((iova >> shift) & 0x1FF) * 8
            entry = self.memory.read_u64(slot)
            if not entry & PTE_PERM:
                return None, shift
            if level == 1 or entry & PTE_PS:
                return slot, shift
            table = entry & R.ADDR_MASK
        raise AssertionError("unreachable: level 1 always returns")

    # -- invalidation -----------------------------------------------------------------
    def flush_context_global(self) -> None:
        """Invalidate the whole context cache."""
        self._flush_context(R.CC_GLOBAL, 0, 0)

    def flush_context_device(self, source_id: int, did: int) -> None:
        """Invalidate the cached context entry of ``source_id``."""
        self._flush_context(R.CC_DEVICE, did, source_id)

    def _flush_context(self, granularity: int, did: int, sid: int) -> None:
        if self.use_qi:
            self.submit((DESC_CONTEXT | granularity << DESC_G_SHIFT | did << DESC_DID_SHIFT
                         | sid << DESC_SID_SHIFT | 0 << DESC_FM_SHIFT, 0))
            return
        self.unit.mmio_write(R.CCMD, 8, R.CCMD_ICC | granularity << R.CCMD_CIRG_SHIFT
                             | sid << R.CCMD_SID_SHIFT | did)
        ccmd = self.unit.mmio_read(R.CCMD, 8)
        if ccmd & R.CCMD_ICC or not (ccmd >> R.CCMD_CAIG_SHIFT) & 3:
            raise VtdDriverError("context-cache invalidation", f"CCMD reads {ccmd:#x}")

    def flush_iotlb_global(self) -> None:
        """Invalidate the whole IOTLB."""
        self._flush_iotlb(R.IOTLB_GLOBAL, 0, 0, 0)

    def flush_iotlb_domain(self, domain: Domain) -> None:
        """Invalidate ``domain``'s IOTLB entries."""
        self._flush_iotlb(R.IOTLB_DOMAIN, domain.did, 0, 0)

    def flush_iotlb(self, domain: Domain, iova: int, size: int) -> int:
        """Page-selective flush of ``[iova, iova+size)`` (domain-wide when too large).

        Like Linux's ``iommu_flush_iotlb_psi``: the smallest aligned 2^AM-page
        block covering the range; ATS users also get a device-IOTLB flush.
        Returns the granularity the hardware reports (register interface)
        or the one requested (queued).
        """
        first, last = iova >> 12, (iova + max(size, 1) - 1) >> 12
        am = 0
        while first >> am != last >> am:
            am += 1
        mamv = (self.cap >> R.CAP_MAMV_SHIFT) & 0x3F
        if not self.cap & R.CAP_PSI or am > mamv:
            granularity = self._flush_iotlb(R.IOTLB_DOMAIN, domain.did, 0, 0)
        else:
            granularity = self._flush_iotlb(R.IOTLB_PAGE, domain.did, (first >> am) << am << 12, am)
        if self.use_qi:
            for sid, tt in domain.devices.items():
                if tt == TT_DEVICE_TLB:
                    self._flush_device_iotlb(sid, (first >> am) << am << 12, am)
        return granularity

    def _flush_iotlb(self, granularity: int, did: int, addr: int, am: int) -> int:
        if self.use_qi:
            self.submit((DESC_IOTLB | granularity << DESC_G_SHIFT | did << DESC_DID_SHIFT, addr | am))
            return granularity
        self.unit.mmio_write(R.IVA, 8, addr | am)
        self.unit.mmio_write(R.IOTLB, 8, R.IOTLB_IVT | granularity << R.IOTLB_IIRG_SHIFT
                             | did << R.IOTLB_DID_SHIFT)
        value = self.unit.mmio_read(R.IOTLB, 8)
        actual = (value >> R.IOTLB_IAIG_SHIFT) & 3
        if value & R.IOTLB_IVT or not actual:
            raise VtdDriverError("IOTLB invalidation", f"IOTLB register reads {value:#x}")
        return actual

    def _flush_device_iotlb(self, sid: int, addr: int, am: int) -> None:
        # PCIe ATS size encoding: S=1 and the address bits below the size set to 1.
        if am:
            hi = addr | ((1 << (12 + am - 1)) - 1) & ~0xFFF | DESC_DEVTLB_S
        else:
            hi = addr
        self.submit((DESC_DEVICE_IOTLB | sid << DESC_SID_SHIFT, hi))

    def submit(self, *descriptors: tuple[int, int]) -> None:
        """Queue descriptors plus a wait with status write; check it completed.

        Raises :class:`VtdDriverError` when the queue is not enabled, is
        full, or the hardware reports IQE.
        """
        if not self.use_qi:
            raise VtdDriverError("submit", "queued invalidation is not enabled")
        self._wait_seq = (self._wait_seq + 1) & 0xFFFFFFFF
        wait = (DESC_WAIT | DESC_WAIT_SW | self._wait_seq << DESC_WAIT_SDATA_SHIFT, self._status_addr)
        batch = list(descriptors) + [wait]
        head = (self.unit.mmio_read(R.IQH, 8) >> R.IQ_INDEX_SHIFT) % self._queue_entries
        free = (head - self._tail - 1) % self._queue_entries
        if len(batch) > free:
            raise VtdDriverError("submit", f"{len(batch)} descriptors do not fit; {free} free")
        for lo, hi in batch:
            slot = self._queue + self._tail * DESC_SIZE
            self.memory.write_u64(slot, lo)
            self.memory.write_u64(slot + 8, hi)
            self._tail = (self._tail + 1) % self._queue_entries
        self.unit.mmio_write(R.IQT, 8, self._tail << R.IQ_INDEX_SHIFT)
        if self.unit.mmio_read(R.FSTS, 4) & R.FSTS_IQE:
            raise VtdDriverError("submit", f"invalidation queue error at IQH {self.unit.mmio_read(R.IQH, 8):#x}")
        if self.memory.read_u32(self._status_addr) != self._wait_seq:
            raise VtdDriverError("submit", "invalidation wait descriptor did not complete")

    # -- interrupt remapping ------------------------------------------------------------
    def setup_interrupt_remapping(self, size_order: int = 7, allow_compat: bool = False) -> None:
        """Allocate an IRT of 2^(size_order+1) entries, latch it, flush the IEC, enable IR."""
        if not self.ecap & R.ECAP_IR or not self.use_qi:
            raise VtdDriverError("interrupt remapping", "needs ECAP.IR and queued invalidation")
        self.irt_entries = 2 << size_order
        self.irt = self._alloc_zeroed(self.irt_entries * 16)
        self.unit.mmio_write(R.IRTA, 8, self.irt | size_order)
        self._command(R.SIRTP, R.SIRTP, "set interrupt remap table pointer")
        self.submit((DESC_IEC, 0))
        self._set_persistent(R.IRE, True, "enable interrupt remapping")
        self._set_persistent(R.CFI, allow_compat, "set compatibility format interrupts")

    def set_irte(self, index: int, vector: int, dest: int, **fields: Unpack[IrteFields]) -> None:
        """Write IRTE ``index`` (see :func:`iovirt.vtd.irq.irte` for ``fields``) and flush it."""
        lo, hi = irte(vector, dest, **fields)
        self.write_irte(index, lo, hi)

    def write_irte(self, index: int, lo: int, hi: int) -> None:
        """Write a raw IRTE and invalidate its interrupt-entry-cache slot."""
        if not 0 <= index < self.irt_entries:
            raise VtdDriverError("set IRTE", f"index {index} is outside the {self.irt_entries}-entry table")
        addr = self.irt + index * 16
        self.memory.write_u64(addr + 8, hi)
        self.memory.write_u64(addr, lo)
        self.submit((DESC_IEC | DESC_IEC_G_INDEX | index << DESC_IEC_IIDX_SHIFT | 0 << DESC_IEC_IM_SHIFT, 0))

    # -- helpers ------------------------------------------------------------------------
    def _alloc_zeroed(self, size: int) -> int:
        addr = self.allocator.alloc(size, R.PAGE_SIZE)
        self.memory.fill(addr, size)
        return addr
