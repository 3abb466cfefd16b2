"""The Linux drivers/pci/iov.c sequence against the model, and where Linux would fail."""

from __future__ import annotations

import pytest

from iovirt.pci import Bar, ExtendedCapability, PcieCapability, PciFunction, PciHost
from iovirt.pci.topology import build_default_host
from iovirt.sriov import SriovDriverError, VirtualFunction, attach_pf
from iovirt.sriov.driver import SriovDriver
from iovirt.sriov.regs import PCI_EXT_CAP_ID_SRIOV

from iovirt.sriov.testing import CLASS_ETHERNET, VENDOR, VF_BAR_SIZE, VF_DEVICE, make_generic_pf

PF_SLOT = 3


@pytest.fixture
def platform_host() -> PciHost:
    """The default topology with the SR-IOV PF at 00:03.0, resources assigned by firmware."""
    return build_default_host(add_devices=lambda bus: attach_pf(bus, make_generic_pf(16), PF_SLOT))


@pytest.mark.parametrize("num_vfs", [1, 7, 16])
def test_linux_sequence_enables_and_enumerates(platform_host, allocator, num_vfs) -> None:
    driver = SriovDriver(platform_host, 0, PF_SLOT)
    vfs = driver.configure(num_vfs, allocator)
    assert driver.total_vfs == 16 and (driver.offset, driver.stride) == (8, 1)
    assert [(b.index, b.size, b.is64) for b in driver.bars] == [(0, VF_BAR_SIZE, True), (2, 0x1000, False)]
    assert [vf.rid for vf in vfs] == [PF_SLOT * 8 + 8 + n for n in range(num_vfs)]
    assert {(vf.vendor_id, vf.device_id, vf.class_code) for vf in vfs} == {(VENDOR, VF_DEVICE, CLASS_ETHERNET)}
    base0 = driver.bars[0].base
    assert [(vf.bars[0].address, vf.bars[0].size) for vf in vfs] == [
        (base0 + k * VF_BAR_SIZE, VF_BAR_SIZE) for k in range(num_vfs)
    ]
    # The model agrees: every VF decodes where Linux thinks it does.
    pf = platform_host.root_bus.function(PF_SLOT)
    cap = pf.extended_capabilities[0]
    for vf, model in zip(vfs, cap.enabled_vfs):
        assert model.requester_id == vf.rid
        assert [(w.address, w.size) for w in model.iter_bars()] == [
            (vf.bars[i].address, vf.bars[i].size) for i in (0, 2)
        ]
        assert platform_host.mmio_read(vf.bars[0].address, 4) == 0  # RAM region, decoded
    driver.disable()
    assert cap.enabled_vfs == [] and not cap.vf_memory_enabled
    assert platform_host.mmio_read(base0, 4) == 0xFFFFFFFF


def test_init_leaves_num_vfs_zero_and_walk_reads_each_count() -> None:
    seen: list[tuple[int, bool]] = []

    def routing(num_vfs: int, ari: bool) -> tuple[int, int]:
        seen.append((num_vfs, ari))
        return 8, 1

    host = PciHost()
    pf = make_generic_pf(4, routing=routing)
    attach_pf(host.root_bus, pf, PF_SLOT)
    seen.clear()
    SriovDriver(host, 0, PF_SLOT).init()
    # NumVFs = TotalVFs, then TotalVFs down to 1, then 0 (compute_max_vf_buses);
    # Offset/Stride are recomputed on every change of NumVFs.
    assert [n for n, _ in seen] == [4, 3, 2, 1, 0]
    assert pf.extended_capabilities[0].num_vfs == 0


def test_init_clears_vf_enable_left_set(platform_host, allocator) -> None:
    first = SriovDriver(platform_host, 0, PF_SLOT)
    first.configure(3, allocator)
    second = SriovDriver(platform_host, 0, PF_SLOT)
    second.init()
    cap = platform_host.root_bus.function(PF_SLOT).extended_capabilities[0]
    assert not cap.vf_enabled and cap.enabled_vfs == []


def test_page_size_picks_smallest_supported_at_least_page_size(platform_host, allocator) -> None:
    driver = SriovDriver(platform_host, 0, PF_SLOT, page_size=0x10000)
    driver.init()
    cap = platform_host.root_bus.function(PF_SLOT).extended_capabilities[0]
    assert cap.page_size == 0x10000
    assert [b.size for b in driver.bars] == [0x10000, 0x10000]


def test_enable_errors_like_linux(platform_host, allocator) -> None:
    driver = SriovDriver(platform_host, 0, PF_SLOT)
    driver.init()
    with pytest.raises(SriovDriverError) as err:
        driver.enable(2)
    assert err.value.errno == "ENOMEM"
    driver.assign_vf_bars(allocator)
    with pytest.raises(SriovDriverError) as err:
        driver.enable(17)
    assert err.value.errno == "ERANGE"
    assert driver.enable(0) == []
    driver.enable(2)
    with pytest.raises(SriovDriverError) as err:
        driver.enable(3)
    assert err.value.errno == "EBUSY"
    driver.disable()
    assert len(driver.enable(3)) == 3


def raw_sriov_pf(offset: int, stride: int, bar_size: int = 0x1000, sup_pgsize: int = 0x553) -> PciFunction:
    """A PF whose SR-IOV capability is plain bytes: a broken device Linux must refuse."""
    pf = PciFunction(VENDOR, 0x1234, CLASS_ETHERNET, pcie=True)
    pf.add_capability(PcieCapability())
    payload = bytearray(0x3C)
    payload[0x0C - 4 : 0x0E - 4] = (4).to_bytes(2, "little")  # InitialVFs
    payload[0x0E - 4 : 0x10 - 4] = (4).to_bytes(2, "little")  # TotalVFs
    payload[0x14 - 4 : 0x18 - 4] = offset.to_bytes(2, "little") + stride.to_bytes(2, "little")
    payload[0x1C - 4 : 0x20 - 4] = sup_pgsize.to_bytes(4, "little")
    wmask = bytearray(0x3C)
    wmask[0x10 - 4 : 0x12 - 4] = b"\xff\xff"
    wmask[0x20 - 4 : 0x24 - 4] = sup_pgsize.to_bytes(4, "little")
    wmask[0x24 - 4 : 0x28 - 4] = (~(bar_size - 1) & 0xFFFFFFF0).to_bytes(4, "little")
    pf.add_extended_capability(ExtendedCapability(PCI_EXT_CAP_ID_SRIOV, 1, bytes(payload), bytes(wmask)))
    return pf


@pytest.mark.parametrize("pf, reason", [
    (raw_sriov_pf(0, 1), "First VF Offset 0"),
    (raw_sriov_pf(8, 0), "VF Stride 0 for NumVFs 4"),
    (raw_sriov_pf(8, 1, bar_size=0x800), "not a PAGE_SIZE multiple"),
    (raw_sriov_pf(8, 1, sup_pgsize=0x1), "no supported page size"),
])
def test_init_fails_with_eio_on_a_broken_device(pf, reason) -> None:
    host = PciHost()
    host.root_bus.add_function(pf, PF_SLOT)
    driver = SriovDriver(host, 0, PF_SLOT, page_size=0x2000 if "page size" in reason else 0x1000)
    with pytest.raises(SriovDriverError, match=reason) as err:
        driver.init()
    assert err.value.errno == "EIO"


def test_init_without_sriov_is_enodev() -> None:
    host = build_default_host()
    with pytest.raises(SriovDriverError) as err:
        SriovDriver(host, 0, 2).init()  # has only a vendor-specific extended capability
    assert err.value.errno == "ENODEV"
    with pytest.raises(SriovDriverError) as err:
        SriovDriver(host, 0, 9).init()
    assert err.value.errno == "ENODEV"


def test_total_vfs_64_on_a_root_bus(allocator) -> None:
    def build(sriov, k: int) -> VirtualFunction:
        vf = VirtualFunction(sriov, k)
        vf.add_capability(PcieCapability())
        vf.add_bar(0, Bar(0x1000))
        return vf

    host = PciHost()
    pf = make_generic_pf(64, make_vf=build)
    attach_pf(host.root_bus, pf, PF_SLOT)
    vfs = SriovDriver(host, 0, PF_SLOT).configure(64, allocator)
    assert vfs[-1].rid == PF_SLOT * 8 + 8 + 63
    assert all(host.config_read(0, vf.device, vf.fn, 0, 2) == 0xFFFF for vf in vfs)
    assert all(host.config_read(0, vf.device, vf.fn, 0x0A, 2) == 0x0200 for vf in vfs)
