"""The host bridge side: config access mechanisms and address dispatch.

:class:`PciHost` is what a CPU (or the in-process platform) talks to:

- ECAM (PCIe §7.2.2): a memory window where ``bus << 20 | dev << 15 | fn << 12
  | reg`` selects a register;
- configuration mechanism #1 (PCI 3.0 §3.2.2.3.2): CONFIG_ADDRESS at I/O
  0xCF8 (dword accesses only: bit 31 enable, bus 23:16, device 15:11,
  function 10:8, register 7:2) and CONFIG_DATA at 0xCFC-0xCFF (byte and word
  accesses select the bytes of the dword);
- memory and I/O accesses, dispatched to whichever BAR decodes the address.

An absent function reads all-ones and ignores writes (a master abort); the
extended space of a conventional function reads all-ones through ECAM.  The
direct :meth:`config_read`/:meth:`config_write` raise
:class:`~iovirt.pci.errors.PciConfigAccessError` on a malformed access; the
guest-facing windows (ECAM, ports, MMIO) log it and behave like hardware.
"""

from __future__ import annotations

import logging

from iovirt.pci.address_map import AddressMap, build_maps
from iovirt.pci.bus import PciBus
from iovirt.pci.errors import PciConfigAccessError, PciTopologyError
from iovirt.pci.function import PciFunction
from iovirt.pci.msi import MsiSink

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ADDRESS_ENABLE = 0x80000000



def _all_ones(size: int) -> int:
    # What a master-aborted read returns (PCI 3.0 §6.1).
    return (1 << (8 * size)) - 1


class PciHost:
    """A host bridge in front of a root bus.

    ``PciHost(root_bus=None, msi_sink=None)`` (a new bus 0 if none is given).
    """

    def __init__(self, root_bus: PciBus | None = None, msi_sink: MsiSink | None = None) -> None:
        self.root_bus = root_bus if root_bus is not None else PciBus(0)
        if self.root_bus.parent is not None:
            raise PciTopologyError("the host needs a root bus, not one behind a bridge")
        self.root_bus.host = self
        self.root_bus.msi_sink = msi_sink
        self.config_address = 0
        self._maps: tuple[AddressMap, AddressMap] | None = None

    @property
    def msi_sink(self) -> MsiSink | None:
        """The sink every function's MSI/MSI-X messages go to."""
        return self.root_bus.msi_sink

    @msi_sink.setter
    def msi_sink(self, sink: MsiSink | None) -> None:
        self.root_bus.msi_sink = sink

    # -- config ------------------------------------------------------------

    def find_function(self, bus: int, device: int, fn: int) -> PciFunction | None:
        """The function config accesses to ``bus:device.fn`` reach, if any."""
        target = self.root_bus.route(bus)
        return target.function(device, fn) if target is not None else None

    def config_read(self, bus: int, device: int, fn: int, offset: int, size: int) -> int:
        """Config read; all-ones from an absent function; raises on a malformed access."""
        function = self.find_function(bus, device, fn)
        if function is None:
            if size not in (1, 2, 4):
                raise PciConfigAccessError(offset, size, 4096, "width is not 1, 2 or 4 bytes")
            return _all_ones(size)
        return function.config.read(offset, size)

    def config_write(self, bus: int, device: int, fn: int, offset: int, size: int, value: int) -> None:
        """Config write; dropped for an absent function; raises on a malformed access."""
        function = self.find_function(bus, device, fn)
        if function is not None:
            function.config.write(offset, size, value)

    def _guest_config_read(self, bus: int, devfn: int, offset: int, size: int) -> int:
        function = self.find_function(bus, devfn >> 3, devfn & 7)
        if function is None or offset >= function.config.size:
            return _all_ones(size)
        try:
            return function.config.read(offset, size)
        except PciConfigAccessError as err:
            log.warning("%r: %s; read returns all-ones", function, err)
            return _all_ones(size)

    def _guest_config_write(self, bus: int, devfn: int, offset: int, size: int, value: int) -> None:
        function = self.find_function(bus, devfn >> 3, devfn & 7)
        if function is None or offset >= function.config.size:
            return
        try:
            function.config.write(offset, size, value & ((1 << (8 * size)) - 1))
        except PciConfigAccessError as err:
            log.warning("%r: %s; write dropped", function, err)

    def ecam_read(self, offset: int, size: int) -> int:
        """A read at ``offset`` into the ECAM window."""
        return self._guest_config_read(offset >> 20 & 0xFF, offset >> 12 & 0xFF, offset & 0xFFF, size)

    def ecam_write(self, offset: int, size: int, value: int) -> None:
        """A write at ``offset`` into the ECAM window."""
        self._guest_config_write(offset >> 20 & 0xFF, offset >> 12 & 0xFF, offset & 0xFFF, size, value)

    # -- I/O ports ---------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        """An I/O port read: CONFIG_ADDRESS/CONFIG_DATA, else an I/O BAR; all-ones if unclaimed."""
        if port == CONFIG_ADDRESS_PORT and size == 4:
            return self.config_address
        if CONFIG_DATA_PORT <= port < CONFIG_DATA_PORT + 4:
            address = self.config_address
            if not address & CONFIG_ADDRESS_ENABLE:
                return _all_ones(size)
            reg = (address & 0xFC) | (port & 3)
            return self._guest_config_read(address >> 16 & 0xFF, address >> 8 & 0xFF, reg, size)
        return self._dispatch_read(self._address_maps()[1], port, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        """An I/O port write: CONFIG_ADDRESS/CONFIG_DATA, else an I/O BAR."""
        if port == CONFIG_ADDRESS_PORT and size == 4:
            # Bits 1:0 are reserved and read 0; 30:24 are reserved too.
            self.config_address = value & 0x80FFFFFC
            return
        if CONFIG_DATA_PORT <= port < CONFIG_DATA_PORT + 4:
            address = self.config_address
            if address & CONFIG_ADDRESS_ENABLE:
                reg = (address & 0xFC) | (port & 3)
                self._guest_config_write(address >> 16 & 0xFF, address >> 8 & 0xFF, reg, size, value)
            return
        self._dispatch_write(self._address_maps()[1], port, size, value)

    # -- memory ------------------------------------------------------------

    def mmio_read(self, addr: int, size: int) -> int:
        """A memory read; all-ones if no BAR decodes ``[addr, addr+size)``."""
        return self._dispatch_read(self._address_maps()[0], addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """A memory write; dropped if no BAR decodes it."""
        self._dispatch_write(self._address_maps()[0], addr, size, value)

    def _address_maps(self) -> tuple[AddressMap, AddressMap]:
        maps = self._maps
        if maps is None:
            maps = self._maps = build_maps(self.root_bus)
        return maps

    @staticmethod
    def _dispatch_read(space: AddressMap, addr: int, size: int) -> int:
        entry = space.lookup(addr, size)
        if entry is None:
            log.debug("read of %d byte(s) at %#x: no BAR decodes it", size, addr)
            return _all_ones(size)
        return entry[2].mmio_read(addr - entry[0], size)

    @staticmethod
    def _dispatch_write(space: AddressMap, addr: int, size: int, value: int) -> None:
        entry = space.lookup(addr, size)
        if entry is None:
            log.debug("write of %d byte(s) at %#x: no BAR decodes it", size, addr)
            return
        entry[2].mmio_write(addr - entry[0], size, value)

    def invalidate(self) -> None:
        """Drop the cached address maps (a BAR, window, Command or topology changed)."""
        self._maps = None

    def reset(self) -> None:
        """Reset every function and CONFIG_ADDRESS."""
        self.config_address = 0
        self.root_bus.reset()
        self.invalidate()
