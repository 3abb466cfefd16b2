"""End to end: a virtio-net PF enables VFs the Linux way; every VF is a virtio-net NIC of its own."""

from __future__ import annotations

import pytest

from iovirt.memory import Access, TranslationFault

from iovirt.platform.machine import Platform
from iovirt.platform.net import VirtioNetDriver
from iovirt.sriov import SriovDriverError
from iovirt.sriov.machine import PF_MAC, PF_SLOT, SriovNetMachine
from iovirt.sriov.virtio_net import vf_mac
from iovirt.timer.testing import fake_multiplexer
from iovirt.virtio.defs import VIRTIO_F_SR_IOV

TOTAL_VFS = 16
ETH_P_IP = b"\x08\x00"


class MsiTap:
    """Records every MSI on its way to the platform's interrupt router."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.messages: list[tuple[int, int, int]] = []

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        self.messages.append((source_id, address, data))
        self.inner.deliver_msi(source_id, address, data)


@pytest.fixture
def machine():
    mux, _clock = fake_multiplexer()
    with SriovNetMachine(TOTAL_VFS, platform=Platform((), mux=mux)) as m:
        yield m


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + ETH_P_IP + payload.ljust(46, b"\0")


def test_pf_offers_sr_iov_and_linux_checks_it(machine) -> None:
    with pytest.raises(SriovDriverError) as err:
        machine.sriov_configure(2)
    assert err.value.errno == "EBUSY"  # no driver at DRIVER_OK yet
    driver = machine.platform.driver(machine.pf)
    driver.probe()
    assert driver.device_features() >> VIRTIO_F_SR_IOV & 1
    machine.pf_driver = driver
    driver.bring_up(wanted=driver.device_features() & ~(1 << VIRTIO_F_SR_IOV))
    with pytest.raises(SriovDriverError) as err:
        machine.sriov_configure(2)
    assert err.value.errno == "EINVAL"
    assert machine.sriov.enabled_vfs == []


@pytest.mark.parametrize("num_vfs", [1, 7, TOTAL_VFS])
def test_vfs_exchange_frames_through_the_switch(machine, num_vfs) -> None:
    host = machine.platform.host
    tap = host.msi_sink = MsiTap(host.msi_sink)
    pf_nic = VirtioNetDriver(machine.bring_up_pf())
    vfs = machine.sriov_configure(num_vfs)
    assert [vf.rid for vf in vfs] == [(PF_SLOT << 3) + 8 + n for n in range(num_vfs)]

    drivers = [machine.vf_driver(vf) for vf in vfs]
    for k, driver in enumerate(drivers):
        driver.bring_up()
        assert driver.read_device_config(0, 6) == vf_mac(PF_MAC, k)  # its own config space
    nics = [VirtioNetDriver(d) for d in drivers]
    for nic in nics + [pf_nic]:
        nic.post_rx(4)

    # Two endpoints: the first and last VF (the PF when there is one VF).
    a, b = nics[0], nics[-1] if num_vfs > 1 else pf_nic
    mac_a = vf_mac(PF_MAC, 0)
    mac_b = vf_mac(PF_MAC, num_vfs - 1) if num_vfs > 1 else PF_MAC
    b.send(frame(b"\xff" * 6, mac_b, b"hello, who is there"))  # the switch learns b
    for nic in nics + [pf_nic]:
        nic.receive()
    a.send(frame(mac_b, mac_a, b"ping"))
    got = b.receive()
    assert [payload[:18] for _, payload in got] == [frame(mac_b, mac_a, b"ping")[:18]]
    b.send(frame(mac_a, mac_b, b"pong"))
    assert [payload[14:18] for _, payload in a.receive()] == [b"pong"]
    # Isolation: with b and a learned, no other VF sees the unicast traffic.
    assert all(nic.receive() == [] for nic in nics[1:-1])

    # Each VF's MSI-X messages carry its own routing ID, and land.
    assert machine.platform.service_interrupts() > 0
    sources = {sid for sid, _, _ in tap.messages}
    rid_a = vfs[0].rid
    rid_b = vfs[-1].rid if num_vfs > 1 else PF_SLOT << 3
    assert {rid_a, rid_b} <= sources
    assert sources <= {vf.rid for vf in vfs} | {PF_SLOT << 3}
    for driver, vf in zip(drivers, vfs):
        own = {(address, data) for address, data in ((v.address, v.data) for v in driver.vectors.values())}
        for sid, address, data in tap.messages:
            if (address, data) in own:
                assert sid == vf.rid
    assert drivers[0].interrupts[0] >= 1  # VF 0's receiveq vector ran its handler


def test_disable_removes_vfs_and_reenable_gives_fresh_devices(machine) -> None:
    machine.bring_up_pf()
    vfs = machine.sriov_configure(2)
    driver = machine.vf_driver(vfs[1])
    driver.bring_up()
    assert machine.sriov_configure(0) == []
    host = machine.platform.host
    assert host.ecam_read(vfs[1].rid << 12 | 8, 4) == 0xFFFFFFFF
    vfs = machine.sriov_configure(3)
    fresh = machine.vf_driver(vfs[1])
    fresh.probe()
    assert fresh.status == 0  # the VF was reset when it went away
    fresh.bring_up()


def test_vfs_run_with_dma_remapping_through_their_own_context_entries() -> None:
    # Issue 6: SR-IOV VFs translate through their own context entries, as intel-iommu sets them up.
    mux, _clock = fake_multiplexer()
    with SriovNetMachine(TOTAL_VFS, platform=Platform((), mux=mux, iommu=True)) as m:
        m.enable_iommu()
        VirtioNetDriver(m.bring_up_pf())
        vfs = m.sriov_configure(2)
        rids = [vf.rid for vf in vfs]
        assert all(rid in m.platform.domains for rid in rids)
        assert len({m.platform.domains[rid].did for rid in rids}) == 2  # a domain each
        drivers = [m.vf_driver(vf) for vf in vfs]
        for d in drivers:
            d.bring_up()
            assert d.has_feature(33)  # VIRTIO_F_ACCESS_PLATFORM: DMA goes through VT-d
        a, b = (VirtioNetDriver(d) for d in drivers)
        for nic in (a, b):
            nic.post_rx(4)
        mac_a, mac_b = (vf_mac(PF_MAC, vf.vf_index) for vf in vfs)
        b.send(frame(b"\xff" * 6, mac_b, b"hello"))
        a.receive()
        a.send(frame(mac_b, mac_a, b"ping"))
        assert [payload[14:18] for _, payload in b.receive()] == [b"ping"]
        unit = m.platform.iommu
        # Each VF's DMA was translated with its own source id; no fault so far.
        assert not unit.mmio_read(0x34, 4) & 1  # FSTS.PPF clear
        # A DMA outside a VF's mapping faults, recorded with that VF's source id.
        translator = unit.dma_translator(rids[1])
        with pytest.raises(TranslationFault) as fault:
            translator.translate(0x7000_0000, 64, Access.READ)
        assert fault.value.source_id == rids[1]
