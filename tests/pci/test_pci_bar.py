"""BARs: sizing protocol, probes that do not move a BAR, decoding, MMIO/IO dispatch."""

from __future__ import annotations

import pytest

from iovirt.pci import Bar, BarKind, BytesRegion, PciBridge, PciFunction, PciHost, PciLayoutError
from iovirt.pci.firmware import assign_resources

MEM, IO = 0x2, 0x1


def make_function(pcie: bool = False) -> PciFunction:
    return PciFunction(0x1B36, 0x0005, 0x00FF00, pcie=pcie)


def probe(fn: PciFunction, register: int) -> int:
    """kvm-unit-tests pci_bar_size style: write ~0, read, restore."""
    original = fn.config_read(register, 4)
    fn.config_write(register, 4, 0xFFFFFFFF)
    mask = fn.config_read(register, 4)
    fn.config_write(register, 4, original)
    return mask


def test_sizing_32bit_memory() -> None:
    fn = make_function()
    fn.add_bar(0, Bar(0x4000))
    assert fn.config_read(0x10, 4) == 0
    assert probe(fn, 0x10) == 0xFFFFC000
    assert fn.config_read(0x10, 4) == 0  # restored


def test_sizing_prefetchable_and_64bit() -> None:
    fn = make_function()
    fn.add_bar(0, Bar(0x1000, prefetchable=True))
    fn.add_bar(2, Bar(1 << 33, BarKind.MEM64, prefetchable=True))
    assert probe(fn, 0x10) == 0xFFFFF008
    assert fn.config_read(0x18, 4) == 0x0C  # 64-bit, prefetchable type bits
    assert probe(fn, 0x18) == 0x0000000C  # no address bits below 8 GiB
    assert probe(fn, 0x1C) == 0xFFFFFFFE
    assert fn.bars[2] is fn.bars[3]


def test_sizing_io_and_rom() -> None:
    fn = make_function()
    fn.add_bar(1, Bar(32, BarKind.IO))
    fn.add_rom(Bar(0x10000, BarKind.ROM))
    assert fn.config_read(0x14, 4) == 0x1
    assert probe(fn, 0x14) == 0xFFFFFFE1
    # ROM: address bits 31:11 above the size, plus the writable Enable bit.
    assert probe(fn, 0x30) == 0xFFFF0001
    fn.config_write(0x30, 4, 0xFFFFF800)  # Linux's ROM probe leaves Enable clear
    assert fn.config_read(0x30, 4) == 0xFFFF0000


def test_unimplemented_bars_read_zero() -> None:
    fn = make_function()
    fn.add_bar(0, Bar(0x1000))
    for register in (0x14, 0x18, 0x1C, 0x20, 0x24, 0x30):
        assert probe(fn, register) == 0


def test_bar_layout_errors() -> None:
    fn = make_function()
    with pytest.raises(PciLayoutError):
        Bar(0x3000)
    with pytest.raises(PciLayoutError):
        Bar(512, BarKind.IO)
    with pytest.raises(PciLayoutError):
        Bar(0x1000, BarKind.IO, prefetchable=True)
    with pytest.raises(PciLayoutError):
        fn.add_bar(5, Bar(0x1000, BarKind.MEM64))
    fn.add_bar(0, Bar(0x1000, BarKind.MEM64))
    with pytest.raises(PciLayoutError):
        fn.add_bar(1, Bar(0x1000))
    bar = fn.bars[0]
    assert bar is not None
    bar.map_region(0, 0x100, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(PciLayoutError):
        bar.map_region(0x80, 0x100, lambda o, s: 0, lambda o, s, v: None)
    with pytest.raises(PciLayoutError):
        bar.map_region(0xF00, 0x200, lambda o, s: 0, lambda o, s, v: None)


def _host_with(fn: PciFunction) -> PciHost:
    host = PciHost()
    host.root_bus.add_function(fn, 3)
    return host


def test_probe_does_not_move_decoded_address() -> None:
    fn = make_function()
    bar = fn.add_bar(0, Bar(0x1000))
    ram = BytesRegion(bytes(range(256)) * 16)
    bar.map_region(0, 0x1000, ram.read, ram.write)
    host = _host_with(fn)
    fn.config_write(0x10, 4, 0xE000_0000)
    fn.config_write(0x04, 2, MEM)
    assert host.mmio_read(0xE000_0004, 4) == 0x07060504
    # OpenBSD-style probe 0xfffffff0 while decoding stays on.
    fn.config_write(0x10, 4, 0xFFFFFFF0)
    assert fn.config_read(0x10, 4) == 0xFFFFF000
    assert bar.address == 0xE000_0000
    assert host.mmio_read(0xE000_0004, 4) == 0x07060504
    assert host.mmio_read(0xFFFF_F004, 4) == 0xFFFFFFFF
    fn.config_write(0x10, 4, 0xE000_0000)
    # A real new address moves it.
    fn.config_write(0x10, 4, 0xD000_0000)
    assert host.mmio_read(0xE000_0004, 4) == 0xFFFFFFFF
    assert host.mmio_read(0xD000_0004, 2) == 0x0504


def test_64bit_probe_sequence_keeps_address() -> None:
    fn = make_function()
    bar = fn.add_bar(0, Bar(0x4000, BarKind.MEM64))
    fn.config_write(0x10, 4, 0x0010_0000)
    fn.config_write(0x14, 4, 0x80)
    assert bar.address == 0x80_0010_0000
    # Linux __pci_read_base: probe lo, probe hi, restore lo, restore hi.
    lo, hi = fn.config_read(0x10, 4), fn.config_read(0x14, 4)
    fn.config_write(0x10, 4, 0xFFFFFFFF)
    fn.config_write(0x14, 4, 0xFFFFFFFF)
    assert (fn.config_read(0x14, 4) << 32 | fn.config_read(0x10, 4)) == 0xFFFFFFFF_FFFFC004
    fn.config_write(0x10, 4, lo)
    assert bar.address == 0x80_0010_0000
    fn.config_write(0x14, 4, hi)
    assert bar.address == 0x80_0010_0000


def test_decoding_needs_command_bits() -> None:
    fn = make_function()
    mem = fn.add_bar(0, Bar(0x1000))
    io = fn.add_bar(1, Bar(16, BarKind.IO))
    regs = BytesRegion(bytes(16))
    io.map_region(0, 16, regs.read, regs.write)
    ram = BytesRegion(bytes(0x1000))
    mem.map_region(0, 0x1000, ram.read, ram.write)
    host = _host_with(fn)
    fn.config_write(0x10, 4, 0xE000_0000)
    fn.config_write(0x14, 4, 0xC010)
    host.mmio_write(0xE000_0000, 4, 0x12345678)
    host.io_write(0xC010, 1, 0x5A)
    assert ram.read(0, 4) == 0 and regs.read(0, 1) == 0
    assert not mem.decoding() and not io.decoding()
    fn.config_write(0x04, 2, MEM)
    host.mmio_write(0xE000_0000, 4, 0x12345678)
    host.io_write(0xC010, 1, 0x5A)
    assert ram.read(0, 4) == 0x12345678 and regs.read(0, 1) == 0
    fn.config_write(0x04, 2, MEM | IO)
    host.io_write(0xC010, 1, 0x5A)
    assert host.io_read(0xC010, 1) == 0x5A
    fn.config_write(0x04, 2, IO)
    assert host.mmio_read(0xE000_0000, 4) == 0xFFFFFFFF


def test_rom_decodes_only_with_enable_bit() -> None:
    fn = make_function()
    rom = fn.add_rom(Bar(0x800, BarKind.ROM))
    image = BytesRegion(b"\x55\xaa" + bytes(0x7FE), writable=False)
    rom.map_region(0, 0x800, image.read, image.write)
    host = _host_with(fn)
    fn.config_write(0x04, 2, MEM)
    fn.config_write(0x30, 4, 0xF000_0000)
    assert host.mmio_read(0xF000_0000, 2) == 0xFFFF
    fn.config_write(0x30, 4, 0xF000_0001)
    assert host.mmio_read(0xF000_0000, 2) == 0xAA55
    host.mmio_write(0xF000_0000, 2, 0)
    assert host.mmio_read(0xF000_0000, 2) == 0xAA55


def test_unmapped_bar_offsets_read_zero() -> None:
    fn = make_function()
    bar = fn.add_bar(0, Bar(0x1000))
    regs = BytesRegion(b"\xff" * 0x10)
    bar.map_region(0x100, 0x10, regs.read, regs.write)
    assert bar.mmio_read(0x0, 4) == 0
    assert bar.mmio_read(0x104, 4) == 0xFFFFFFFF
    assert bar.mmio_read(0x10E, 4) == 0  # straddles the end of the region


def test_bridge_forwards_only_inside_its_windows() -> None:
    host = PciHost()
    bridge = PciBridge(0x1B36, 0x0001)
    host.root_bus.add_function(bridge, 1)
    fn = make_function()
    bar = fn.add_bar(0, Bar(0x1000))
    ram = BytesRegion(b"\x42" * 0x1000)
    bar.map_region(0, 0x1000, ram.read, ram.write)
    bridge.secondary_bus.add_function(fn, 0)
    assign_resources(host)
    address = bar.address
    assert bridge.memory_window()[0] <= address <= bridge.memory_window()[1]
    assert host.mmio_read(address, 1) == 0x42
    bridge.config_write(0x04, 2, 0)  # the bridge stops forwarding memory
    assert host.mmio_read(address, 1) == 0xFF
    bridge.config_write(0x04, 2, MEM)
    bridge.config_write(0x20, 4, 0xD000_D000)  # move the window away
    assert host.mmio_read(address, 1) == 0xFF
