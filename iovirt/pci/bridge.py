"""A PCI-to-PCI bridge: the type 1 header and its secondary bus.

Register layout and masks from the PCI-to-PCI Bridge Architecture
Specification 1.2 §3.2: bus numbers, 16-bit I/O window, memory window,
64-bit prefetchable window, Bridge Control.  Windows are decoded in 1 MiB
(memory) and 4 KiB (I/O) granules; a window is open when base <= limit.
"""

from __future__ import annotations

from typing import Unpack

from iovirt.pci.bus import PciBus
from iovirt.pci.function import FunctionOptions, PciFunction
from iovirt.pci.regs import (
    PCI_BRIDGE_CONTROL,
    PCI_BRIDGE_CTL_BUS_RESET,
    PCI_BRIDGE_CTL_WRITABLE,
    PCI_HEADER_TYPE_BRIDGE,
    PCI_IO_BASE,
    PCI_IO_LIMIT,
    PCI_MEMORY_BASE,
    PCI_MEMORY_LIMIT,
    PCI_PREF_BASE_UPPER32,
    PCI_PREF_LIMIT_UPPER32,
    PCI_PREF_MEMORY_BASE,
    PCI_PREF_MEMORY_LIMIT,
    PCI_PREF_RANGE_TYPE_64,
    PCI_PRIMARY_BUS,
    PCI_ROM_ADDRESS1,
    PCI_SEC_LATENCY_TIMER,
    PCI_SEC_STATUS,
    PCI_SECONDARY_BUS,
    PCI_STATUS_W1C,
    PCI_SUBORDINATE_BUS,
)


class _RoutingHook:
    """Bus numbers and windows: mask semantics, then the address map is stale."""

    def __init__(self, bridge: PciBridge) -> None:
        self.bridge = bridge

    def config_read(self, offset: int, size: int) -> int:
        return self.bridge.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.bridge.config.default_write(offset, size, value)
        self.bridge.decode_changed()


class _BridgeControlHook:
    """Bridge Control: setting Secondary Bus Reset resets everything behind the bridge."""

    def __init__(self, bridge: PciBridge) -> None:
        self.bridge = bridge

    def config_read(self, offset: int, size: int) -> int:
        return self.bridge.config.get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        cfg = self.bridge.config
        was = cfg.get(PCI_BRIDGE_CONTROL, 2) & PCI_BRIDGE_CTL_BUS_RESET
        cfg.default_write(offset, size, value)
        if not was and cfg.get(PCI_BRIDGE_CONTROL, 2) & PCI_BRIDGE_CTL_BUS_RESET:
            self.bridge.secondary_bus.reset()


class PciBridge(PciFunction):
    """A PCI-to-PCI bridge (type 1 header) with the bus behind it.

    Same constructor as :class:`PciFunction` (class code usually 0x060400);
    :attr:`secondary_bus` is where functions behind the bridge are added.
    """

    header_type = PCI_HEADER_TYPE_BRIDGE
    bar_count = 2
    rom_register = PCI_ROM_ADDRESS1

    def __init__(
        self, vendor_id: int, device_id: int, class_code: int = 0x060400, **options: Unpack[FunctionOptions]
    ) -> None:
        self.secondary_bus = PciBus(parent=self)
        super().__init__(vendor_id, device_id, class_code, **options)

    def _init_header(self, subsystem_vendor_id: int, subsystem_id: int) -> None:
        cfg = self.config
        cfg.init(PCI_PRIMARY_BUS, 3, 0, 0xFFFFFF)
        cfg.init(PCI_SEC_LATENCY_TIMER, 1, 0, 0 if self.pcie else 0xFF)
        # 16-bit I/O addressing: only the upper nibbles are writable.
        cfg.init(PCI_IO_BASE, 1, 0, 0xF0)
        cfg.init(PCI_IO_LIMIT, 1, 0, 0xF0)
        cfg.init(PCI_SEC_STATUS, 2, 0, 0, PCI_STATUS_W1C)
        cfg.init(PCI_MEMORY_BASE, 2, 0, 0xFFF0)
        cfg.init(PCI_MEMORY_LIMIT, 2, 0, 0xFFF0)
        cfg.init(PCI_PREF_MEMORY_BASE, 2, PCI_PREF_RANGE_TYPE_64, 0xFFF0)
        cfg.init(PCI_PREF_MEMORY_LIMIT, 2, PCI_PREF_RANGE_TYPE_64, 0xFFF0)
        cfg.init(PCI_PREF_BASE_UPPER32, 4, 0, 0xFFFFFFFF)
        cfg.init(PCI_PREF_LIMIT_UPPER32, 4, 0, 0xFFFFFFFF)
        cfg.init(PCI_BRIDGE_CONTROL, 2, 0, PCI_BRIDGE_CTL_WRITABLE)
        cfg.add_hook(PCI_PRIMARY_BUS, PCI_ROM_ADDRESS1 - PCI_PRIMARY_BUS, _RoutingHook(self))
        cfg.add_hook(PCI_BRIDGE_CONTROL & ~3, 4, _BridgeControlHook(self))

    @property
    def secondary_bus_number(self) -> int:
        """Secondary Bus Number."""
        return self.config.get(PCI_SECONDARY_BUS, 1)

    @property
    def subordinate_bus_number(self) -> int:
        """Subordinate Bus Number."""
        return self.config.get(PCI_SUBORDINATE_BUS, 1)

    def io_window(self) -> tuple[int, int]:
        """``(base, limit)`` of the I/O window, inclusive."""
        cfg = self.config
        base = (cfg.get(PCI_IO_BASE, 1) & 0xF0) << 8
        return base, ((cfg.get(PCI_IO_LIMIT, 1) & 0xF0) << 8) | 0xFFF

    def memory_window(self) -> tuple[int, int]:
        """``(base, limit)`` of the non-prefetchable memory window, inclusive."""
        cfg = self.config
        base = (cfg.get(PCI_MEMORY_BASE, 2) & 0xFFF0) << 16
        return base, ((cfg.get(PCI_MEMORY_LIMIT, 2) & 0xFFF0) << 16) | 0xFFFFF

    def prefetchable_window(self) -> tuple[int, int]:
        """``(base, limit)`` of the 64-bit prefetchable window, inclusive."""
        cfg = self.config
        base = (cfg.get(PCI_PREF_MEMORY_BASE, 2) & 0xFFF0) << 16 | cfg.get(PCI_PREF_BASE_UPPER32, 4) << 32
        limit = (cfg.get(PCI_PREF_MEMORY_LIMIT, 2) & 0xFFF0) << 16 | cfg.get(PCI_PREF_LIMIT_UPPER32, 4) << 32
        return base, limit | 0xFFFFF

    def reset(self) -> None:
        """Reset the bridge and, as a hot reset does, everything behind it."""
        super().reset()
        self.secondary_bus.reset()
