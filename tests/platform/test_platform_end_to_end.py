"""The platform driver brings virtio-net and virtio-blk up end to end in-process, with and without
VT-d, over both ring implementations; queue interrupts arrive as the expected vectors in the right
vLAPIC (issue 7's platform check)."""

from __future__ import annotations

import pytest

from iovirt.platform import VirtioBlkDriver, VirtioNetDriver, scan
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK
from iovirt.virtio.defs import VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX

PEER = bytes.fromhex("020000000002")
MAC = bytes.fromhex("525400000001")  # the virtio-net MAC the conftest gives the platform


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + b"\x08\x00" + payload


def bring_up_net(platform):
    driver = platform.driver(platform.functions[0])
    driver.bring_up(queue_size=64)
    return driver, VirtioNetDriver(driver)


@pytest.mark.parametrize("iommu", [False, True], ids=["no-iommu", "vtd"])
def test_net_tx_rx_and_interrupt_vectors(make_platform, recorder, switch, ring_impl, iommu):
    platform = make_platform(iommu=iommu, num_vcpus=2)
    if iommu:
        platform.enable_iommu()
    driver, nic = bring_up_net(platform)
    assert driver.status & VIRTIO_CONFIG_S_DRIVER_OK
    assert driver.has_feature(VIRTIO_F_ACCESS_PLATFORM) == iommu
    assert driver.has_feature(VIRTIO_F_EVENT_IDX)
    nic.post_rx(8)

    out = frame(PEER, MAC, b"to the peer" * 5)
    nic.send(out)
    assert recorder.frames == [out]
    # TX (queue 1) completed: MSI-X entry 2 -> vCPU 0 (round robin: config 0, rx 1, tx 0).
    tx_vec, rx_vec = driver.vectors[2], driver.vectors[1]
    assert (tx_vec.apic_id, rx_vec.apic_id) == (0, 1)
    lapics = platform.apic_bus.lapics
    assert lapics[0].irr == 1 << tx_vec.vector and lapics[1].irr == 0

    back = frame(MAC, PEER, b"to the guest" * 5)
    assert switch.forward(recorder, back) == 1
    assert lapics[1].irr == 1 << rx_vec.vector
    assert platform.service_interrupts() == 2
    assert driver.interrupts == {0: 1, 1: 1}
    assert nic.tx_completed() == 1
    received = nic.receive()
    assert [f for _, f in received] == [back]
    assert received[0][0].num_buffers == 1
    if iommu:
        assert platform.router.blocked == 0 and platform.iommu.faults is not None


@pytest.mark.parametrize("iommu", [False, True], ids=["no-iommu", "vtd"])
def test_blk_write_then_read(make_platform, ring_impl, tmp_path, iommu):
    platform = make_platform(iommu=iommu)
    if iommu:
        platform.enable_iommu()
    driver = platform.driver(platform.functions[1])
    driver.bring_up()
    blk = VirtioBlkDriver(driver)
    data = bytes(range(256)) * 8
    assert blk.write(10, data) == VIRTIO_BLK_S_OK
    assert blk.read(10, len(data)) == (VIRTIO_BLK_S_OK, data)
    assert blk.flush() == VIRTIO_BLK_S_OK
    assert blk.read(1 << 20, 512)[0] == VIRTIO_BLK_S_IOERR  # beyond the 1 MiB image
    image = platform.functions[1].device.path
    with open(image, "rb") as f:
        f.seek(10 * 512)
        assert f.read(len(data)) == data
    # Four MSIs, one IRR bit: a vector pending in the vLAPIC latches once until taken.
    assert platform.router.delivered == 4
    assert platform.service_interrupts() == 1 and driver.interrupts[0] == 1
    # Capacity in the device configuration: 1 MiB / 512.
    assert int.from_bytes(driver.read_device_config(0, 8), "little") == 2048


def test_enumeration_finds_virtio_functions(make_platform):
    platform = make_platform()
    found = {(c.read(0, 2), c.read(2, 2)): c.requester_id for c in scan(platform.host)}
    assert found[(0x1AF4, 0x1041)] == 3 << 3 and found[(0x1AF4, 0x1042)] == 4 << 3


def test_reset_and_bring_up_again(make_platform, recorder, ring_impl):
    platform = make_platform()
    driver, nic = bring_up_net(platform)
    nic.send(frame(PEER, MAC, b"one"))
    driver.bring_up(queue_size=16)  # a second probe: reset, renegotiate, new rings
    nic = VirtioNetDriver(driver)
    nic.send(frame(PEER, MAC, b"two"))
    assert [f[14:] for f in recorder.frames] == [b"one", b"two"]
