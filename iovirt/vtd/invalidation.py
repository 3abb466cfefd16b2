"""Cache invalidation: register-based (CCMD, IVA/IOTLB) and queued (IQA/IQH/IQT).

VT-d spec 6.5.1 (register-based) and 6.5.2 (queued invalidation).  Both
interfaces end in the same cache operations, :func:`invalidate_context` and
:func:`invalidate_iotlb`, which return the granularity actually performed
(reported back in CCMD.CAIG / IOTLB.IAIG).

The invalidation queue is a ring of 128-bit descriptors in guest memory.
Writing IQT makes the hardware fetch from IQH up to IQT; a descriptor it
cannot read or does not accept (unknown type, reserved bits, bad
granularity), or a tail beyond the queue, sets FSTS.IQE and stops the queue
with IQH on the offending descriptor until software clears IQE.
"""

from __future__ import annotations

import logging
from typing import Callable

from iovirt.memory import GuestMemory, GuestMemoryError
from iovirt.vtd.caches import ContextCache, InterruptEntryCache, Iotlb
from iovirt.vtd.events import EventInterrupt
from iovirt.vtd.faults import FaultRecorder
from iovirt.vtd.regfile import RegisterFile
from iovirt.vtd.regs import (
    ADDR_MASK,
    CC_DEVICE,
    CC_DOMAIN,
    CC_GLOBAL,
    CCMD,
    CCMD_CAIG_SHIFT,
    CCMD_CIRG_SHIFT,
    CCMD_FM_SHIFT,
    CCMD_ICC,
    CCMD_SID_SHIFT,
    FSTS,
    FSTS_IQE,
    GSTS,
    ICS,
    ICS_IWC,
    IOTLB,
    IOTLB_DID_SHIFT,
    IOTLB_DOMAIN,
    IOTLB_GLOBAL,
    IOTLB_IAIG_SHIFT,
    IOTLB_IIRG_SHIFT,
    IOTLB_IVT,
    IOTLB_PAGE,
    IQ_INDEX_MASK,
    IQ_INDEX_SHIFT,
    IQA,
    IQA_QS_MASK,
    IQH,
    IQT,
    IVA,
    IVA_AM_MASK,
    MAMV,
    PAGE_MASK,
    QIE,
)

log = logging.getLogger(__name__)

#: A device-IOTLB listener gets (source_id, iova, size) for each device-TLB invalidation.
DeviceIotlbListener = Callable[[int, int, int], None]

# -- descriptor types and fields (spec 6.5.2.1-6.5.2.8) -----------------------------
DESC_CONTEXT = 1
DESC_IOTLB = 2
DESC_DEVICE_IOTLB = 3
DESC_IEC = 4
DESC_WAIT = 5
DESC_SIZE = 16
DESC_G_SHIFT = 4
DESC_DID_SHIFT = 16
DESC_SID_SHIFT = 32
DESC_FM_SHIFT = 48
DESC_IEC_G_INDEX = 1 << 4
DESC_IEC_IM_SHIFT = 27
DESC_IEC_IIDX_SHIFT = 32
DESC_WAIT_IF = 1 << 4
DESC_WAIT_SW = 1 << 5
DESC_WAIT_FN = 1 << 6
DESC_WAIT_SDATA_SHIFT = 32
DESC_DEVTLB_S = 1 << 0
#: Reserved bits per descriptor type: (lo, hi).  Type bits 11:9 (the high
#: part of the type in 256-bit/scalable formats) are reserved in every type.
_DESC_RSVD = {
    DESC_CONTEXT: (0xFFC0 | 0xFFFC << 48, (1 << 64) - 1),
    DESC_IOTLB: (0xFF00 | 0xFFFFFFFF << 32, 0xF80),
    DESC_DEVICE_IOTLB: (0xFF0 | 0x7FF << 21 | 0xF << 48, 0xFFE),
    DESC_IEC: (0x7FFFFE0 | 0xFFFF << 48, (1 << 64) - 1),
    DESC_WAIT: (0xFFFFFF80, 0x3),
}


def invalidate_context(cache: ContextCache, granularity: int, did: int, sid: int, fm: int) -> int:
    """Context-cache invalidation; returns the granularity performed (0: rejected)."""
    if granularity == CC_GLOBAL:
        cache.invalidate_global()
    elif granularity == CC_DOMAIN:
        cache.invalidate_domain(did)
    elif granularity == CC_DEVICE:
        cache.invalidate_device(sid, fm)
    else:
        return 0
    return granularity


def invalidate_iotlb(iotlb: Iotlb, granularity: int, did: int, addr: int, am: int) -> int:
    """IOTLB invalidation; returns the granularity performed (0: rejected).

    A page-selective request with AM above CAP.MAMV is performed as
    domain-selective, the coarser granularity the spec lets hardware choose.
    """
    if granularity == IOTLB_GLOBAL:
        iotlb.invalidate_global()
    elif granularity == IOTLB_DOMAIN or (granularity == IOTLB_PAGE and am > MAMV):
        iotlb.invalidate_domain(did)
        return IOTLB_DOMAIN
    elif granularity == IOTLB_PAGE:
        iotlb.invalidate_pages(did, addr, am)
    else:
        return 0
    return granularity


def ccmd_written(regs: RegisterFile, cache: ContextCache) -> None:
    """CCMD with ICC set: invalidate, report CAIG, clear ICC (spec 11.4.7.1)."""
    value = regs[CCMD]
    if not value & CCMD_ICC:
        return
    actual = invalidate_context(
        cache,
        (value >> CCMD_CIRG_SHIFT) & 3,
        value & 0xFFFF,
        (value >> CCMD_SID_SHIFT) & 0xFFFF,
        (value >> CCMD_FM_SHIFT) & 3,
    )
    if not actual:
        log.warning("VT-d CCMD %#x: reserved invalidation granularity; request ignored", value)
    regs[CCMD] = (value & ~CCMD_ICC & ~(3 << CCMD_CAIG_SHIFT)) | actual << CCMD_CAIG_SHIFT


def iotlb_written(regs: RegisterFile, iotlb: Iotlb) -> None:
    """IOTLB register with IVT set: invalidate, report IAIG, clear IVT (spec 11.4.8.1)."""
    value = regs[IOTLB]
    if not value & IOTLB_IVT:
        return
    iva = regs[IVA]
    actual = invalidate_iotlb(
        iotlb,
        (value >> IOTLB_IIRG_SHIFT) & 3,
        (value >> IOTLB_DID_SHIFT) & 0xFFFF,
        iva & PAGE_MASK,
        iva & IVA_AM_MASK,
    )
    if not actual:
        log.warning("VT-d IOTLB register %#x: reserved invalidation granularity; request ignored", value)
    regs[IOTLB] = (value & ~IOTLB_IVT & ~(3 << IOTLB_IAIG_SHIFT)) | actual << IOTLB_IAIG_SHIFT


class InvalidationQueue:
    """The queued-invalidation engine (spec 6.5.2) over a queue in guest memory."""

    def __init__(
        self,
        regs: RegisterFile,
        memory: GuestMemory,
        context_cache: ContextCache,
        iotlb: Iotlb,
        iec: InterruptEntryCache,
        faults: FaultRecorder,
        completion: EventInterrupt,
        device_iotlb_listeners: list[DeviceIotlbListener],
    ) -> None:
        self._regs = regs
        self._memory = memory
        self._context_cache = context_cache
        self._iotlb = iotlb
        self._iec = iec
        self._faults = faults
        self._completion = completion
        self._listeners = device_iotlb_listeners

    def process(self) -> None:
        """Fetch and execute descriptors from IQH up to IQT (if QI is on and IQE clear)."""
        regs = self._regs
        if not regs[GSTS] & QIE or regs[FSTS] & FSTS_IQE:
            return
        iqa = regs[IQA]
        base = iqa & ADDR_MASK
        entries = 256 << (iqa & IQA_QS_MASK)
        tail = (regs[IQT] & IQ_INDEX_MASK) >> IQ_INDEX_SHIFT
        if tail >= entries:
            log.warning("VT-d IQT index %d is beyond the %d-entry queue: IQE", tail, entries)
            self._faults.raise_status(FSTS_IQE)
            return
        head = ((regs[IQH] & IQ_INDEX_MASK) >> IQ_INDEX_SHIFT) % entries
        while head != tail:
            addr = base + head * DESC_SIZE
            try:
                lo = self._memory.read_u64(addr)
                hi = self._memory.read_u64(addr + 8)
                ok = self._execute(lo, hi)
            except GuestMemoryError as exc:
                log.warning("VT-d invalidation descriptor %d at %#x: %s", head, addr, exc)
                ok = False
            if not ok:
                # IQH stays on the descriptor that failed (spec 6.5.2.10).
                regs[IQH] = head << IQ_INDEX_SHIFT
                self._faults.raise_status(FSTS_IQE)
                return
            head = (head + 1) % entries
            regs[IQH] = head << IQ_INDEX_SHIFT

    def _execute(self, lo: int, hi: int) -> bool:
        kind = lo & 0xF
        rsvd = _DESC_RSVD.get(kind)
        if rsvd is None or lo & rsvd[0] or hi & rsvd[1]:
            log.warning("VT-d invalidation descriptor (%#018x, %#018x): unknown type or reserved "
                        "bits set", lo, hi)
            return False
        granularity = (lo >> DESC_G_SHIFT) & 3
        did = (lo >> DESC_DID_SHIFT) & 0xFFFF
        if kind == DESC_CONTEXT:
            return bool(invalidate_context(
                self._context_cache, granularity, did,
                (lo >> DESC_SID_SHIFT) & 0xFFFF, (lo >> DESC_FM_SHIFT) & 3,
            ))
        if kind == DESC_IOTLB:
            return bool(invalidate_iotlb(self._iotlb, granularity, did, hi & PAGE_MASK, hi & IVA_AM_MASK))
        if kind == DESC_DEVICE_IOTLB:
            self._device_iotlb(lo, hi)
            return True
        if kind == DESC_IEC:
            if lo & DESC_IEC_G_INDEX:
                self._iec.invalidate_index((lo >> DESC_IEC_IIDX_SHIFT) & 0xFFFF, (lo >> DESC_IEC_IM_SHIFT) & 0x1F)
            else:
                self._iec.invalidate_global()
            return True
        return self._wait(lo, hi)

    def _device_iotlb(self, lo: int, hi: int) -> None:
        """Forward a device-TLB invalidation to the devices' ATS caches (spec 6.5.2.5).

        With S set, the lowest clear address bit at or above bit 12 encodes
        the size (PCIe ATS invalidate-request encoding).
        """
        sid = (lo >> DESC_SID_SHIFT) & 0xFFFF
        addr = hi & PAGE_MASK & ((1 << 64) - 1)
        size = 1 << 12
        if hi & DESC_DEVTLB_S:
            bit = 12
            while bit < 63 and addr >> bit & 1:
                bit += 1
            size = 1 << (bit + 1)
            addr &= ~(size - 1)
        for listener in list(self._listeners):
            listener(sid, addr, size)

    def _wait(self, lo: int, hi: int) -> bool:
        """Invalidation wait: status write and/or completion interrupt (spec 6.5.2.8)."""
        if lo & DESC_WAIT_SW:
            self._memory.write_u32(hi & ~0x3, lo >> DESC_WAIT_SDATA_SHIFT)
        if lo & DESC_WAIT_IF:
            regs = self._regs
            # No new interrupt while an earlier completion is still unserviced.
            if not regs[ICS] & ICS_IWC:
                regs[ICS] |= ICS_IWC
                self._completion.fire()
        return True
