"""Base address registers: sizing, decoding and the MMIO/IO dispatch of a BAR.

A :class:`Bar` owns the config dword(s) of its register (it is their
:class:`~iovirt.pci.config.ConfigHook`) and the address range it decodes.
The writable mask of the register is ``~(size - 1)`` (QEMU
``pci_register_bar``), so the sizing protocol of PCI 3.0 §6.2.5.1 falls out:
writing all-ones reads back the size mask together with the read-only type
bits.  A write that sets every address bit is a sizing probe and does not
move the decoded address (cloud-hypervisor's ``is_bar_size_probe``): Linux
restores the original value right after, and OpenBSD probes with
``0xfffffff0``; only a write of a real address moves the BAR.

What the BAR decodes is split into sub-regions, each with a read and a write
callback taking an offset relative to the sub-region: the MSI-X table and PBA,
the virtio-pci structures, a device's registers.
"""

from __future__ import annotations

import bisect
import enum
import logging
from typing import TYPE_CHECKING, Callable, Protocol

from iovirt.pci.errors import PciLayoutError
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_COMMAND_IO,
    PCI_COMMAND_MEMORY,
    PCI_ROM_ADDRESS_ENABLE,
    PCI_ROM_ADDRESS_MASK,
)

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction

log = logging.getLogger(__name__)

MmioRead = Callable[[int, int], int]
"""``read(offset, size) -> value``; ``offset`` relative to the sub-region."""
MmioWrite = Callable[[int, int, int], None]
"""``write(offset, size, value)``; ``offset`` relative to the sub-region."""

PCI_ROM_SLOT = 6
"""The index :class:`Bar` uses for the expansion ROM."""


class BarKind(enum.Enum):
    """What a BAR decodes (PCI 3.0 §6.2.5.1 type bits, and the ROM BAR §6.2.5.2)."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"
    ROM = "rom"


_MIN_SIZE = {BarKind.MEM32: 16, BarKind.MEM64: 16, BarKind.IO: 4, BarKind.ROM: 2048}
# I/O BARs may request at most 256 bytes (PCI 3.0 §6.2.5.1).
_MAX_SIZE = {BarKind.MEM32: 1 << 31, BarKind.MEM64: 1 << 63, BarKind.IO: 256, BarKind.ROM: 1 << 24}


class BarDecoder(Protocol):
    """What the host's address map reads of a decoder: a :class:`Bar`, or a VF's window onto one.

    A VF's BARs decode at addresses its PF places
    (:class:`~iovirt.sriov.vf.VfBarWindow`), so the map asks for no more than this.
    """

    @property
    def kind(self) -> BarKind:
        """What it decodes."""

    @property
    def size(self) -> int:
        """Bytes decoded."""

    @property
    def address(self) -> int:
        """Where it decodes (0 = unassigned)."""

    def decoding(self) -> bool:
        """Whether it answers now."""

    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` into the decoded range."""

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``offset`` into the decoded range."""

    def reset(self) -> None:
        """Back to unassigned."""


class Bar:
    """One BAR of a function: register semantics plus MMIO/IO dispatch.

    ``Bar(size, kind=BarKind.MEM32, prefetchable=False)``; install it with
    :meth:`PciFunction.add_bar` (or ``add_rom`` for ``BarKind.ROM``), then
    attach handlers with :meth:`map_region`.  :attr:`address` is the decoded
    base (0 while unassigned); :meth:`decoding` says whether the function
    currently answers at it.
    """

    def __init__(self, size: int, kind: BarKind = BarKind.MEM32, prefetchable: bool = False) -> None:
        if size & (size - 1) or not _MIN_SIZE[kind] <= size <= _MAX_SIZE[kind]:
            raise PciLayoutError(
                f"{kind.value} BAR size {size:#x} must be a power of two in "
                f"[{_MIN_SIZE[kind]:#x}, {_MAX_SIZE[kind]:#x}]"
            )
        if prefetchable and kind not in (BarKind.MEM32, BarKind.MEM64):
            raise PciLayoutError(f"a {kind.value} BAR cannot be prefetchable")
        self.size = size
        self.kind = kind
        self.prefetchable = prefetchable
        self.index = -1
        self.register = -1
        self.function: PciFunction | None = None
        self._lo = 0
        self._hi = 0
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, MmioRead, MmioWrite]] = []

    # -- build time --------------------------------------------------------

    def install(self, function: PciFunction, index: int, register: int) -> None:
        """Write the register's type bits and masks; called by the function."""
        self.function = function
        self.index = index
        self.register = register
        cfg = function.config
        mask = ~(self.size - 1)
        if self.kind is BarKind.ROM:
            cfg.init(register, 4, 0, (mask & PCI_ROM_ADDRESS_MASK) | PCI_ROM_ADDRESS_ENABLE)
        elif self.kind is BarKind.IO:
            cfg.init(register, 4, PCI_BASE_ADDRESS_SPACE_IO, mask & 0xFFFFFFFC)
        else:
            bits = PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0
            if self.kind is BarKind.MEM64:
                cfg.init(register, 4, bits | PCI_BASE_ADDRESS_MEM_TYPE_64, mask & 0xFFFFFFF0)
                cfg.init(register + 4, 4, 0, (mask >> 32) & 0xFFFFFFFF)
            else:
                cfg.init(register, 4, bits, mask & 0xFFFFFFF0)
        cfg.add_hook(register, 8 if self.kind is BarKind.MEM64 else 4, self)

    def map_region(self, offset: int, length: int, read: MmioRead, write: MmioWrite) -> None:
        """Route accesses to ``[offset, offset+length)`` of this BAR to ``read``/``write``.

        Raises :class:`PciLayoutError` if the range leaves the BAR or overlaps
        a region already mapped.
        """
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise PciLayoutError(
                f"region [{offset:#x}, +{length:#x}) does not fit in a BAR of {self.size:#x} bytes"
            )
        i = bisect.bisect_right(self._starts, offset)
        if i and self._regions[i - 1][1] > offset:
            raise PciLayoutError("region overlaps another region of the BAR", offset)
        if i < len(self._starts) and self._starts[i] < offset + length:
            raise PciLayoutError("region overlaps another region of the BAR", offset)
        self._starts.insert(i, offset)
        self._regions.insert(i, (offset, offset + length, read, write))

    # -- MMIO / IO ---------------------------------------------------------

    def _find(self, offset: int, size: int) -> tuple[int, int, MmioRead, MmioWrite] | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            region = self._regions[i]
            if offset + size <= region[1]:
                return region
        return None

    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` into the BAR; unmapped bytes read 0."""
        region = self._find(offset, size)
        if region is None:
            log.debug("BAR%d read of %d byte(s) at %#x hits no region", self.index, size, offset)
            return 0
        return region[2](offset - region[0], size)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write into the BAR; writes to unmapped bytes are dropped."""
        region = self._find(offset, size)
        if region is None:
            log.debug("BAR%d write of %d byte(s) at %#x hits no region", self.index, size, offset)
            return
        region[3](offset - region[0], size, value)

    # -- register semantics (ConfigHook) ----------------------------------

    @property
    def address(self) -> int:
        """The decoded base address (0 = unassigned); unchanged by sizing probes."""
        return (self._hi << 32) | self._lo

    def decoding(self) -> bool:
        """Whether the BAR answers: Memory/IO Space enabled (and ROM Enable for the ROM)."""
        function = self.function
        if function is None or not self.address:
            return False
        command = function.config.get(4, 2)
        if self.kind is BarKind.IO:
            return bool(command & PCI_COMMAND_IO)
        if self.kind is BarKind.ROM:
            rom_enabled = function.config.get(self.register, 4) & PCI_ROM_ADDRESS_ENABLE
            return bool(command & PCI_COMMAND_MEMORY and rom_enabled)
        return bool(command & PCI_COMMAND_MEMORY)

    def config_read(self, offset: int, size: int) -> int:
        """Registers read their stored value (the size mask after a probe)."""
        assert self.function is not None
        return self.function.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Masked write; a real address moves the BAR, a sizing probe does not."""
        function = self.function
        assert function is not None
        cfg = function.config
        cfg.default_write(offset, size, value)
        dword = offset & ~3
        address_mask = cfg.wmask(dword, 4)
        if self.kind is BarKind.ROM:
            address_mask &= PCI_ROM_ADDRESS_MASK
        bits = cfg.get(dword, 4) & address_mask
        if bits != address_mask:
            if dword == self.register:
                self._lo = bits
            else:
                self._hi = bits
        function.decode_changed()

    def reset(self) -> None:
        """Forget the decoded address (the register is restored by the config space)."""
        self._lo = self._hi = 0

    def __repr__(self) -> str:
        return (
            f"Bar(index={self.index}, kind={self.kind.value}, size={self.size:#x}, "
            f"address={self.address:#x})"
        )


class BytesRegion:
    """A sub-region backed by bytes: RAM-like, or read-only (an option ROM).

    ``BytesRegion(data, writable=True)``; pass ``region.read``/``region.write``
    to :meth:`Bar.map_region`.
    """

    def __init__(self, data: bytes | bytearray, writable: bool = True) -> None:
        self.data = bytearray(data)
        self.writable = writable

    def read(self, offset: int, size: int) -> int:
        """Little-endian read."""
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Little-endian write; dropped when read-only."""
        if self.writable:
            self.data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
