"""MSI and MSI-X: message computation, masking and pending bits, delivery seam."""

from __future__ import annotations

from iovirt.pci import Bar, MsiCapability, MsixCapability, PciFunction, PciHost
from iovirt.pci.testing import RecordingMsiSink

MASTER = 0x4
MSI_ADDR = 0xFEE0_0000


def msi_function(vectors: int = 8, mask: bool = True, addr64: bool = True):
    host = PciHost(msi_sink=RecordingMsiSink())
    fn = PciFunction(0x1B36, 0x0005, 0x00FF00)
    cap = MsiCapability(vectors, addr64=addr64, per_vector_mask=mask)
    off = fn.add_capability(cap)
    host.root_bus.add_function(fn, 4, 2)  # requester ID 00:04.2
    fn.config_write(0x04, 2, MASTER)
    return host, fn, cap, off


def test_msi_layouts_and_sizes() -> None:
    assert MsiCapability(1, addr64=False).size == 0x0A
    assert MsiCapability(1).size == 0x0E
    assert MsiCapability(1, addr64=False, per_vector_mask=True).size == 0x14
    assert MsiCapability(1, per_vector_mask=True).size == 0x18


def test_msi_multiple_vectors_and_data() -> None:
    host, fn, cap, off = msi_function(vectors=8)
    sink = host.msi_sink
    assert fn.config_read(off + 2, 2) == 0x0186  # per-vector mask, 64-bit, MMC=8
    fn.config_write(off + 4, 4, MSI_ADDR | 0x3)  # low 2 bits read-only 0
    assert fn.config_read(off + 4, 4) == MSI_ADDR
    fn.config_write(off + 8, 4, 0x1)
    fn.config_write(off + 0xC, 2, 0x4120)
    fn.config_write(off + 2, 2, 0x0021)  # enable, MME = 4 vectors
    fn.raise_interrupt(3)
    fn.raise_interrupt(5)  # beyond the enabled vectors: dropped
    assert sink.messages == [(0x0022, 0x1_FEE0_0000, 0x4123)]
    # MMC is read-only: writing MME beyond it is capped at what the function supports.
    fn.config_write(off + 2, 2, 0x0071)
    assert cap.enabled_vectors == 8


def test_msi_masked_vector_latches_pending_and_fires_on_unmask() -> None:
    host, fn, cap, off = msi_function(vectors=4)
    sink = host.msi_sink
    fn.config_write(off + 4, 4, MSI_ADDR)
    fn.config_write(off + 0xC, 2, 0x40)
    fn.config_write(off + 2, 2, 0x0021)
    fn.config_write(off + 0x10, 4, 0xFFFFFFFF)
    assert fn.config_read(off + 0x10, 4) == 0xF  # only implemented vectors maskable
    fn.raise_interrupt(2)
    assert sink.messages == []
    assert fn.config_read(off + 0x14, 4) == 0b100
    fn.config_write(off + 0x14, 4, 0)  # Pending is read-only
    assert fn.config_read(off + 0x14, 4) == 0b100
    fn.config_write(off + 0x10, 1, 0b1011)
    assert sink.messages == [(0x0022, MSI_ADDR, 0x42)]
    assert fn.config_read(off + 0x14, 4) == 0


def test_msi_disabled_falls_back_to_intx_status() -> None:
    host = PciHost(msi_sink=RecordingMsiSink())
    fn = PciFunction(0x1B36, 0x0005, 0x00FF00, interrupt_pin=1)
    fn.add_capability(MsiCapability(1))
    host.root_bus.add_function(fn, 1)
    fn.raise_interrupt(0)
    assert fn.config_read(0x06, 2) & 0x8
    fn.lower_intx()
    assert not fn.config_read(0x06, 2) & 0x8
    assert host.msi_sink.messages == []


def msix_function(vectors: int = 4):
    sink = RecordingMsiSink()
    host = PciHost(msi_sink=sink)
    fn = PciFunction(0x1B36, 0x0005, 0x00FF00, pcie=True)
    bar = fn.add_bar(2, Bar(0x4000))
    cap = MsixCapability(vectors, table_bar=2, table_offset=0x1000, pba_offset=0x3000)
    off = fn.add_capability(cap)
    host.root_bus.add_function(fn, 5)
    fn.config_write(0x04, 2, MASTER | 0x2)
    fn.config_write(0x18, 4, 0xE000_0000)
    return host, sink, fn, cap, off, bar


def program_entry(host: PciHost, vector: int, address: int, data: int, masked: bool) -> None:
    entry = 0xE000_1000 + 16 * vector
    host.mmio_write(entry, 8, address)
    host.mmio_write(entry + 8, 4, data)
    host.mmio_write(entry + 12, 4, 1 if masked else 0)


def test_msix_registers_and_initial_mask() -> None:
    host, sink, fn, cap, off, bar = msix_function(vectors=4)
    assert fn.config_read(off, 4) == 0x0003_0011
    assert fn.config_read(off + 4, 4) == 0x1000 | 2
    assert fn.config_read(off + 8, 4) == 0x3000 | 2
    for v in range(4):
        assert host.mmio_read(0xE000_1000 + 16 * v + 12, 4) == 1
    fn.config_write(off + 2, 2, 0xFFFF)
    assert fn.config_read(off + 2, 2) == 0xC003  # only Enable and Function Mask writable


def test_msix_masked_vector_sets_pba_and_delivers_on_unmask() -> None:
    host, sink, fn, cap, off, bar = msix_function()
    fn.config_write(off + 3, 1, 0x80)  # 1-byte write to Message Control + 1 (libvfio-user#640)
    assert cap.enabled
    program_entry(host, 1, MSI_ADDR | 0x1000, 0x31, masked=True)
    fn.raise_interrupt(1)
    assert sink.messages == []
    assert host.mmio_read(0xE000_3000, 8) == 0b10
    host.mmio_write(0xE000_3000, 8, 0)  # PBA is read-only
    assert cap.is_pending(1)
    host.mmio_write(0xE000_1000 + 16 + 12, 4, 0)
    assert sink.messages == [(0x0028, MSI_ADDR | 0x1000, 0x31)]
    assert host.mmio_read(0xE000_3000, 8) == 0
    fn.raise_interrupt(1)
    assert len(sink.messages) == 2


def test_msix_function_mask() -> None:
    host, sink, fn, cap, off, bar = msix_function()
    for v in range(4):
        program_entry(host, v, MSI_ADDR, 0x40 + v, masked=False)
    fn.config_write(off + 2, 2, 0xC000)  # enabled, function masked
    fn.raise_interrupt(0)
    fn.raise_interrupt(2)
    assert sink.messages == [] and cap.is_pending(0) and cap.is_pending(2)
    fn.config_write(off + 2, 2, 0x8000)
    assert sorted(m[2] for m in sink.messages) == [0x40, 0x42]
    assert not cap.is_pending(0) and not cap.is_pending(2)


def test_msix_vector_control_reserved_bits_and_widths() -> None:
    host, sink, fn, cap, off, bar = msix_function()
    host.mmio_write(0xE000_100C, 4, 0xFFFF_FFFE)
    assert host.mmio_read(0xE000_100C, 4) == 0
    host.mmio_write(0xE000_1000, 4, 0xFEE0_1234)
    host.mmio_write(0xE000_1004, 4, 0x1)
    assert host.mmio_read(0xE000_1000, 8) == 0x1_FEE0_1234
    assert cap.entry(0) == (0x1_FEE0_1234, 0, False)


def test_msix_disabled_neither_sends_nor_latches() -> None:
    host, sink, fn, cap, off, bar = msix_function()
    program_entry(host, 0, MSI_ADDR, 1, masked=True)
    fn.raise_interrupt(0)
    assert not cap.is_pending(0)
    assert sink.messages == []


def test_msix_without_bus_master_is_dropped() -> None:
    host, sink, fn, cap, off, bar = msix_function()
    program_entry(host, 0, MSI_ADDR, 1, masked=False)
    fn.config_write(off + 2, 2, 0x8000)
    fn.config_write(0x04, 2, 0x2)
    fn.raise_interrupt(0)
    assert sink.messages == []


def test_reset_restores_msix_and_msi_state() -> None:
    host, sink, fn, cap, off, bar = msix_function()
    program_entry(host, 0, MSI_ADDR, 7, masked=False)
    fn.config_write(off + 2, 2, 0xC000)
    fn.raise_interrupt(0)
    assert cap.is_pending(0)
    fn.reset()
    assert not cap.enabled and not cap.is_pending(0)
    assert cap.entry(0) == (0, 0, True)
    assert fn.config_read(0x18, 4) == 0 and bar.address == 0
    assert fn.config_read(0x04, 2) == 0


def test_msix_pba_offset_defaults_after_table() -> None:
    cap = MsixCapability(65, table_bar=0)
    assert cap.pba_offset == 65 * 16 and cap.pba_len == 16


def test_recording_sink_satisfies_msisink_signature() -> None:
    import inspect

    from iovirt.pci.msi import MsiSink

    expected = inspect.signature(MsiSink.deliver_msi)
    assert list(expected.parameters) == ["self", "source_id", "address", "data"]
    assert inspect.signature(RecordingMsiSink.deliver_msi) == expected
