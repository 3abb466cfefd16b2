"""One VT-d DMA-remapping hardware unit: the register interface tying the parts together.

The unit owns the register file (:mod:`~iovirt.vtd.regfile`), the DMA
remapper with its caches (:mod:`~iovirt.vtd.dma`), the interrupt remapper
(:mod:`~iovirt.vtd.irq`), fault logging (:mod:`~iovirt.vtd.faults`) and the
invalidation interfaces (:mod:`~iovirt.vtd.invalidation`), and dispatches
MMIO writes to them.  GCMD/GSTS follow spec 11.4.4-11.4.5: one-shot commands
(SRTP, SIRTP, WBF) act each time they are written as 1; TE, QIE, IRE and CFI
take the written value as the new state, mirrored in GSTS.

Tables and the invalidation queue are read through ``memory``, the
untranslated guest-physical memory.  Nothing a guest writes makes
:meth:`VtdUnit.mmio_write` raise: bad values end as faults, IQE, or a
logged, ignored access.
"""

from __future__ import annotations

import logging

from iovirt.errors import IovirtError
from iovirt.memory import Access, GuestMemory
from iovirt.vtd import regs as R
from iovirt.vtd.dma import DmaRemapper, DmaTranslator
from iovirt.vtd.errors import VtdConfigError
from iovirt.vtd.events import EventInterrupt, MsiSink
from iovirt.vtd.faults import FaultRecorder
from iovirt.vtd.invalidation import (
    DeviceIotlbListener,
    InvalidationQueue,
    ccmd_written,
    iotlb_written,
)
from iovirt.vtd.irq import InterruptRemapper
from iovirt.vtd.regfile import RegisterFile, RegSpec, RegWrite

log = logging.getLogger(__name__)

U32 = 0xFFFFFFFF
MMIO_SIZE = 0x1000


def register_specs(num_fault_records: int) -> list[RegSpec]:
    """The register layout of a unit with ``num_fault_records`` FRCD registers."""
    specs = [
        RegSpec("VER", R.VER, 4, R.VER_VALUE),
        RegSpec("CAP", R.CAP, 8, R.cap_value(num_fault_records)),
        RegSpec("ECAP", R.ECAP, 8, R.ECAP_VALUE),
        RegSpec("GCMD", R.GCMD, 4, rw=U32),
        RegSpec("GSTS", R.GSTS, 4),
        RegSpec("RTADDR", R.RTADDR, 8, rw=R.ADDR_MASK),
        RegSpec("CCMD", R.CCMD, 8, rw=R.CCMD_ICC | 3 << R.CCMD_CIRG_SHIFT | 3 << R.CCMD_FM_SHIFT | U32),
        RegSpec("FSTS", R.FSTS, 4, w1c=R.FSTS_W1C),
        RegSpec("FECTL", R.FECTL, 4, R.CTL_IM, rw=R.CTL_IM),
        RegSpec("FEDATA", R.FEDATA, 4, rw=0xFFFF),
        RegSpec("FEADDR", R.FEADDR, 4, rw=U32 & ~3),
        RegSpec("FEUADDR", R.FEUADDR, 4, rw=U32),
        RegSpec("IQH", R.IQH, 8),
        RegSpec("IQT", R.IQT, 8, rw=R.IQ_INDEX_MASK),
        RegSpec("IQA", R.IQA, 8, rw=R.ADDR_MASK | R.IQA_QS_MASK),
        RegSpec("ICS", R.ICS, 4, w1c=R.ICS_IWC),
        RegSpec("IECTL", R.IECTL, 4, R.CTL_IM, rw=R.CTL_IM),
        RegSpec("IEDATA", R.IEDATA, 4, rw=0xFFFF),
        RegSpec("IEADDR", R.IEADDR, 4, rw=U32 & ~3),
        RegSpec("IEUADDR", R.IEUADDR, 4, rw=U32),
        RegSpec("IRTA", R.IRTA, 8, rw=R.ADDR_MASK | R.IRTA_S_MASK),
        RegSpec("IVA", R.IVA, 8, rw=R.ADDR_MASK | R.IVA_IH | R.IVA_AM_MASK),
        RegSpec("IOTLB", R.IOTLB, 8,
                rw=R.IOTLB_IVT | 3 << R.IOTLB_IIRG_SHIFT | R.IOTLB_DR | R.IOTLB_DW | 0xFFFF << R.IOTLB_DID_SHIFT),
    ]
    for i in range(num_fault_records):
        specs.append(RegSpec(f"FRCD{i}_LO", R.FRCD + 16 * i, 8))
        specs.append(RegSpec(f"FRCD{i}_HI", R.FRCD + 16 * i + 8, 8, w1c=R.FRCD_HI_F))
    return specs


class VtdUnit:
    """A VT-d remapping unit in legacy (non-scalable) mode.

    ``memory`` is guest-physical memory (tables, queue, status writes);
    ``msi_sink`` receives the fault and invalidation-completion event
    interrupts, sent with ``source_id`` (the unit's own requester id).
    """

    def __init__(
        self,
        memory: GuestMemory,
        msi_sink: MsiSink | None = None,
        *,
        num_fault_records: int = 8,
        iotlb_capacity: int = 4096,
        source_id: int = 0,
    ) -> None:
        if not 1 <= num_fault_records <= 256:
            raise VtdConfigError("num_fault_records", num_fault_records, "1..256")
        self.memory = memory
        self.regs = RegisterFile(register_specs(num_fault_records))
        self.fault_event = EventInterrupt(self.regs, R.FECTL, R.FEDATA, R.FEADDR, R.FEUADDR, msi_sink, source_id)
        self.completion_event = EventInterrupt(
            self.regs, R.IECTL, R.IEDATA, R.IEADDR, R.IEUADDR, msi_sink, source_id
        )
        self.faults = FaultRecorder(self.regs, num_fault_records, self.fault_event)
        self.dma = DmaRemapper(memory, self.faults, iotlb_capacity)
        self.irq = InterruptRemapper(memory, self.faults)
        self.device_iotlb_listeners: list[DeviceIotlbListener] = []
        self.queue = InvalidationQueue(
            self.regs, memory, self.dma.context_cache, self.dma.iotlb, self.irq.iec,
            self.faults, self.completion_event, self.device_iotlb_listeners,
        )
        self._lock = self.faults.lock
        self._handlers = {
            R.GCMD: self._gcmd_written,
            R.CCMD: self._ccmd_written,
            R.IOTLB: self._iotlb_written,
            R.FSTS: self._fsts_written,
            R.FECTL: lambda w: self.fault_event.ctl_written(),
            R.ICS: self._ics_written,
            R.IECTL: lambda w: self.completion_event.ctl_written(),
            R.IQT: lambda w: self.queue.process(),
        }
        for i in range(num_fault_records):
            self._handlers[R.FRCD + 16 * i + 8] = lambda w: self.faults.serviced()

    # -- software (driver) side ------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        """A 32- or 64-bit register read at ``offset`` in the unit's 4 KiB MMIO page."""
        with self._lock:
            return self.regs.read(offset, size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """A 32- or 64-bit register write; its effects happen before this returns."""
        with self._lock:
            for write in self.regs.write(offset, size, value):
                handler = self._handlers.get(write.spec.offset)
                if handler is None:
                    continue
                try:
                    handler(write)
                except IovirtError as exc:  # defensive: guest input must not escape
                    log.error("VT-d write of %#x to %s failed: %s", value, write.spec.name, exc)

    def reset(self) -> None:
        """Power-on state: registers at reset values, caches empty, remapping off."""
        with self._lock:
            self.regs.reset()
            self.faults.reset()
            self.dma.context_cache.invalidate_global()
            self.dma.iotlb.invalidate_global()
            self.irq.iec.invalidate_global()
            self.dma.enabled = False
            self.dma.root_table = None
            self.irq.enabled = self.irq.compat_allowed = False
            self.irq.table = None
            self.irq.table_entries = 0

    # -- device side -------------------------------------------------------------------
    def dma_translator(self, source_id: int) -> DmaTranslator:
        """A :class:`iovirt.memory.Translator` for DMA from ``source_id`` (bus<<8 | devfn)."""
        return DmaTranslator(self.dma, source_id)

    def translate(self, source_id: int, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        """Translate one DMA request; raises :class:`~iovirt.vtd.faults.DmarFault` when blocked."""
        return self.dma.translate(source_id, addr, length, access)

    def remap_msi(self, source_id: int, address: int, data: int) -> tuple[int, int] | None:
        """Remap an MSI write: a compatibility-format ``(address, data)``, or ``None`` if blocked."""
        with self._lock:
            return self.irq.remap_msi(source_id, address, data)

    def add_device_iotlb_listener(self, listener: DeviceIotlbListener) -> None:
        """Call ``listener(source_id, iova, size)`` on each device-IOTLB invalidation descriptor."""
        self.device_iotlb_listeners.append(listener)

    # -- register write effects --------------------------------------------------------
    def _gcmd_written(self, write: RegWrite) -> None:
        regs = self.regs
        cmd = write.new
        regs[R.GCMD] = 0  # a command register: it holds nothing between writes
        old = regs[R.GSTS]
        status = (old & ~R.GCMD_PERSISTENT) | (cmd & R.GCMD_PERSISTENT)
        if cmd & R.SRTP:
            rtaddr = regs[R.RTADDR]
            self.dma.root_table = rtaddr & R.ADDR_MASK
            status |= R.SRTP
        if cmd & R.SIRTP:
            irta = regs[R.IRTA]
            self.irq.table = irta & R.ADDR_MASK
            self.irq.table_entries = 2 << (irta & R.IRTA_S_MASK)
            status |= R.SIRTP
        if cmd & (R.SFL | R.EAFL):
            log.warning("VT-d GCMD %#x: advanced fault logging is not supported (CAP.AFL=0); ignored", cmd)
        # WBF completes at once (CAP.RWBF=0: no write buffer), so WBFS reads 0.
        if (old ^ status) & R.QIE:
            # Spec 11.4.10 (IQH): QH is 0 whenever queued invalidation is disabled, so it is reset when
            # QI is turned off and fetching starts from entry 0 when it is turned on.
            regs[R.IQH] = 0
        regs[R.GSTS] = status
        self.dma.enabled = bool(status & R.TE)
        self.irq.enabled = bool(status & R.IRE)
        self.irq.compat_allowed = bool(status & R.CFI)
        if status & R.QIE and not old & R.QIE:
            self.queue.process()

    def _ccmd_written(self, write: RegWrite) -> None:
        if self._qi_blocks_register_invalidation("CCMD"):
            self.regs[R.CCMD] &= ~R.CCMD_ICC
            return
        ccmd_written(self.regs, self.dma.context_cache)

    def _iotlb_written(self, write: RegWrite) -> None:
        if self._qi_blocks_register_invalidation("IOTLB"):
            self.regs[R.IOTLB] &= ~R.IOTLB_IVT
            return
        iotlb_written(self.regs, self.dma.iotlb)

    def _qi_blocks_register_invalidation(self, name: str) -> bool:
        # Spec 6.5.2: with QI enabled, register-based invalidation must not be used.
        if self.regs[R.GSTS] & R.QIE:
            log.warning("VT-d %s invalidation while queued invalidation is enabled; ignored", name)
            return True
        return False

    def _fsts_written(self, write: RegWrite) -> None:
        self.faults.serviced()
        if write.old & R.FSTS_IQE and not write.new & R.FSTS_IQE:
            self.queue.process()  # IQE cleared: the queue resumes at IQH

    def _ics_written(self, write: RegWrite) -> None:
        if not write.new & R.ICS_IWC:
            self.completion_event.clear_pending()
