"""Capability lists: placement rules, chain walking, PM, PCIe, extended capabilities."""

from __future__ import annotations

import pytest

from iovirt.pci import (
    Bar,
    ExtendedCapability,
    MsiCapability,
    MsixCapability,
    PciCapabilityChainError,
    PcieCapability,
    PciePortType,
    PciFunction,
    PciLayoutError,
    PmCapability,
    VendorCapability,
    walk_capabilities,
    walk_extended_capabilities,
)
from iovirt.pci.topology import make_msix_endpoint


def make_function(pcie: bool = True) -> PciFunction:
    return PciFunction(0x1B36, 0x0005, 0x00FF00, pcie=pcie)


def assert_chain_sane(fn: PciFunction) -> None:
    """Dword aligned, >= 0x40, no overlap, terminated (walk raises on loops)."""
    caps = walk_capabilities(fn.config_read)
    spans = sorted((off, off + next(c.size for c in fn.capabilities if c.offset == off)) for _, off in caps)
    for (a_start, a_end), (b_start, _) in zip(spans, spans[1:]):
        assert a_end <= b_start
    for _, off in caps:
        assert off % 4 == 0 and off >= 0x40
    if fn.config.size == 0x100:
        return
    ext = walk_extended_capabilities(fn.config_read)
    ext_spans = sorted((off, off + next(c.size for c in fn.extended_capabilities if c.offset == off)) for _, _, off in ext)
    for (a_start, a_end), (b_start, _) in zip(ext_spans, ext_spans[1:]):
        assert a_end <= b_start


def test_chain_order_and_walk() -> None:
    fn = make_msix_endpoint()
    assert walk_capabilities(fn.config_read) == [(0x01, 0x40), (0x10, 0x48), (0x11, 0x84)]
    assert walk_extended_capabilities(fn.config_read) == [(0x000B, 1, 0x100)]
    assert_chain_sane(fn)


def test_explicit_offsets_and_rules() -> None:
    fn = make_function()
    fn.add_capability(VendorCapability(bytes(5)), offset=0x80)
    with pytest.raises(PciLayoutError, match="dword"):
        fn.add_capability(PmCapability(), offset=0x42)
    with pytest.raises(PciLayoutError, match="lie in"):
        fn.add_capability(PmCapability(), offset=0x3C)
    with pytest.raises(PciLayoutError, match="overlaps"):
        fn.add_capability(PmCapability(), offset=0x84)
    with pytest.raises(PciLayoutError, match="lie in"):
        fn.add_capability(PcieCapability(), offset=0xF0)
    fn.add_capability(PmCapability(), offset=0x40)
    fn.add_capability(MsiCapability(1))  # after the last one by address: 0x88
    assert walk_capabilities(fn.config_read) == [(0x09, 0x80), (0x01, 0x40), (0x05, 0x88)]
    assert_chain_sane(fn)
    with pytest.raises(PciLayoutError, match="already installed"):
        fn.add_capability(fn.capabilities[0])


def test_capabilities_are_read_only() -> None:
    fn = make_msix_endpoint()
    before = fn.config.snapshot()[0x40:0x100]
    for off in range(0x40, 0x100, 4):
        fn.config_write(off, 4, 0xFFFFFFFF)
        fn.config_write(off, 4, 0)
    after = fn.config.snapshot()
    # Only documented writable fields changed: the chain itself is intact.
    assert walk_capabilities(fn.config_read) == [(0x01, 0x40), (0x10, 0x48), (0x11, 0x84)]
    assert after[0x40:0x42] == before[0:2]


def test_walk_detects_loops_and_bad_pointers() -> None:
    fn = make_function()
    fn.add_capability(VendorCapability(bytes(1)))
    fn.add_capability(VendorCapability(bytes(1)))
    fn.config.set(0x45, 1, 0x40)  # second cap points back at the first
    with pytest.raises(PciCapabilityChainError, match="loop"):
        walk_capabilities(fn.config_read)
    fn.config.set(0x45, 1, 0x21)
    with pytest.raises(PciCapabilityChainError, match="misaligned"):
        walk_capabilities(fn.config_read)
    fn.add_extended_capability(ExtendedCapability(0x0B, 1, bytes(8)))
    fn.add_extended_capability(ExtendedCapability(0x0B, 1, bytes(8)))
    fn.config.set(0x10C, 4, fn.config.get(0x10C, 4) | 0x100 << 20)
    with pytest.raises(PciCapabilityChainError, match="loops"):
        walk_extended_capabilities(fn.config_read)


def test_extended_capabilities() -> None:
    fn = make_function()
    assert walk_extended_capabilities(fn.config_read) == []
    with pytest.raises(PciLayoutError, match="0x100"):
        fn.add_extended_capability(ExtendedCapability(0x10, 1, bytes(0x3C)), offset=0x140)
    off = fn.add_extended_capability(ExtendedCapability(0x10, 1, bytes(0x3C)))
    assert off == 0x100
    off2 = fn.add_extended_capability(ExtendedCapability(0x0B, 1, b"\x01\x02\x03\x04", wmask=b"\xff\x00\x00\x00"))
    assert off2 == 0x140
    assert fn.config_read(0x100, 4) == 0x1401_0010
    assert fn.config_read(0x140, 4) == 0x0001_000B
    fn.config_write(0x144, 4, 0xFFFFFFFF)
    assert fn.config_read(0x144, 4) == 0x040302FF
    with pytest.raises(PciLayoutError, match="PCI Express"):
        make_function(pcie=False).add_extended_capability(ExtendedCapability(0x0B))
    with pytest.raises(PciLayoutError, match="overlaps"):
        fn.add_extended_capability(ExtendedCapability(0x0B, 1, bytes(8)), offset=0x140)


def test_power_management_states() -> None:
    fn = make_function()
    pm = PmCapability(pme_support=0b11001)
    off = fn.add_capability(pm)
    assert fn.config_read(off + 2, 2) == 0xC803
    fn.config_write(off + 4, 2, 3)
    assert pm.power_state == 3
    fn.config_write(off + 4, 2, 1)  # D1 unsupported: discarded
    assert pm.power_state == 3
    fn.config_write(off + 4, 1, 0)
    assert pm.power_state == 0
    fn.config.set(off + 4, 2, 0x8000 | fn.config.get(off + 4, 2))  # PME_Status raised
    fn.config_write(off + 4, 2, 0x8100)
    assert fn.config_read(off + 4, 2) == 0x0108  # PME_Status cleared, PME_En set, No_Soft_Reset


def test_pcie_capability_types() -> None:
    ep = make_function()
    off = ep.add_capability(PcieCapability())
    assert ep.config_read(off + 2, 2) == 0x0002
    root = PciFunction(0x1B36, 0x000C, 0x060400, pcie=True)
    roff = root.add_capability(PcieCapability(PciePortType.ROOT_PORT, slot=True, port_number=3))
    assert root.config_read(roff + 2, 2) == 0x0142
    assert root.config_read(roff + 0xC, 4) >> 24 == 3
    assert root.config_read(roff + 0x12, 2) & 0x2000  # link up
    root.config.set(roff + 0x1A, 2, 0x0041)
    root.config_write(roff + 0x1A, 2, 0x0001)  # clear attention button pressed
    assert root.config_read(roff + 0x1A, 2) == 0x0040
    ep.config_write(off + 0xA, 2, 0xFFFF)
    assert ep.config_read(off + 0xA, 2) == 0


def test_pcie_flr_resets_function() -> None:
    fn = make_function()
    fn.add_bar(0, Bar(0x4000))
    fn.add_capability(PcieCapability())
    cap = MsixCapability(2, table_bar=0)
    off = fn.add_capability(cap)
    fn.config_write(0x10, 4, 0xE000_0000)
    fn.config_write(0x04, 2, 0x6)
    fn.config_write(off + 2, 2, 0x8000)
    devctl = 0x40 + 8
    fn.config_write(devctl, 2, 0x0020)  # MPS 256: no reset
    assert fn.config_read(0x04, 2) == 0x6
    fn.config_write(devctl + 1, 1, 0x80)  # Initiate FLR via a byte write
    assert fn.config_read(0x04, 2) == 0
    assert fn.config_read(0x10, 4) == 0
    assert not cap.enabled
    assert fn.config_read(devctl, 2) == 0x2810  # reset value, FLR bit reads 0


def test_msix_needs_its_bar() -> None:
    fn = make_function()
    with pytest.raises(PciLayoutError, match="BAR0"):
        fn.add_capability(MsixCapability(4, table_bar=0))
    fn.add_bar(0, Bar(0x40))
    with pytest.raises(PciLayoutError):
        fn.add_capability(MsixCapability(4, table_bar=0))  # table + PBA do not fit
    with pytest.raises(PciLayoutError):
        MsixCapability(4, table_bar=0, table_offset=4)
    with pytest.raises(PciLayoutError, match="overlap"):
        fn.add_bar(1, Bar(0x1000))
        fn.add_capability(MsixCapability(4, table_bar=1, pba_offset=0x20))
    assert walk_capabilities(fn.config_read) == []  # failed adds leave the chain untouched
    fn.add_capability(MsixCapability(4, table_bar=1))
    assert walk_capabilities(fn.config_read) == [(0x11, 0x40)]


def test_every_default_function_has_a_sane_chain() -> None:
    from iovirt.pci.topology import build_default_host

    host = build_default_host()
    functions = list(host.root_bus.walk())
    assert len(functions) == 5
    for fn in functions:
        assert_chain_sane(fn)


def test_pcie_devctl_hardwires_fields_of_unadvertised_capabilities():
    # Found by the QEMU cross-check (issue 18): Device Control bits for
    # capabilities Device Capabilities does not advertise must read 0, and
    # Max_Payload_Size may not exceed the supported 128 bytes (PCIe 3.0 §7.8.4).
    from iovirt.pci.pcie import PCI_EXP_DEVCAP, PCI_EXP_DEVCTL

    fn = PciFunction(0x1AF4, 0x1041, 0x020000, pcie=True)
    offset = fn.add_capability(PcieCapability(PciePortType.ENDPOINT))
    devcap = fn.config_read(offset + PCI_EXP_DEVCAP, 4)
    assert devcap & 0x7 == 0  # Max_Payload_Size Supported: 128 bytes
    assert not devcap & (1 << 5 | 3 << 3)  # no Extended Tag, no Phantom Functions
    fn.config_write(offset + PCI_EXP_DEVCTL, 2, 0x07E0)  # MPS 111b, Ext Tag, Phantom, Aux PM
    assert fn.config_read(offset + PCI_EXP_DEVCTL, 2) & 0x07E0 == 0
