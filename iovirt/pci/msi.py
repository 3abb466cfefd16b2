"""MSI (PCI 3.0 §6.8.1) and the seam every message-signalled interrupt goes through.

:class:`MsiSink` is the interface between a PCI function and whatever
receives its messages: the VT-d interrupt-remapping unit, or the virtual
LAPICs directly.  A function computes ``(address, data)`` from its MSI or
MSI-X registers and calls ``deliver_msi(source_id, address, data)`` with its
requester ID (``bus << 8 | dev << 3 | fn``), which interrupt remapping needs
to check the message's source.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from iovirt.pci.capability import Capability
from iovirt.pci.errors import PciLayoutError
from iovirt.pci.regs import (
    PCI_CAP_ID_MSI,
    PCI_MSI_FLAGS,
    PCI_MSI_FLAGS_64BIT,
    PCI_MSI_FLAGS_ENABLE,
    PCI_MSI_FLAGS_MASKBIT,
    PCI_MSI_FLAGS_QSIZE,
)

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction

log = logging.getLogger(__name__)


class MsiSink(Protocol):
    """Receives message-signalled interrupts (an MSI is a DWORD memory write)."""

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        """Deliver the message ``data`` written to ``address`` by requester ``source_id``."""
        ...


class MsiCapability(Capability):
    """The MSI capability: 1-32 vectors, 32- or 64-bit address, optional per-vector masking.

    ``MsiCapability(vectors=1, *, addr64=True, per_vector_mask=False)``.
    The driver enables ``2**MME`` vectors (Multiple Message Enable); vector
    ``n`` is sent with the low ``MME`` bits of Message Data replaced by ``n``.
    With per-vector masking, a vector raised while its Mask bit is set latches
    its Pending bit and is sent when the driver clears the Mask bit.
    """

    cap_id = PCI_CAP_ID_MSI

    def __init__(self, vectors: int = 1, *, addr64: bool = True, per_vector_mask: bool = False) -> None:
        super().__init__()
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise PciLayoutError(f"MSI vector count {vectors} is not a power of two in 1-32")
        self.vectors = vectors
        self.addr64 = addr64
        self.per_vector_mask = per_vector_mask
        # PCI 3.0 Figure 6-9: the four layouts.
        self.data_reg = 0x0C if addr64 else 0x08
        self.mask_reg = self.data_reg + 4
        self.pending_reg = self.data_reg + 8
        self.size = (self.pending_reg + 4) if per_vector_mask else (self.data_reg + 2)

    def install(self, function: PciFunction, offset: int) -> None:
        super().install(function, offset)
        cfg = function.config
        mmc = self.vectors.bit_length() - 1
        flags = mmc << 1
        flags |= PCI_MSI_FLAGS_64BIT if self.addr64 else 0
        flags |= PCI_MSI_FLAGS_MASKBIT if self.per_vector_mask else 0
        cfg.init(offset + PCI_MSI_FLAGS, 2, flags, PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE)
        # Message Address bits 1:0 are reserved and read 0 (DWORD aligned).
        cfg.init(offset + 4, 4, 0, 0xFFFFFFFC)
        if self.addr64:
            cfg.init(offset + 8, 4, 0, 0xFFFFFFFF)
        cfg.init(offset + self.data_reg, 2, 0, 0xFFFF)
        if self.per_vector_mask:
            cfg.init(offset + self.mask_reg, 4, 0, (1 << self.vectors) - 1)
            cfg.init(offset + self.pending_reg, 4, 0)
            cfg.add_hook(offset + self.mask_reg, 4, self)
        function.msi = self

    @property
    def enabled(self) -> bool:
        """MSI Enable."""
        assert self.function is not None
        return bool(self.function.config.get(self.offset + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """``2**MME``, capped at the vectors the function requested (MMC)."""
        assert self.function is not None
        mme = (self.function.config.get(self.offset + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_QSIZE) >> 4
        return min(1 << mme, self.vectors)

    def message(self, vector: int) -> tuple[int, int]:
        """The ``(address, data)`` vector ``vector`` is sent with."""
        assert self.function is not None
        cfg = self.function.config
        base = self.offset
        address = cfg.get(base + 4, 4)
        if self.addr64:
            address |= cfg.get(base + 8, 4) << 32
        data = cfg.get(base + self.data_reg, 2)
        return address, (data & ~(self.enabled_vectors - 1)) | vector

    def notify(self, vector: int) -> None:
        """Raise ``vector``: send it, or latch Pending if masked.  No-op while MSI is disabled."""
        function = self.function
        assert function is not None
        if not self.enabled:
            log.debug("%s: MSI vector %d raised while MSI is disabled", function, vector)
            return
        if not 0 <= vector < self.enabled_vectors:
            log.warning(
                "%s: MSI vector %d raised but the driver enabled %d vector(s)",
                function, vector, self.enabled_vectors,
            )
            return
        if self.per_vector_mask:
            cfg = function.config
            if cfg.get(self.offset + self.mask_reg, 4) >> vector & 1:
                pending = self.offset + self.pending_reg
                cfg.set(pending, 4, cfg.get(pending, 4) | 1 << vector)
                return
        function.deliver_msi(*self.message(vector))

    def pending(self) -> int:
        """The Pending Bits register (0 without per-vector masking)."""
        assert self.function is not None
        if not self.per_vector_mask:
            return 0
        return self.function.config.get(self.offset + self.pending_reg, 4)

    # ConfigHook for the Mask Bits register: unmasking a pending vector sends it.
    def config_read(self, offset: int, size: int) -> int:
        """Mask Bits read as stored."""
        assert self.function is not None
        return self.function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Store the Mask Bits, then send every pending vector that is now unmasked."""
        function = self.function
        assert function is not None
        cfg = function.config
        cfg.default_write(offset, size, value)
        pending_reg = self.offset + self.pending_reg
        ready = cfg.get(pending_reg, 4) & ~cfg.get(self.offset + self.mask_reg, 4)
        if not ready or not self.enabled:
            return
        cfg.set(pending_reg, 4, cfg.get(pending_reg, 4) & ~ready)
        for vector in range(self.vectors):
            if ready >> vector & 1:
                self.notify(vector)
