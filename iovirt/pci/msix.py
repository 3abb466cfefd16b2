"""MSI-X (PCI 3.0 §6.8.2): the capability, its table and its Pending Bit Array.

The table (16 bytes per vector: Message Address, Upper Address, Data, Vector
Control) and the PBA live in memory BARs; :class:`MsixCapability` maps them
onto the BARs it is given with :meth:`Bar.map_region`.  As in QEMU's
``hw/pci/msix.c``: every vector starts masked; only MSI-X Enable and Function
Mask are writable in Message Control; a vector raised while masked (by its
own Mask bit or by Function Mask) sets its PBA bit, and the message goes out
when it becomes unmasked.  The PBA is read-only.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from iovirt.pci.bar import BarKind
from iovirt.pci.capability import Capability
from iovirt.pci.errors import PciLayoutError
from iovirt.pci.regs import (
    PCI_CAP_ID_MSIX,
    PCI_MSIX_ENTRY_CTRL_MASKBIT,
    PCI_MSIX_ENTRY_SIZE,
    PCI_MSIX_ENTRY_VECTOR_CTRL,
    PCI_MSIX_FLAGS,
    PCI_MSIX_FLAGS_ENABLE,
    PCI_MSIX_FLAGS_MASKALL,
    PCI_MSIX_PBA,
    PCI_MSIX_TABLE,
)

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction

log = logging.getLogger(__name__)

# Writable bits of a 16-byte table entry: address, upper address and data,
# and only the Mask bit of Vector Control (the rest is reserved, §6.8.2.9).
_ENTRY_WMASK = (1 << 96) - 1 | PCI_MSIX_ENTRY_CTRL_MASKBIT << 96
_MASKED_ENTRY = (PCI_MSIX_ENTRY_CTRL_MASKBIT << 96).to_bytes(16, "little")


class MsixCapability(Capability):
    """The MSI-X capability with its table and PBA in BARs.

    ``MsixCapability(vectors, table_bar, table_offset=0, pba_bar=None,
    pba_offset=None)``: ``vectors`` is 1-2048; the BARs are indexes of memory
    BARs already added to the function; the table offset must be 8-byte
    aligned.  The PBA defaults to the same BAR, right after the table.
    """

    cap_id = PCI_CAP_ID_MSIX
    size = 12

    def __init__(
        self,
        vectors: int,
        table_bar: int,
        table_offset: int = 0,
        pba_bar: int | None = None,
        pba_offset: int | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= vectors <= 2048:
            raise PciLayoutError(f"MSI-X table size {vectors} is not in 1-2048")
        self.vectors = vectors
        self.table_bar = table_bar
        self.table_offset = table_offset
        self.pba_bar = table_bar if pba_bar is None else pba_bar
        table_len = vectors * PCI_MSIX_ENTRY_SIZE
        self.pba_len = ((vectors + 63) // 64) * 8
        self.pba_offset = (table_offset + table_len) if pba_offset is None else pba_offset
        if table_offset & 7 or self.pba_offset & 7:
            raise PciLayoutError("MSI-X table and PBA offsets must be 8-byte aligned")
        self.table = bytearray(_MASKED_ENTRY * vectors)
        self.pba = bytearray(self.pba_len)

    def install(self, function: PciFunction, offset: int) -> None:
        for bir in (self.table_bar, self.pba_bar):
            bar = function.bars[bir] if 0 <= bir < function.bar_count else None
            if bar is None or bar.index != bir or bar.kind not in (BarKind.MEM32, BarKind.MEM64):
                raise PciLayoutError(f"MSI-X needs memory BAR{bir} to be added first")
        table_bar = function.bars[self.table_bar]
        pba_bar = function.bars[self.pba_bar]
        assert table_bar is not None and pba_bar is not None
        table_end = self.table_offset + len(self.table)
        if table_end > table_bar.size or self.pba_offset + self.pba_len > pba_bar.size:
            raise PciLayoutError(f"MSI-X table or PBA does not fit in BAR{self.table_bar}/BAR{self.pba_bar}")
        if table_bar is pba_bar and self.pba_offset < table_end and self.table_offset < self.pba_offset + self.pba_len:
            raise PciLayoutError("MSI-X table and PBA overlap", self.pba_offset)
        table_bar.map_region(self.table_offset, len(self.table), self.table_read, self.table_write)
        pba_bar.map_region(self.pba_offset, self.pba_len, self.pba_read, self._pba_write)
        super().install(function, offset)
        cfg = function.config
        cfg.init(
            offset + PCI_MSIX_FLAGS, 2, self.vectors - 1,
            PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL,
        )
        cfg.init(offset + PCI_MSIX_TABLE, 4, self.table_offset | self.table_bar)
        cfg.init(offset + PCI_MSIX_PBA, 4, self.pba_offset | self.pba_bar)
        # The dword holding Message Control: enabling or unmasking the
        # function sends what is pending.
        cfg.add_hook(offset, 4, self)
        function.msix = self

    # -- state -------------------------------------------------------------

    def _flags(self) -> int:
        assert self.function is not None
        return self.function.config.get(self.offset + PCI_MSIX_FLAGS, 2)

    @property
    def enabled(self) -> bool:
        """MSI-X Enable."""
        return bool(self._flags() & PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        """Function Mask."""
        return bool(self._flags() & PCI_MSIX_FLAGS_MASKALL)

    def entry(self, vector: int) -> tuple[int, int, bool]:
        """``(address, data, masked)`` of a table entry."""
        raw = int.from_bytes(self.table[vector * 16 : vector * 16 + 16], "little")
        return raw & ((1 << 64) - 1), (raw >> 64) & 0xFFFFFFFF, bool(raw >> 96 & 1)

    def is_pending(self, vector: int) -> bool:
        """The vector's PBA bit."""
        return bool(self.pba[vector >> 3] >> (vector & 7) & 1)

    def _set_pending(self, vector: int, on: bool) -> None:
        bit = 1 << (vector & 7)
        if on:
            self.pba[vector >> 3] |= bit
        else:
            self.pba[vector >> 3] &= ~bit

    def notify(self, vector: int) -> None:
        """Raise ``vector``: send it, or set its PBA bit if masked.  No-op while disabled."""
        function = self.function
        assert function is not None
        if not 0 <= vector < self.vectors:
            log.warning("%s: MSI-X vector %d raised but the table has %d", function, vector, self.vectors)
            return
        flags = function.config.get(self.offset + PCI_MSIX_FLAGS, 2)
        if not flags & PCI_MSIX_FLAGS_ENABLE:
            log.debug("%s: MSI-X vector %d raised while MSI-X is disabled", function, vector)
            return
        base = vector * PCI_MSIX_ENTRY_SIZE
        table = self.table
        if flags & PCI_MSIX_FLAGS_MASKALL or table[base + PCI_MSIX_ENTRY_VECTOR_CTRL] & 1:
            self.pba[vector >> 3] |= 1 << (vector & 7)
            return
        function.deliver_msi(
            int.from_bytes(table[base : base + 8], "little"),
            int.from_bytes(table[base + 8 : base + 12], "little"),
        )

    def _send_pending(self, vector: int) -> None:
        """Send ``vector`` if it is pending and now unmasked (§6.8.2.9)."""
        if self.is_pending(vector) and not self.entry(vector)[2]:
            self._set_pending(vector, False)
            self.notify(vector)

    def reset(self) -> None:
        """Every vector masked, nothing pending (Message Control is reset by config space)."""
        self.table[:] = _MASKED_ENTRY * self.vectors
        self.pba[:] = bytes(self.pba_len)

    # -- Message Control (ConfigHook) --------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """Read as stored."""
        assert self.function is not None
        return self.function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Store Enable/Function Mask; on becoming enabled and unmasked, send pending vectors."""
        assert self.function is not None
        self.function.config.default_write(offset, size, value)
        if self.enabled and not self.function_masked and any(self.pba):
            for vector in range(self.vectors):
                self._send_pending(vector)

    # -- table and PBA (BAR regions) ---------------------------------------

    def table_read(self, offset: int, size: int) -> int:
        """Read the table (any naturally aligned 1/2/4/8-byte access)."""
        if offset & (size - 1):
            log.warning("%s: unaligned MSI-X table read at %#x", self.function, offset)
            return 0
        return int.from_bytes(self.table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        """Write the table; clearing a pending vector's Mask bit sends it."""
        if offset & (size - 1) or size > 8:
            log.warning("%s: unaligned MSI-X table write at %#x", self.function, offset)
            return
        vector, within = divmod(offset, PCI_MSIX_ENTRY_SIZE)
        base = vector * PCI_MSIX_ENTRY_SIZE
        old = int.from_bytes(self.table[base : base + 16], "little")
        shift = within * 8
        field = ((1 << (size * 8)) - 1) << shift
        wmask = _ENTRY_WMASK & field
        new = (old & ~wmask) | ((value << shift) & wmask)
        self.table[base : base + 16] = new.to_bytes(16, "little")
        if old >> 96 & 1 and not new >> 96 & 1 and self.enabled and not self.function_masked:
            self._send_pending(vector)

    def pba_read(self, offset: int, size: int) -> int:
        """Read the PBA."""
        return int.from_bytes(self.pba[offset : offset + size], "little")

    def _pba_write(self, offset: int, size: int, value: int) -> None:
        # PBA bits are read-only (§6.8.2.10); software writes are ignored.
        log.debug("%s: write to read-only MSI-X PBA at %#x ignored", self.function, offset)
