"""SR-IOV capability registers: layout, defaults, and each rule of PCIe §9.3.3."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iovirt.pci import PciHost
from iovirt.pci.capability import walk_extended_capabilities
from iovirt.sriov import SriovCapability, SriovLayoutError
from iovirt.sriov.regs import (
    PCI_SRIOV_BAR,
    PCI_SRIOV_CAP,
    PCI_SRIOV_CTRL,
    PCI_SRIOV_CTRL_ARI,
    PCI_SRIOV_CTRL_MSE,
    PCI_SRIOV_CTRL_VFE,
    PCI_SRIOV_FUNC_LINK,
    PCI_SRIOV_INITIAL_VF,
    PCI_SRIOV_NUM_VF,
    PCI_SRIOV_STATUS,
    PCI_SRIOV_SUP_PGSIZE,
    PCI_SRIOV_SYS_PGSIZE,
    PCI_SRIOV_TOTAL_VF,
    PCI_SRIOV_VF_DID,
    PCI_SRIOV_VF_OFFSET,
    PCI_SRIOV_VF_STRIDE,
    PCI_SRIOV_VFM,
)

from iovirt.sriov.testing import VF_BAR_SIZE, VF_DEVICE, build_generic_vf, make_generic_pf

PF_SLOT = 3


class Regs:
    """Config accesses to the PF's SR-IOV capability through the host."""

    def __init__(self, host: PciHost, cap: SriovCapability) -> None:
        self.host, self.pos = host, cap.offset

    def read(self, reg: int, size: int) -> int:
        return self.host.config_read(0, PF_SLOT, 0, self.pos + reg, size)

    def write(self, reg: int, size: int, value: int) -> None:
        self.host.config_write(0, PF_SLOT, 0, self.pos + reg, size, value)


@pytest.fixture
def pf_regs(host, pf_factory):
    pf, cap = pf_factory()
    return pf, cap, Regs(host, cap)


def test_capability_header_and_defaults(pf_regs) -> None:
    pf, cap, regs = pf_regs
    assert walk_extended_capabilities(pf.config_read) == [(0x10, 1, 0x100)]
    assert regs.read(PCI_SRIOV_CAP, 4) == 0  # no VF Migration
    assert regs.read(PCI_SRIOV_CTRL, 2) == 0
    assert regs.read(PCI_SRIOV_STATUS, 2) == 0
    assert regs.read(PCI_SRIOV_INITIAL_VF, 2) == 16
    assert regs.read(PCI_SRIOV_TOTAL_VF, 2) == 16
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 0
    assert regs.read(PCI_SRIOV_FUNC_LINK, 1) == 0  # its own function number
    assert regs.read(PCI_SRIOV_VF_OFFSET, 2) == 8
    assert regs.read(PCI_SRIOV_VF_STRIDE, 2) == 1
    assert regs.read(PCI_SRIOV_VF_DID, 2) == VF_DEVICE
    assert regs.read(PCI_SRIOV_SUP_PGSIZE, 4) == 0x553
    assert regs.read(PCI_SRIOV_SYS_PGSIZE, 4) == 1
    # VF BAR0 64-bit prefetchable, VF BAR1 its upper half, VF BAR2 32-bit, BAR3-5 absent.
    assert regs.read(PCI_SRIOV_BAR, 4) == 0xC
    assert [regs.read(PCI_SRIOV_BAR + 4 * i, 4) for i in range(1, 6)] == [0, 0, 0, 0, 0]
    assert regs.read(PCI_SRIOV_VFM, 4) == 0


def test_read_only_fields_ignore_writes(pf_regs) -> None:
    _, _, regs = pf_regs
    for reg, size in ((PCI_SRIOV_CAP, 4), (PCI_SRIOV_TOTAL_VF, 2), (PCI_SRIOV_INITIAL_VF, 2),
                      (PCI_SRIOV_VF_OFFSET, 2), (PCI_SRIOV_VF_STRIDE, 2), (PCI_SRIOV_VF_DID, 2),
                      (PCI_SRIOV_SUP_PGSIZE, 4), (PCI_SRIOV_VFM, 4), (PCI_SRIOV_FUNC_LINK, 1)):
        before = regs.read(reg, size)
        regs.write(reg, size, (1 << (8 * size)) - 1)
        assert regs.read(reg, size) == before, hex(reg)
    # Only VF Enable, VF MSE and ARI Capable Hierarchy are writable in Control; Status is read-only.
    regs.write(PCI_SRIOV_CTRL, 4, 0xFFFFFFFF & ~PCI_SRIOV_CTRL_VFE)
    assert regs.read(PCI_SRIOV_CTRL, 4) == PCI_SRIOV_CTRL_MSE | PCI_SRIOV_CTRL_ARI


def test_num_vfs_writable_only_while_vf_enable_clear(pf_regs, caplog) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_NUM_VF, 2, 4)
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 4
    regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE)
    assert cap.vf_enabled
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        regs.write(PCI_SRIOV_NUM_VF, 2, 2)
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 4
    assert len(cap.enabled_vfs) == 4
    assert "NumVFs write 2 ignored: VF Enable is set" in caplog.text
    regs.write(PCI_SRIOV_CTRL, 2, 0)
    regs.write(PCI_SRIOV_NUM_VF, 2, 2)
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 2


def test_num_vfs_above_total_vfs_is_ignored(pf_regs, caplog) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_NUM_VF, 2, 5)
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        regs.write(PCI_SRIOV_NUM_VF, 2, 17)
        regs.write(PCI_SRIOV_NUM_VF + 1, 1, 0xFF)  # a byte write that would make it 0xFF05
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 5
    assert caplog.text.count("above TotalVFs 16") == 2
    regs.write(PCI_SRIOV_NUM_VF, 2, 16)
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 16


def test_vf_enable_with_num_vfs_zero_reads_back_set_and_enables_no_vf(pf_regs, caplog) -> None:
    # PCIe §9.3.3.3.1: VF Enable is RW; with NumVFs 0, zero VFs become visible (found by the
    # sriov crosscheck area against QEMU: iovirt used to keep the bit clear).
    _, cap, regs = pf_regs
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE)
    assert regs.read(PCI_SRIOV_CTRL, 2) == PCI_SRIOV_CTRL_VFE | PCI_SRIOV_CTRL_MSE
    assert cap.enabled_vfs == []
    assert "VF Enable ignored" not in caplog.text
    regs.write(PCI_SRIOV_NUM_VF, 2, 2)  # frozen while VF Enable is set (§9.3.3.7)
    assert regs.read(PCI_SRIOV_NUM_VF, 2) == 0
    regs.write(PCI_SRIOV_CTRL, 2, 0)
    regs.write(PCI_SRIOV_NUM_VF, 2, 2)
    regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE)
    assert len(cap.enabled_vfs) == 2


@pytest.mark.parametrize("num_vfs", [1, 7, 16])
def test_offset_and_stride_recomputed_for_every_num_vfs(host, pf_factory, num_vfs) -> None:
    # A device that spaces its VFs out while they fit and packs them otherwise.
    def routing(n: int, ari: bool) -> tuple[int, int]:
        return (2 if ari else 8), (4 if n <= 8 else 1)

    _, cap = pf_factory(routing=routing)
    regs = Regs(host, cap)
    for ari in (0, PCI_SRIOV_CTRL_ARI):
        regs.write(PCI_SRIOV_CTRL, 2, ari)
        regs.write(PCI_SRIOV_NUM_VF, 2, num_vfs)
        expected = routing(num_vfs, bool(ari))
        assert (regs.read(PCI_SRIOV_VF_OFFSET, 2), regs.read(PCI_SRIOV_VF_STRIDE, 2)) == expected
        regs.write(PCI_SRIOV_CTRL, 2, ari | PCI_SRIOV_CTRL_VFE)
        pf_rid = PF_SLOT << 3
        assert [vf.requester_id for vf in cap.enabled_vfs] == [
            pf_rid + expected[0] + expected[1] * n for n in range(num_vfs)
        ]
        regs.write(PCI_SRIOV_CTRL, 2, ari)


def test_ari_capable_hierarchy_changes_routing_and_is_frozen_while_enabled(pf_regs, caplog) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_NUM_VF, 2, 3)
    regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_ARI)
    assert regs.read(PCI_SRIOV_VF_OFFSET, 2) == 1
    regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_ARI | PCI_SRIOV_CTRL_VFE)
    # ARI: the VFs follow the PF in its own device, which stays single-function.
    assert [vf.requester_id for vf in cap.enabled_vfs] == [0x19, 0x1A, 0x1B]
    assert cap.pf.config_read(0x0E, 1) == 0
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE)
    assert regs.read(PCI_SRIOV_CTRL, 2) & PCI_SRIOV_CTRL_ARI
    assert "ARI Capable Hierarchy write ignored" in caplog.text
    # Clearing VF Enable and ARI in one write: ARI was still frozen by VF Enable.
    regs.write(PCI_SRIOV_CTRL, 2, 0)
    assert regs.read(PCI_SRIOV_CTRL, 2) == PCI_SRIOV_CTRL_ARI
    regs.write(PCI_SRIOV_CTRL, 2, 0)
    assert regs.read(PCI_SRIOV_VF_OFFSET, 2) == 8


@pytest.mark.parametrize("bad", [0, 0x3, 0x2 | 0x10, 0x4, 0x1 << 20])
def test_bad_system_page_size_is_ignored(pf_regs, caplog, bad) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_SYS_PGSIZE, 4, 0x2)  # 8 KiB
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        regs.write(PCI_SRIOV_SYS_PGSIZE, 4, bad)
    assert regs.read(PCI_SRIOV_SYS_PGSIZE, 4) == 0x2
    assert cap.page_size == 0x2000
    assert "System Page Size write" in caplog.text and "ignored" in caplog.text


def test_system_page_size_frozen_while_enabled(pf_regs, caplog) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_NUM_VF, 2, 1)
    regs.write(PCI_SRIOV_CTRL, 2, PCI_SRIOV_CTRL_VFE)
    with caplog.at_level(logging.WARNING, "iovirt.sriov"):
        regs.write(PCI_SRIOV_SYS_PGSIZE, 4, 0x10)
    assert regs.read(PCI_SRIOV_SYS_PGSIZE, 4) == 1
    assert "System Page Size write 0x10 ignored: VF Enable is set" in caplog.text


def size_vf_bar(regs: Regs, index: int, is64: bool) -> int:
    original = regs.read(PCI_SRIOV_BAR + 4 * index, 4)
    regs.write(PCI_SRIOV_BAR + 4 * index, 4, 0xFFFFFFFF)
    mask = regs.read(PCI_SRIOV_BAR + 4 * index, 4) & ~0xF
    regs.write(PCI_SRIOV_BAR + 4 * index, 4, original)
    if is64:
        original_hi = regs.read(PCI_SRIOV_BAR + 4 * index + 4, 4)
        regs.write(PCI_SRIOV_BAR + 4 * index + 4, 4, 0xFFFFFFFF)
        mask |= regs.read(PCI_SRIOV_BAR + 4 * index + 4, 4) << 32
        regs.write(PCI_SRIOV_BAR + 4 * index + 4, 4, original_hi)
        return (~mask + 1) & (1 << 64) - 1
    return (~mask + 1) & 0xFFFFFFFF


@pytest.mark.parametrize("page_bit, bar0, bar2", [
    (0x1, VF_BAR_SIZE, 0x1000),      # 4 KiB pages: the VFs' own sizes
    (0x2, 0x2000, 0x2000),           # 8 KiB: BAR2 rounded up to a page
    (0x10, 0x10000, 0x10000),        # 64 KiB
    (0x40, 0x40000, 0x40000),        # 256 KiB
])
def test_vf_bar_sizes_are_system_page_size_multiples(pf_regs, page_bit, bar0, bar2) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_SYS_PGSIZE, 4, page_bit)
    assert size_vf_bar(regs, 0, is64=True) == bar0
    assert size_vf_bar(regs, 2, is64=False) == bar2
    assert [cap.vf_bar_size(0), cap.vf_bar_size(2)] == [bar0, bar2]
    # The type bits survive sizing; unimplemented VF BARs size to 0.
    assert regs.read(PCI_SRIOV_BAR, 4) & 0xF == 0xC
    assert size_vf_bar(regs, 3, is64=False) == 0


def test_vf_bar_probe_does_not_move_and_address_sticks(pf_regs) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_BAR, 4, 0xE0000000)
    regs.write(PCI_SRIOV_BAR + 4, 4, 0x1)
    assert cap.vf_bar_base(0) == 0x1_E000_0000
    size_vf_bar(regs, 0, is64=True)
    assert cap.vf_bar_base(0) == 0x1_E000_0000
    assert regs.read(PCI_SRIOV_BAR, 4) == 0xE000000C
    # A base below the VF BAR's size alignment keeps only the address bits.
    regs.write(PCI_SRIOV_BAR + 8, 4, 0xD0000FFF)
    assert cap.vf_bar_base(2) == 0xD0000000


def test_larger_page_size_realigns_an_assigned_base(pf_regs) -> None:
    _, cap, regs = pf_regs
    regs.write(PCI_SRIOV_BAR + 8, 4, 0xD0001000)
    regs.write(PCI_SRIOV_SYS_PGSIZE, 4, 0x2)
    assert cap.vf_bar_base(2) == 0xD0000000
    assert regs.read(PCI_SRIOV_BAR + 8, 4) == 0xD0000000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x08, 0x0A, 0x10, 0x12, 0x20, 0x24, 0x2C, 0x3C]),
                          st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)), max_size=25))
def test_random_writes_keep_invariants(writes) -> None:
    """Whatever a driver writes: NumVFs <= TotalVFs, one page-size bit, VFs iff VF Enable."""
    from iovirt.sriov import attach_pf

    host = PciHost()
    pf = make_generic_pf(8)
    attach_pf(host.root_bus, pf, PF_SLOT)
    cap = pf.extended_capabilities[0]
    regs = Regs(host, cap)
    for reg, size, value in writes:
        reg &= ~(size - 1)
        regs.write(reg, size, value & ((1 << (8 * size)) - 1))
        assert regs.read(PCI_SRIOV_NUM_VF, 2) <= 8
        page = regs.read(PCI_SRIOV_SYS_PGSIZE, 4)
        assert page & (page - 1) == 0 and page & 0x553
        vfs = cap.enabled_vfs
        assert len(vfs) == (cap.num_vfs if cap.vf_enabled else 0)
        assert all(host.config_read(0, vf.devfn >> 3, vf.devfn & 7, 0, 2) == 0xFFFF for vf in vfs)
        assert regs.read(PCI_SRIOV_VF_OFFSET, 2) > 0


def test_bad_routing_policy_rejected_at_build() -> None:
    with pytest.raises(SriovLayoutError, match="First VF Offset 0"):
        SriovCapability(4, VF_DEVICE, build_generic_vf, routing=lambda n, ari: (0, 1))
    with pytest.raises(SriovLayoutError, match="VF Stride 0 for NumVFs 2"):
        SriovCapability(4, VF_DEVICE, build_generic_vf, routing=lambda n, ari: (8, 0))
    with pytest.raises(SriovLayoutError, match="TotalVFs 0"):
        SriovCapability(0, VF_DEVICE, build_generic_vf)
    with pytest.raises(SriovLayoutError, match="Supported Page Sizes"):
        SriovCapability(4, VF_DEVICE, build_generic_vf, supported_page_sizes=0x1)
