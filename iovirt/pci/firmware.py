"""Firmware-style enumeration: bus numbers, BAR sizing and assignment, bridge windows.

Everything goes through the host's config accesses, the way a BIOS or
Linux's ``pci_scan_bus``/``pci_assign_unassigned_resources`` does it: probe
vendor IDs, number buses depth first, size BARs by writing all-ones and
reading back (PCI 3.0 §6.2.5.1, kvm-unit-tests ``pci_bar_size``), place each
BAR naturally aligned, open bridge windows around what is behind them (1 MiB
memory / 4 KiB I/O granules), then enable decoding and bus mastering.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iovirt.pci.host import PciHost
from iovirt.pci.regs import (
    PCI_BASE_ADDRESS_0,
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    PCI_COMMAND,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_HEADER_TYPE,
    PCI_HEADER_TYPE_BRIDGE,
    PCI_HEADER_TYPE_MULTI_FUNCTION,
    PCI_IO_BASE,
    PCI_IO_LIMIT,
    PCI_MEMORY_BASE,
    PCI_MEMORY_LIMIT,
    PCI_PREF_BASE_UPPER32,
    PCI_PREF_LIMIT_UPPER32,
    PCI_PREF_MEMORY_BASE,
    PCI_PREF_MEMORY_LIMIT,
    PCI_PRIMARY_BUS,
    PCI_ROM_ADDRESS,
    PCI_ROM_ADDRESS1,
    PCI_ROM_ADDRESS_MASK,
    PCI_SECONDARY_BUS,
    PCI_SUBORDINATE_BUS,
    PCI_VENDOR_ID,
)

_MEM_GRANULE = 1 << 20
_IO_GRANULE = 1 << 12


@dataclass
class _Cursors:
    """Next free address in each space."""

    mem32: int
    mem64: int
    io: int
    next_bus: int = 1
    functions: list[tuple[int, int, int]] = field(default_factory=list)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


class ConfigAccessor:
    """Config reads and writes of one ``bus:device.fn`` through a host (raising API)."""

    def __init__(self, host: PciHost, bus: int, device: int, fn: int) -> None:
        self.host, self.bus, self.device, self.fn = host, bus, device, fn

    def read(self, offset: int, size: int) -> int:
        """Config read."""
        return self.host.config_read(self.bus, self.device, self.fn, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """Config write."""
        self.host.config_write(self.bus, self.device, self.fn, offset, size, value)


def size_bar(cfg: ConfigAccessor, register: int) -> tuple[int, int, int]:
    """Size the BAR at ``register``: ``(size, flags, registers_used)``; size 0 if unimplemented.

    Writes all-ones, reads the mask back and restores the original value.
    """
    original = cfg.read(register, 4)
    cfg.write(register, 4, 0xFFFFFFFF)
    mask = cfg.read(register, 4)
    cfg.write(register, 4, original)
    if not mask:
        return 0, 0, 1
    if mask & PCI_BASE_ADDRESS_SPACE_IO:
        return (~(mask & ~0x3) + 1) & 0xFFFF, mask & 0x3, 1
    flags = mask & 0xF
    if flags & PCI_BASE_ADDRESS_MEM_TYPE_64:
        original_hi = cfg.read(register + 4, 4)
        cfg.write(register + 4, 4, 0xFFFFFFFF)
        mask_hi = cfg.read(register + 4, 4)
        cfg.write(register + 4, 4, original_hi)
        full = mask_hi << 32 | (mask & ~0xF)
        return ((~full) + 1) & ((1 << 64) - 1), flags, 2
    return ((~(mask & ~0xF)) + 1) & 0xFFFFFFFF, flags, 1


def assign_resources(
    host: PciHost,
    *,
    mem32_base: int = 0xC000_0000,
    mem64_base: int = 0x80_0000_0000,
    io_base: int = 0xC000,
) -> list[tuple[int, int, int]]:
    """Enumerate and configure every function; returns the ``(bus, dev, fn)`` found."""
    cursors = _Cursors(mem32=mem32_base, mem64=mem64_base, io=io_base)
    cursors.next_bus = host.root_bus.number + 1
    _scan_bus(host, host.root_bus.number, cursors)
    return cursors.functions


def _scan_bus(host: PciHost, bus: int, cursors: _Cursors) -> int:
    """Configure ``bus`` and everything below; returns the highest bus number used."""
    highest = bus
    for device in range(32):
        for fn in range(8):
            cfg = ConfigAccessor(host, bus, device, fn)
            if cfg.read(PCI_VENDOR_ID, 2) == 0xFFFF:
                if fn == 0:
                    break
                continue
            cursors.functions.append((bus, device, fn))
            header = cfg.read(PCI_HEADER_TYPE, 1)
            if header & 0x7F == PCI_HEADER_TYPE_BRIDGE:
                highest = max(highest, _configure_bridge(cfg, cursors))
            else:
                _assign_bars(cfg, 6, PCI_ROM_ADDRESS, cursors)
            if fn == 0 and not header & PCI_HEADER_TYPE_MULTI_FUNCTION:
                break
    return highest


def _assign_bars(cfg: ConfigAccessor, count: int, rom_register: int, cursors: _Cursors) -> None:
    command = PCI_COMMAND_MASTER
    index = 0
    while index < count:
        register = PCI_BASE_ADDRESS_0 + 4 * index
        size, flags, used = size_bar(cfg, register)
        index += used
        if not size:
            continue
        if flags & PCI_BASE_ADDRESS_SPACE_IO:
            address = cursors.io = _align(cursors.io, size)
            cursors.io += size
            cfg.write(register, 4, address)
            command |= PCI_COMMAND_IO
            continue
        if flags & PCI_BASE_ADDRESS_MEM_TYPE_64 and flags & PCI_BASE_ADDRESS_MEM_PREFETCH:
            address = cursors.mem64 = _align(cursors.mem64, size)
            cursors.mem64 += size
        else:
            address = cursors.mem32 = _align(cursors.mem32, size)
            cursors.mem32 += size
        cfg.write(register, 4, address & 0xFFFFFFFF)
        if used == 2:
            cfg.write(register + 4, 4, address >> 32)
        command |= PCI_COMMAND_MEMORY
    original = cfg.read(rom_register, 4)
    cfg.write(rom_register, 4, PCI_ROM_ADDRESS_MASK)
    rom_mask = cfg.read(rom_register, 4) & PCI_ROM_ADDRESS_MASK
    cfg.write(rom_register, 4, original)
    if rom_mask:
        size = (~rom_mask + 1) & 0xFFFFFFFF
        address = cursors.mem32 = _align(cursors.mem32, size)
        cursors.mem32 += size
        # Assigned but left disabled, as firmware does until it runs the ROM.
        cfg.write(rom_register, 4, address)
    cfg.write(PCI_COMMAND, 2, cfg.read(PCI_COMMAND, 2) | command)


def _configure_bridge(cfg: ConfigAccessor, cursors: _Cursors) -> int:
    secondary = cursors.next_bus
    cursors.next_bus += 1
    # Open the bus range fully while scanning below, then close it to what was found.
    cfg.write(PCI_PRIMARY_BUS, 1, cfg.bus)
    cfg.write(PCI_SECONDARY_BUS, 1, secondary)
    cfg.write(PCI_SUBORDINATE_BUS, 1, 0xFF)
    _assign_bars(cfg, 2, PCI_ROM_ADDRESS1, cursors)

    cursors.mem32 = _align(cursors.mem32, _MEM_GRANULE)
    cursors.mem64 = _align(cursors.mem64, _MEM_GRANULE)
    cursors.io = _align(cursors.io, _IO_GRANULE)
    start = (cursors.mem32, cursors.mem64, cursors.io)
    highest = _scan_bus(cfg.host, secondary, cursors)
    cfg.write(PCI_SUBORDINATE_BUS, 1, highest)
    cursors.mem32 = _align(cursors.mem32, _MEM_GRANULE)
    cursors.mem64 = _align(cursors.mem64, _MEM_GRANULE)
    cursors.io = _align(cursors.io, _IO_GRANULE)

    mem_lo, mem_hi = start[0], cursors.mem32
    if mem_hi > mem_lo:
        cfg.write(PCI_MEMORY_BASE, 2, (mem_lo >> 16) & 0xFFF0)
        cfg.write(PCI_MEMORY_LIMIT, 2, ((mem_hi - 1) >> 16) & 0xFFF0)
    else:  # base above limit: window closed
        cfg.write(PCI_MEMORY_BASE, 2, 0xFFF0)
        cfg.write(PCI_MEMORY_LIMIT, 2, 0)
    pref_lo, pref_hi = start[1], cursors.mem64
    if pref_hi > pref_lo:
        cfg.write(PCI_PREF_MEMORY_BASE, 2, (pref_lo >> 16) & 0xFFF0)
        cfg.write(PCI_PREF_BASE_UPPER32, 4, pref_lo >> 32)
        cfg.write(PCI_PREF_MEMORY_LIMIT, 2, ((pref_hi - 1) >> 16) & 0xFFF0)
        cfg.write(PCI_PREF_LIMIT_UPPER32, 4, (pref_hi - 1) >> 32)
    else:
        cfg.write(PCI_PREF_MEMORY_BASE, 2, 0xFFF0)
        cfg.write(PCI_PREF_MEMORY_LIMIT, 2, 0)
    io_lo, io_hi = start[2], cursors.io
    if io_hi > io_lo:
        cfg.write(PCI_IO_BASE, 1, (io_lo >> 8) & 0xF0)
        cfg.write(PCI_IO_LIMIT, 1, ((io_hi - 1) >> 8) & 0xF0)
    else:
        cfg.write(PCI_IO_BASE, 1, 0xF0)
        cfg.write(PCI_IO_LIMIT, 1, 0)
    command = PCI_COMMAND_MASTER | PCI_COMMAND_MEMORY | (PCI_COMMAND_IO if io_hi > io_lo else 0)
    cfg.write(PCI_COMMAND, 2, cfg.read(PCI_COMMAND, 2) | command)
    return highest
