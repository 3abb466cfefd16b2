"""VT-d in the platform: DMA to an unmapped IOVA fails for that device and records a fault; interrupt
remapping blocks compatibility-format MSIs; without ACCESS_PLATFORM the device uses physical addresses."""

from __future__ import annotations

import pytest

from iovirt.platform import EcamConfig, VirtioDriverError, VirtioNetDriver, VirtioPciDriver
from iovirt.virtio.defs import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_ACCESS_PLATFORM
from iovirt.vtd import regs as R
from iovirt.vtd.faults import FR_IR_COMPAT_BLOCKED, FR_READ

MAC = bytes.fromhex("525400000001")


def test_dma_to_unmapped_iova_faults_and_needs_reset(make_platform, recorder, ring_impl):
    platform = make_platform(iommu=True)
    platform.enable_iommu()
    driver = platform.driver(platform.functions[0])
    driver.bring_up(queue_size=16)
    nic = VirtioNetDriver(driver)
    rid = platform.functions[0].requester_id
    # A buffer in the IOMMU's table memory: guest memory, but not mapped for the device.
    iova = platform.table_alloc.alloc(64)
    platform.memory.write(iova, bytes(12) + b"\xff" * 6 + MAC + b"\x08\x00" + bytes(40))
    nic.tx.add_chain(readable=[(iova, 64)])
    driver.kick(1)
    assert recorder.frames == []
    hi = platform.iommu.mmio_read(R.FRCD + 8, 8)
    assert (hi >> 32) & 0xFF == FR_READ and hi & 0xFFFF == rid
    assert platform.iommu.mmio_read(R.FRCD, 8) == iova & ~0xFFF
    # The device stops and asks for a reset, with a configuration interrupt.
    assert driver.status & VIRTIO_CONFIG_S_NEEDS_RESET
    platform.service_interrupts()
    assert driver.interrupts["config"] == 1
    # The other device is unaffected.
    blk = platform.driver(platform.functions[1])
    blk.bring_up()
    assert not blk.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_rings_at_unmapped_iova_need_reset(make_platform, ring_impl):
    platform = make_platform(iommu=True)
    platform.enable_iommu()
    driver = platform.driver(platform.functions[1])
    driver.alloc = platform.table_alloc  # rings where the device cannot reach them
    driver.bring_up()  # the queue enable fails; bring-up itself completes
    assert driver.status & VIRTIO_CONFIG_S_NEEDS_RESET
    platform.service_interrupts()
    assert driver.interrupts["config"] == 1


def test_compat_msis_blocked_under_interrupt_remapping(make_platform, ring_impl):
    platform = make_platform(iommu=True)
    platform.enable_iommu(interrupt_remapping=False)
    driver = platform.driver(platform.functions[0])
    driver.bring_up(queue_size=16)  # compatibility-format MSI-X entries
    platform.vtd_driver.setup_interrupt_remapping(allow_compat=False)
    nic = VirtioNetDriver(driver)
    nic.send(b"\xff" * 6 + MAC + b"\x08\x00" + bytes(40))
    assert platform.router.blocked == 1 and platform.service_interrupts() == 0
    hi = platform.iommu.mmio_read(R.FRCD + 8, 8)
    assert (hi >> 32) & 0xFF == FR_IR_COMPAT_BLOCKED and hi & 0xFFFF == platform.functions[0].requester_id


def test_without_access_platform_dma_is_physical(make_platform, recorder, ring_impl):
    """virtio 6: a driver that does not accept ACCESS_PLATFORM gets physical-address DMA."""
    platform = make_platform(iommu=True)
    platform.enable_iommu()
    driver = platform.driver(platform.functions[0])
    driver.bring_up(wanted=~(1 << VIRTIO_F_ACCESS_PLATFORM), queue_size=16)
    nic = VirtioNetDriver(driver)
    iova = platform.table_alloc.alloc(64)  # unmapped in the IOMMU, but physical DMA reaches it
    out = b"\xff" * 6 + MAC + b"\x08\x00" + bytes(38)
    platform.memory.write(iova, bytes(12) + out)
    nic.tx.add_chain(readable=[(iova, 12 + len(out))])
    driver.kick(1)
    assert recorder.frames == [out]


def test_probe_refuses_a_non_virtio_function(make_platform):
    platform = make_platform()
    cfg = EcamConfig(platform.host, 0, 2, 0)  # the QEMU test device
    driver = VirtioPciDriver(platform.host, cfg, platform.memory, platform.dma_alloc, platform.irq)
    with pytest.raises(VirtioDriverError, match="not a modern virtio-pci device"):
        driver.probe()
