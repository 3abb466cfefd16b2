"""The in-process platform with a virtio-net PF, its VFs enabled and driven the Linux way.

What a Linux guest does with an SR-IOV virtio-net NIC, step by step:

1. boot: firmware assigns the PF's BARs; the PCI core runs ``sriov_init``
   and assigns the VF BARs (:class:`~iovirt.sriov.driver.SriovDriver`
   ``init`` and ``assign_vf_bars``) -- done when the machine is built;
2. ``virtio_pci`` binds to the PF (:meth:`SriovNetMachine.bring_up_pf`);
3. ``echo N > sriov_numvfs`` calls ``virtio_pci_sriov_configure``
   (:meth:`SriovNetMachine.sriov_configure`): -EBUSY before DRIVER_OK,
   -EINVAL unless VIRTIO_F_SR_IOV was negotiated, then ``pci_enable_sriov``;
4. ``virtio_pci`` binds to every VF (:meth:`SriovNetMachine.vf_driver`), and
   each VF brings its own queues and MSI-X vectors up.

With an administration virtqueue on the PF (``admin_vq=True``), step 2 also
sets it up as Linux's ``vp_modern_avq_*`` does (:func:`bring_up_owner`), and
:attr:`SriovNetMachine.admin` sends the SR-IOV group's commands.
"""

from __future__ import annotations

from iovirt.memory import BumpAllocator
from iovirt.pci.firmware import assign_resources
from iovirt.platform.machine import FIRST_SLOT, Platform
from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.sriov.capability import SriovCapability, attach_pf, find_sriov
from iovirt.sriov.driver import EnumeratedVf, SriovDriver
from iovirt.sriov.errors import SriovDriverError
from iovirt.sriov.vf_config import VfConfig
from iovirt.sriov.virtio_net import make_virtio_net_pf
from iovirt.virtio.admin.driver import AdminClient
from iovirt.virtio.defs import (
    VIRTIO_CONFIG_S_ACKNOWLEDGE,
    VIRTIO_CONFIG_S_DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_F_ADMIN_VQ,
    VIRTIO_F_SR_IOV,
)
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.transport.defs import VIRTIO_PCI_COMMON_ADMIN_Q_INDEX, VIRTIO_PCI_COMMON_NUMQ

PF_MAC = bytes.fromhex("525400123456")
PF_SLOT = FIRST_SLOT
VF_BAR_WINDOW = (0xE000_0000, 0x1000_0000)
"""Where the PCI core places VF BARs: above firmware's 32-bit window, below the APIC."""
MAX_TOTAL_VFS = 0x100 - ((PF_SLOT << 3) + 8)
"""The most VFs that fit on bus 0 behind a PF at 00:03.0 (routing IDs 0x20-0xFF)."""


def bring_up_owner(driver: VirtioPciDriver, queues: int | None = None, wanted: int | None = None) -> AdminClient:
    """Bring a group owner up with its administration virtqueue (3.1.1, 4.1.4.3): every feature offered
    (or ``wanted``, which must keep VIRTIO_F_ADMIN_VQ), ``queues`` device queues (default all), the admin
    queue at ``admin_queue_index`` with its own MSI-X vector, DRIVER_OK.  Returns the admin queue's client."""
    driver.probe()
    driver.reset()
    driver.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
    driver.add_status(VIRTIO_CONFIG_S_DRIVER)
    driver.negotiate(wanted)
    if not driver.has_feature(VIRTIO_F_ADMIN_VQ):
        raise SriovDriverError("EINVAL", "VIRTIO_F_ADMIN_VQ was not negotiated")
    count = driver.common_read(VIRTIO_PCI_COMMON_NUMQ, 2) if queues is None else queues
    index = driver.common_read(VIRTIO_PCI_COMMON_ADMIN_Q_INDEX, 2)
    driver.setup_msix(index + 1)  # entry i+1 for queue i, up to the admin queue
    for i in range(count):
        driver.setup_queue(i)
    queue = driver.setup_queue(index)
    driver.driver_ok()
    return AdminClient(queue, lambda: driver.host.mmio_write(driver.notify_addr[index], 2, index))


class SriovNetMachine:
    """A :class:`~iovirt.platform.machine.Platform` with a virtio-net SR-IOV PF at 00:03.0.

    ``SriovNetMachine(total_vfs=16, *, platform=None, mac=PF_MAC, admin_vq=False)``: the
    platform defaults to ``Platform(())`` (no other virtio devices, real host
    timer); pass one built with a fake clock in tests.  ``admin_vq``: the PF
    has an administration virtqueue for its SR-IOV group (:mod:`iovirt.sriov.admin`).  The PF and every VF
    are ports of :attr:`switch`.  :meth:`close` releases the platform.
    """

    def __init__(
        self, total_vfs: int = 16, *, platform: Platform | None = None, mac: bytes = PF_MAC, admin_vq: bool = False
    ) -> None:
        self.platform = platform if platform is not None else Platform(())
        host = self.platform.host
        self.switch = LearningSwitch()
        self.pf = make_virtio_net_pf(
            self.platform.memory, self.switch, mac, total_vfs, iommu=self.platform.iommu, admin_vq=admin_vq
        )
        attach_pf(host.root_bus, self.pf, PF_SLOT)
        # Firmware enumerates again with the PF present (the platform built the bus without it).
        assign_resources(host)
        sriov = find_sriov(self.pf)
        assert sriov is not None
        self.sriov: SriovCapability = sriov
        self.iov = SriovDriver(host, 0, PF_SLOT)
        self.iov.init()
        self.iov.assign_vf_bars(BumpAllocator(*VF_BAR_WINDOW))
        self.pf_driver: VirtioPciDriver | None = None
        self.admin: AdminClient | None = None
        """The PF's administration virtqueue, once :meth:`bring_up_pf` set it up (``admin_vq=True``)."""

    def enable_iommu(self, interrupt_remapping: bool = True) -> None:
        """Turn DMA remapping on as intel-iommu would: the PF now, each VF as it is enabled."""
        self.platform.enable_iommu(interrupt_remapping)
        self.platform.iommu_attach(self.pf.requester_id)

    def bring_up_pf(self, queues: int | None = None) -> VirtioPciDriver:
        """Bind the virtio-pci driver to the PF and bring it to DRIVER_OK."""
        driver = self.platform.driver(self.pf)
        if self.pf.admin is None:
            driver.bring_up(queues=queues)
        else:
            self.admin = bring_up_owner(driver, queues)
        self.pf_driver = driver
        return driver

    def sriov_configure(self, num_vfs: int) -> list[EnumeratedVf]:
        """``virtio_pci_sriov_configure``: enable ``num_vfs`` VFs (0 disables them)."""
        driver = self.pf_driver
        if driver is None or not driver.status & VIRTIO_CONFIG_S_DRIVER_OK:
            raise SriovDriverError("EBUSY", "the PF's virtio driver is not at DRIVER_OK")
        if not driver.has_feature(VIRTIO_F_SR_IOV):
            raise SriovDriverError("EINVAL", "VIRTIO_F_SR_IOV was not negotiated")
        if not num_vfs:
            self.iov.disable()
            return []
        vfs = self.iov.enable(num_vfs)
        if self.platform.vtd_driver is not None:
            for vf in vfs:
                self.platform.iommu_attach(vf.rid)
        return vfs

    def vf_driver(self, vf: EnumeratedVf) -> VirtioPciDriver:
        """A (not yet probed) virtio-pci driver for an added VF."""
        platform = self.platform
        return VirtioPciDriver(platform.host, VfConfig(platform.host, vf), platform.memory, platform.dma_alloc, platform.irq)

    def close(self) -> None:
        """Reset the PF (its VFs go, every queue lets go of guest memory), then close the platform."""
        self.pf.reset()
        self.platform.close()

    def __enter__(self) -> "SriovNetMachine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
