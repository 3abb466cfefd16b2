"""The common configuration structure and device status machine (virtio 1.2 4.1.4.3, 2.1, 3.1.1),
driven through MMIO on the function's BAR as a driver does, including bad driver input."""

from __future__ import annotations

from iovirt.pci.regs import PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_STATUS, PCI_STATUS_INTERRUPT
from iovirt.pci.pcie import PCI_EXP_DEVCTL
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_RING_RESET,
    VIRTIO_F_VERSION_1,
)
from iovirt.virtio.driver import DriverQueue
from iovirt.memory import BumpAllocator
from iovirt.virtio.net.defs import VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ
from iovirt.virtio.transport.caps import find_virtio_caps
from iovirt.virtio.transport.defs import (
    VIRTIO_MSI_NO_VECTOR,
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    VIRTIO_PCI_COMMON_CFGGENERATION as GEN,
    VIRTIO_PCI_COMMON_DF as DF,
    VIRTIO_PCI_COMMON_DFSELECT as DFSEL,
    VIRTIO_PCI_COMMON_GF as GF,
    VIRTIO_PCI_COMMON_GFSELECT as GFSEL,
    VIRTIO_PCI_COMMON_MSIX as CFG_MSIX,
    VIRTIO_PCI_COMMON_NUMQ as NUMQ,
    VIRTIO_PCI_COMMON_Q_AVAIL as Q_AVAIL,
    VIRTIO_PCI_COMMON_Q_DESC as Q_DESC,
    VIRTIO_PCI_COMMON_Q_ENABLE as Q_ENABLE,
    VIRTIO_PCI_COMMON_Q_MSIX as Q_MSIX,
    VIRTIO_PCI_COMMON_Q_NOFF as Q_NOFF,
    VIRTIO_PCI_COMMON_Q_SELECT as Q_SELECT,
    VIRTIO_PCI_COMMON_Q_SIZE as Q_SIZE,
    VIRTIO_PCI_COMMON_Q_USED as Q_USED,
    VIRTIO_PCI_COMMON_STATUS as STATUS,
)
from iovirt.virtio.transport.pci import DEVICE_OFFSET, ISR_OFFSET, NOTIFY_OFFSET

V1 = 1 << VIRTIO_F_VERSION_1


class Mmio:
    """Driver-side register access to one function's virtio BAR."""

    def __init__(self, rig, fn):
        self.host = rig.host
        self.base = rig.common(fn)
        self.fn = fn

    def r(self, offset, size):
        return self.host.mmio_read(self.base + offset, size)

    def w(self, offset, size, value):
        self.host.mmio_write(self.base + offset, size, value)

    def features(self):
        words = []
        for sel in (0, 1):
            self.w(DFSEL, 4, sel)
            words.append(self.r(DF, 4))
        return words[0] | words[1] << 32

    def set_features(self, features):
        for sel in (0, 1):
            self.w(GFSEL, 4, sel)
            self.w(GF, 4, features >> (32 * sel) & 0xFFFFFFFF)

    def to_features_ok(self, features=None):
        self.w(STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE)
        self.w(STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER)
        self.set_features(self.features() if features is None else features)
        self.w(STATUS, 1, self.r(STATUS, 1) | VIRTIO_CONFIG_S_FEATURES_OK)
        return self.r(STATUS, 1)

    def ring(self, queue, desc, avail, used):
        self.w(Q_SELECT, 2, queue)
        for field, addr in ((Q_DESC, desc), (Q_AVAIL, avail), (Q_USED, used)):
            self.w(field, 4, addr & 0xFFFFFFFF)
            self.w(field + 4, 4, addr >> 32)


def test_identity_and_class(rig):
    for fn, device_id, class_code in ((rig.net, 0x1041, 0x020000), (rig.blk, 0x1042, 0x010000)):
        assert (fn.vendor_id, fn.device_id, fn.revision, fn.class_code) == (0x1AF4, device_id, 1, class_code)
        assert fn.config_read(0x2C, 2) == 0x1AF4 and fn.config_read(0x2E, 2) >= 0x40  # 4.1.2.1


def test_capabilities_describe_the_bar(rig):
    caps = find_virtio_caps(rig.net.config_read)
    assert sorted(caps) == [1, 2, 3, 4, 5]
    assert caps[VIRTIO_PCI_CAP_COMMON_CFG].bar == 4 and caps[VIRTIO_PCI_CAP_COMMON_CFG].offset % 4 == 0
    notify = caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
    assert notify.offset == NOTIFY_OFFSET and notify.notify_off_multiplier == 4
    # 4.1.4.4: length >= queue_notify_off * multiplier + 2 for every queue.
    assert notify.length >= (rig.net.device.num_queues - 1) * 4 + 2
    assert caps[VIRTIO_PCI_CAP_ISR_CFG].offset == ISR_OFFSET and caps[VIRTIO_PCI_CAP_ISR_CFG].length >= 1
    assert caps[VIRTIO_PCI_CAP_DEVICE_CFG].offset == DEVICE_OFFSET
    # The capability structures are read-only for the driver (4.1.4.1).
    at = caps[VIRTIO_PCI_CAP_COMMON_CFG].cap_offset
    rig.net.config_write(at + 8, 4, 0x1234)
    assert find_virtio_caps(rig.net.config_read)[VIRTIO_PCI_CAP_COMMON_CFG].offset == 0


def test_feature_words(rig):
    m = Mmio(rig, rig.net)
    offered = m.features()
    assert offered & V1 and offered >> VIRTIO_NET_F_MAC & 1
    # MQ needs the control queue the transport does not have; no IOMMU, no ACCESS_PLATFORM.
    assert not offered >> VIRTIO_NET_F_MQ & 1 and not offered >> VIRTIO_F_ACCESS_PLATFORM & 1
    m.w(DFSEL, 4, 2)
    assert m.r(DF, 4) == 0  # 4.1.4.3.1: 0 beyond the defined words
    m.set_features(V1 | 1)
    m.w(GFSEL, 4, 1)
    assert m.r(GF, 4) == 1
    m.w(GFSEL, 4, 0)
    assert m.r(GF, 4) == 1
    assert m.r(NUMQ, 2) == 2 and Mmio(rig, rig.blk).r(NUMQ, 2) == 1


def test_status_machine_and_unoffered_features(rig):
    m = Mmio(rig, rig.net)
    offered = m.features()
    # Unoffered bit: FEATURES_OK stays clear, nothing raised.
    status = m.to_features_ok(offered | 1 << 60)
    assert status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    # DRIVER_OK without FEATURES_OK is refused.
    m.w(STATUS, 1, status | VIRTIO_CONFIG_S_DRIVER_OK)
    assert m.r(STATUS, 1) == status
    m.w(STATUS, 1, 0)
    assert m.r(STATUS, 1) == 0  # reset completes at once
    # Without VERSION_1 (no legacy interface here) it is refused too.
    assert not m.to_features_ok(offered & ~V1) & VIRTIO_CONFIG_S_FEATURES_OK
    m.w(STATUS, 1, 0)
    status = m.to_features_ok()
    assert status & VIRTIO_CONFIG_S_FEATURES_OK
    assert rig.net.device.driver_features == offered & ~(1 << VIRTIO_F_RING_RESET)  # a transport bit (queue_reset)
    # Feature writes after FEATURES_OK are ignored; the driver cannot clear bits or set NEEDS_RESET.
    m.set_features(V1)
    m.w(GFSEL, 4, 0)
    assert m.r(GF, 4) == offered & 0xFFFFFFFF
    m.w(STATUS, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_NEEDS_RESET)
    assert m.r(STATUS, 1) == status


def test_queue_registers_and_bad_sizes(rig):
    m = Mmio(rig, rig.net)
    m.w(Q_SELECT, 2, 1)
    max_size = m.r(Q_SIZE, 2)
    assert max_size == 1024 and m.r(Q_NOFF, 2) == 1 and m.r(Q_ENABLE, 2) == 0
    assert m.r(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    for bad in (0, 3, 100, 2048):  # not a power of 2, or above the maximum: ignored
        m.w(Q_SIZE, 2, bad)
        assert m.r(Q_SIZE, 2) == max_size
    m.w(Q_SIZE, 2, 64)
    assert m.r(Q_SIZE, 2) == 64
    # 64-bit addresses: as halves or whole.
    m.w(Q_DESC, 8, 0x1_2345_6780)
    assert m.r(Q_DESC, 4) == 0x2345_6780 and m.r(Q_DESC + 4, 4) == 1 and m.r(Q_DESC, 8) == 0x1_2345_6780
    # MSI-X vectors: 3 entries (config + 2 queues); anything else reads back NO_VECTOR.
    m.w(Q_MSIX, 2, 2)
    assert m.r(Q_MSIX, 2) == 2
    m.w(Q_MSIX, 2, 3)
    assert m.r(Q_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    m.w(CFG_MSIX, 2, 7)
    assert m.r(CFG_MSIX, 2) == VIRTIO_MSI_NO_VECTOR
    # A queue that does not exist reads 0 everywhere; writes to it are ignored.
    m.w(Q_SELECT, 2, 5)
    m.w(Q_SIZE, 2, 16)
    assert (m.r(Q_SIZE, 2), m.r(Q_ENABLE, 2), m.r(Q_DESC, 4)) == (0, 0, 0)
    # Wrong widths and read-only fields: ignored, reads give 0.
    m.w(Q_SELECT, 2, 1)
    m.w(Q_SIZE, 4, 32)
    assert m.r(Q_SIZE, 1) == 0 and m.r(Q_SIZE, 2) == 64
    m.w(NUMQ, 2, 9)
    m.w(GEN, 1, 9)
    assert m.r(NUMQ, 2) == 2 and m.r(GEN, 1) == 0


def test_reset_restores_queue_registers(rig):
    m = Mmio(rig, rig.blk)
    m.to_features_ok()
    m.w(Q_SELECT, 2, 0)
    m.w(Q_SIZE, 2, 16)
    m.w(Q_MSIX, 2, 1)
    m.w(CFG_MSIX, 2, 0)
    q = DriverQueue(rig.memory, BumpAllocator(0x10000, 0x10000), 16)
    m.ring(0, q.desc_addr, q.avail_addr, q.used_addr)
    m.w(Q_ENABLE, 2, 1)
    assert m.r(Q_ENABLE, 2) == 1 and rig.blk.device.queues[0] is not None
    m.w(Q_SIZE, 2, 8)  # ignored once enabled
    assert m.r(Q_SIZE, 2) == 16
    m.w(Q_ENABLE, 2, 0)  # the driver MUST NOT write 0: ignored
    assert m.r(Q_ENABLE, 2) == 1
    m.w(STATUS, 1, 0)
    assert (m.r(STATUS, 1), m.r(Q_ENABLE, 2), m.r(Q_SIZE, 2), m.r(Q_MSIX, 2), m.r(CFG_MSIX, 2)) == (
        0, 0, 1024, VIRTIO_MSI_NO_VECTOR, VIRTIO_MSI_NO_VECTOR,
    )
    assert rig.blk.device.queues[0] is None and rig.blk.device.driver_features == 0


def enable_msix(fn):
    """MSI-X on, every entry unmasked with address 0xFEE00000 and data = entry index + 0x40."""
    msix = fn.msix
    for entry in range(msix.vectors):
        msix.table_write(entry * 16, 4, 0xFEE00000)
        msix.table_write(entry * 16 + 8, 4, 0x40 + entry)
        msix.table_write(entry * 16 + 12, 4, 0)
    fn.config_write(msix.offset + 2, 2, 0x8000)


def test_rings_outside_memory_need_reset_and_notify_at_driver_ok(rig, ring_impl):
    m = Mmio(rig, rig.net)
    enable_msix(rig.net)
    m.to_features_ok()
    m.w(CFG_MSIX, 2, 0)
    m.w(Q_SELECT, 2, 0)
    m.w(Q_SIZE, 2, 16)
    m.ring(0, 0x7FFF_0000, 0x7FFF_1000, 0x7FFF_2000)  # beyond the 4 MiB of guest memory
    m.w(Q_ENABLE, 2, 1)
    assert m.r(STATUS, 1) & VIRTIO_CONFIG_S_NEEDS_RESET and m.r(Q_ENABLE, 2) == 0
    assert rig.sink.messages == []  # 2.1.2: no config notification before DRIVER_OK ...
    m.w(STATUS, 1, m.r(STATUS, 1) | VIRTIO_CONFIG_S_DRIVER_OK)
    assert rig.sink.messages == [(rig.net.requester_id, 0xFEE00000, 0x40)]  # ... but then
    assert rig.net.isr_status & 2
    m.w(STATUS, 1, 0)
    assert m.r(STATUS, 1) == 0


def test_misaligned_ring_needs_reset(rig, ring_impl):
    m = Mmio(rig, rig.blk)
    m.to_features_ok()
    m.w(Q_SELECT, 2, 0)
    m.ring(0, 0x10008, 0x20000, 0x30000)  # descriptor table must be 16-byte aligned
    m.w(Q_ENABLE, 2, 1)
    assert m.r(STATUS, 1) & VIRTIO_CONFIG_S_NEEDS_RESET


def test_intx_and_isr_when_msix_is_off(rig, ring_impl):
    """4.1.4.5: without MSI-X, ISR bits and INTx; reading ISR clears both."""
    m = Mmio(rig, rig.blk)
    m.to_features_ok()
    q = DriverQueue(rig.memory, BumpAllocator(0x10000, 0x10000), 16)
    m.w(Q_SELECT, 2, 0)
    m.w(Q_SIZE, 2, 16)
    m.ring(0, q.desc_addr, q.avail_addr, q.used_addr)
    m.w(Q_ENABLE, 2, 1)
    m.w(STATUS, 1, m.r(STATUS, 1) | VIRTIO_CONFIG_S_DRIVER_OK)
    q.add_data(out=[bytes(16)], in_sizes=[1])  # an IN of 0 bytes at sector 0: status only
    q.publish()
    rig.host.mmio_write(m.base + NOTIFY_OFFSET, 2, 0)
    assert q.get_used()[0].len == 1
    assert rig.blk.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT
    assert rig.host.mmio_read(m.base + ISR_OFFSET, 1) == 1
    assert rig.host.mmio_read(m.base + ISR_OFFSET, 1) == 0
    assert not rig.blk.config_read(PCI_STATUS, 2) & PCI_STATUS_INTERRUPT
    assert rig.sink.messages == []
    assert not rig.blk.command & PCI_COMMAND_INTX_DISABLE


def test_config_change_bumps_generation_and_interrupts(rig):
    m = Mmio(rig, rig.net)
    enable_msix(rig.net)
    m.to_features_ok()
    m.w(CFG_MSIX, 2, 0)
    m.w(STATUS, 1, m.r(STATUS, 1) | VIRTIO_CONFIG_S_DRIVER_OK)
    rig.net.device.link_up = False
    rig.net.config_changed()
    assert m.r(GEN, 1) == 1
    assert rig.sink.messages == [(rig.net.requester_id, 0xFEE00000, 0x40)]
    assert rig.host.mmio_read(m.base + ISR_OFFSET, 1) == 2
    # The device config reads the new link status (struct virtio_net_config.status at 6).
    assert rig.host.mmio_read(m.base + DEVICE_OFFSET + 6, 2) == 0
    assert rig.host.mmio_read(m.base + DEVICE_OFFSET, 4) == int.from_bytes(rig.net.device.mac[:4], "little")


def test_pci_cfg_window(rig):
    """4.1.4.9: BAR accesses through config space."""
    at = find_virtio_caps(rig.blk.config_read)[VIRTIO_PCI_CAP_PCI_CFG].cap_offset
    fn = rig.blk
    fn.config_write(at + 4, 1, 4)  # bar
    fn.config_write(at + 12, 4, 2)  # length
    fn.config_write(at + 8, 4, NUMQ)  # offset
    assert fn.config_read(at + 16, 2) == 1  # num_queues
    fn.config_write(at + 12, 4, 1)
    fn.config_write(at + 8, 4, STATUS)
    fn.config_write(at + 16, 1, VIRTIO_CONFIG_S_ACKNOWLEDGE)
    assert Mmio(rig, fn).r(STATUS, 1) == VIRTIO_CONFIG_S_ACKNOWLEDGE
    fn.config_write(at + 12, 4, 3)  # bad length: nothing happens, nothing raised
    fn.config_write(at + 16, 4, 0)
    fn.config_write(at + 4, 1, 9)  # reserved BAR
    fn.config_write(at + 12, 4, 1)
    fn.config_write(at + 16, 1, 0)
    assert Mmio(rig, fn).r(STATUS, 1) == VIRTIO_CONFIG_S_ACKNOWLEDGE


def test_flr_resets_the_virtio_device(rig):
    m = Mmio(rig, rig.net)
    m.to_features_ok()
    pcie = rig.net.capabilities[0]
    rig.net.config_write(pcie.offset + PCI_EXP_DEVCTL, 2, 1 << 15)
    assert rig.net.common.status == 0 and rig.net.config_read(PCI_COMMAND, 2) == 0
