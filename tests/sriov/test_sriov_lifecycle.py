"""VF lifecycle: VFs appear at their routing IDs, decode through the PF's VF BARs, and go."""

from __future__ import annotations

import logging

import pytest

from iovirt.pci import PciFunction, PciHost
from iovirt.pci.regs import PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY
from iovirt.sriov import SriovLayoutError, VirtualFunction, attach_pf
from iovirt.sriov.regs import (
    PCI_SRIOV_BAR,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_SYS_PGSIZE,
)

from iovirt.sriov.testing import CLASS_ETHERNET, MSIX_OFFSET, VENDOR, VF_BAR_SIZE, VF_DEVICE, make_generic_pf

PF_SLOT = 3

BAR0_BASE = 0x1_0000_0000
BAR2_BASE = 0xD000_0000


def cfg_write(host: PciHost, cap, reg: int, size: int, value: int) -> None:
    host.config_write(0, PF_SLOT, 0, cap.offset + reg, size, value)


def enable(host: PciHost, cap, num_vfs: int, mse: bool = True) -> None:
    cfg_write(host, cap, PCI_SRIOV_BAR, 4, BAR0_BASE & 0xFFFFFFFF)
    cfg_write(host, cap, PCI_SRIOV_BAR + 4, 4, BAR0_BASE >> 32)
    cfg_write(host, cap, PCI_SRIOV_BAR + 8, 4, BAR2_BASE)
    cfg_write(host, cap, PCI_SRIOV_NUM_VF, 2, num_vfs)
    cfg_write(host, cap, PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE | (PCI_SRIOV_CTRL_MSE if mse else 0))


def ecam(host: PciHost, bus: int, devfn: int, reg: int, size: int) -> int:
    return host.ecam_read(bus << 20 | devfn << 12 | reg, size)


def cf8(host: PciHost, bus: int, devfn: int, reg: int) -> int:
    host.io_write(0xCF8, 4, 0x80000000 | bus << 16 | devfn << 8 | reg)
    return host.io_read(0xCFC, 4)


def test_vfs_appear_at_their_routing_ids_and_go(host, pf_factory) -> None:
    _, cap = pf_factory()
    vf_devfns = [PF_SLOT * 8 + 8 + n for n in range(7)]
    assert all(ecam(host, 0, devfn, 8, 4) == 0xFFFFFFFF for devfn in vf_devfns)
    enable(host, cap, 7)
    for devfn in vf_devfns:
        assert ecam(host, 0, devfn, 0, 4) == 0xFFFFFFFF  # Vendor/Device ID read 0xFFFF
        assert ecam(host, 0, devfn, 8, 4) >> 8 == CLASS_ETHERNET
        assert cf8(host, 0, devfn, 8) >> 8 == CLASS_ETHERNET
        assert host.config_read(0, devfn >> 3, devfn & 7, 8, 4) >> 8 == CLASS_ETHERNET
    assert ecam(host, 0, vf_devfns[-1] + 1, 8, 4) == 0xFFFFFFFF  # no eighth VF
    cfg_write(host, cap, PCI_SRIOV_CTRL, 2, 0)
    assert cap.enabled_vfs == []
    assert all(ecam(host, 0, devfn, 8, 4) == 0xFFFFFFFF for devfn in vf_devfns)
    assert all(cf8(host, 0, devfn, 8) == 0xFFFFFFFF for devfn in vf_devfns)


def test_vf_header_behaves_like_a_vf(host, pf_factory) -> None:
    pf, cap = pf_factory()
    enable(host, cap, 2)
    vf = cap.enabled_vfs[1]
    read = vf.config_read
    assert (read(0, 2), read(2, 2)) == (0xFFFF, 0xFFFF)
    assert (vf.vendor_id, vf.device_id) == (VENDOR, VF_DEVICE)  # what Linux shows
    assert read(0x2C, 4) == pf.config_read(0x2C, 4)  # Subsystem Vendor ID / ID
    assert read(0x0E, 1) == 0  # Header Type 0, Multi-Function clear
    assert read(0x3C, 2) == 0  # no INTx: Interrupt Line and Pin
    # Header BARs and ROM read 0 and ignore writes, sizing probes included.
    for reg in range(0x10, 0x28, 4):
        vf.config_write(reg, 4, 0xFFFFFFFF)
        assert read(reg, 4) == 0
    vf.config_write(0x30, 4, 0xFFFFFFFF)
    assert read(0x30, 4) == 0
    # Command: only Bus Master Enable; memory decoding is the PF's VF MSE.
    vf.config_write(PCI_COMMAND, 2, 0xFFFF)
    assert read(PCI_COMMAND, 2) == PCI_COMMAND_MASTER
    vf.config_write(0x3C, 1, 0x0B)
    assert read(0x3C, 1) == 0
    # Capabilities list like any PCIe function.
    assert read(0x34, 1) != 0 and read(6, 2) & 0x10


def test_vf_bar_n_of_vf_k_at_base_plus_k_size_only_with_vf_mse(host, pf_factory) -> None:
    _, cap = pf_factory()
    enable(host, cap, 4, mse=False)
    for k in range(4):
        assert host.mmio_read(BAR0_BASE + k * VF_BAR_SIZE, 4) == 0xFFFFFFFF
    cfg_write(host, cap, PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
    for k in range(4):
        host.mmio_write(BAR0_BASE + k * VF_BAR_SIZE, 4, 0xA0 + k)
    assert [host.mmio_read(BAR0_BASE + k * VF_BAR_SIZE, 4) for k in range(4)] == [0xA0, 0xA1, 0xA2, 0xA3]
    # Each VF's own BAR region got the write: isolation between VFs.
    assert [vf.own_bars()[0].mmio_read(0, 4) for vf in cap.enabled_vfs] == [0xA0, 0xA1, 0xA2, 0xA3]
    # BAR2 (4 KiB per VF): VF 3 decodes at base + 3 * 4 KiB; past the last VF nothing does.
    assert cap.enabled_vfs[3].iter_bars()[1].address == BAR2_BASE + 3 * 0x1000
    assert host.mmio_read(BAR0_BASE + 4 * VF_BAR_SIZE, 4) == 0xFFFFFFFF
    # The PF's own Command Memory Space does not matter, VF MSE does.
    assert not cap.pf.command & PCI_COMMAND_MEMORY
    cfg_write(host, cap, PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE)
    assert host.mmio_read(BAR0_BASE, 4) == 0xFFFFFFFF


def test_vf_bar_stride_follows_system_page_size(host, pf_factory) -> None:
    _, cap = pf_factory()
    cfg_write(host, cap, PCI_SRIOV_SYS_PGSIZE, 4, 0x10)  # 64 KiB pages
    enable(host, cap, 2)
    host.mmio_write(BAR0_BASE + 0x10000, 4, 0x5A)
    assert cap.enabled_vfs[1].own_bars()[0].mmio_read(0, 4) == 0x5A
    # Bytes of the page past the VF's own 8 KiB BAR read 0, not another VF.
    assert host.mmio_read(BAR0_BASE + 0x4000, 4) == 0


def test_disable_resets_the_vfs(host, pf_factory, sink) -> None:
    _, cap = pf_factory()
    enable(host, cap, 1)
    vf = cap.enabled_vfs[0]
    vf.config_write(PCI_COMMAND, 2, PCI_COMMAND_MASTER)
    host.mmio_write(BAR0_BASE + MSIX_OFFSET + 12, 4, 0)  # unmask vector 0
    cfg_write(host, cap, PCI_SRIOV_CTRL, 2, 0)
    assert vf.bus is None and vf.config_read(PCI_COMMAND, 2) == 0
    assert vf.msix is not None and vf.msix.entry(0)[2]  # masked again
    enable(host, cap, 1)
    assert cap.enabled_vfs == [vf] and vf.config_read(PCI_COMMAND, 2) == 0


def test_pf_function_level_reset_removes_vfs(host, pf_factory) -> None:
    pf, cap = pf_factory()
    enable(host, cap, 3)
    pcie = pf.capabilities[0]
    pf.config_write(pcie.offset + 8, 2, 0x8000)  # Device Control: Initiate FLR
    assert cap.control == 0 and cap.num_vfs == 0 and cap.enabled_vfs == []
    assert cap.vf_bar_base(0) == 0
    assert ecam(host, 0, PF_SLOT * 8 + 8, 8, 4) == 0xFFFFFFFF
    # The capability works again after the reset: NumVFs is writable.
    enable(host, cap, 2)
    assert len(cap.enabled_vfs) == 2


def test_each_vf_msix_message_carries_its_own_rid(host, pf_factory, sink) -> None:
    _, cap = pf_factory()
    enable(host, cap, 7)
    for k, vf in enumerate(cap.enabled_vfs):
        table = BAR0_BASE + k * VF_BAR_SIZE + MSIX_OFFSET
        host.mmio_write(table, 4, 0xFEE00000)
        host.mmio_write(table + 8, 4, 0x40 + k)
        host.mmio_write(table + 12, 4, 0)
        vf.config_write(PCI_COMMAND, 2, PCI_COMMAND_MASTER)
        msix = vf.msix
        assert msix is not None
        vf.config_write(msix.offset + 2, 2, 0x8000)  # MSI-X Enable
        vf.raise_interrupt(0)
    assert sink.messages == [(PF_SLOT * 8 + 8 + k, 0xFEE00000, 0x40 + k) for k in range(7)]


def test_attach_pf_rejects_vfs_off_the_bus() -> None:
    host = PciHost()
    pf = make_generic_pf(16)
    with pytest.raises(SriovLayoutError, match="off the PF's bus"):
        attach_pf(host.root_bus, pf, 31)
    assert host.root_bus.function(31) is None and pf.bus is None
    attach_pf(host.root_bus, pf, 28)  # 0xE0 + 8 + 15 = 0xF7 fits


def test_attach_pf_rejects_a_slot_taken_by_another_function() -> None:
    host = PciHost()
    other = PciFunction(0x1B36, 5, 0xFF00)
    host.root_bus.add_function(other, PF_SLOT + 1, 3)
    with pytest.raises(SriovLayoutError, match="would take 04.3"):
        attach_pf(host.root_bus, make_generic_pf(16), PF_SLOT)


def test_vf_enable_refused_when_a_slot_was_taken_later(host, pf_factory, caplog) -> None:
    _, cap = pf_factory()
    host.root_bus.add_function(PciFunction(0x1B36, 5, 0xFF00), PF_SLOT + 1, 1)
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        enable(host, cap, 4)
    assert not cap.vf_enabled and cap.enabled_vfs == []
    assert "would take 04.1" in caplog.text


def test_vf_builder_must_give_every_vf_the_same_bars() -> None:
    from iovirt.pci import Bar

    def uneven(sriov, k: int) -> VirtualFunction:
        vf = VirtualFunction(sriov, k)
        vf.add_bar(0, Bar(0x1000 << (k % 2)))
        return vf

    with pytest.raises(SriovLayoutError, match="different BARs"):
        make_generic_pf(2, make_vf=uneven)
    with pytest.raises(SriovLayoutError, match="did not return VF 1"):
        make_generic_pf(2, make_vf=lambda sriov, k: VirtualFunction(sriov, 0))
