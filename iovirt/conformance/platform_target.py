"""The in-process virtio-pci platform as a conformance target.

:class:`PlatformTarget` puts a device behind iovirt's virtio-pci transport
on an :class:`~iovirt.platform.Platform` (a fresh machine per check, on a
fake clock) and the checks of :mod:`iovirt.conformance.checks.pci` drive it
as a guest kernel would: config cycles through ECAM, MMIO to the BARs,
MSI-X into the vLAPICs, rings in guest memory
(:class:`~iovirt.platform.VirtioPciDriver`).  Here the transport itself is
under test (virtio 1.2 section 4.1) along with the generic device
requirements a socket cannot reach (status, feature negotiation, reset,
configuration generation).

``PlatformTarget("net", owner=True)`` puts the device under test in the
place of an SR-IOV owner: iovirt's virtio-net PF with its VFs and its
administration virtqueue (:class:`~iovirt.sriov.machine.SriovNetMachine`),
for the group administration checks (:mod:`iovirt.conformance.checks.admin_vq`)
as well as every other virtio-pci check.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, ClassVar

from iovirt.conformance.registry import CheckFailed, NotApplicable
from iovirt.conformance.target import CONFIG_PROBE_SIZE, Capabilities
from iovirt.pci.capability import walk_capabilities
from iovirt.pci.regs import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_QSIZE
from iovirt.platform.testing import fake_clock_platform
from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.sriov.machine import SriovNetMachine
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.blk.defs import SECTOR_SIZE, VIRTIO_BLK_T_IN
from iovirt.virtio.defs import VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.net.defs import NET_HDR_SIZE, NetHdr
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.transport.defs import VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_COMMON_NUMQ

IMAGE_SIZE = 1 << 20
MAC = bytes.fromhex("525400c0ffee")
BLK_READ = (VIRTIO_BLK_T_IN, 0, 0)  # type, reserved, sector 0 (5.2.6)
QUEUE_SIZE = 64
OWNER_VFS = 4
"""TotalVFs of the SR-IOV owner target."""

IN_PROCESS_DEVICES = ("net", "blk")
"""The device types :func:`iovirt_device` builds (:data:`~iovirt.conformance.target.DEVICES` lists those checked over vhost-user)."""

DeviceFactory = Callable[[str, str], VirtioDevice]
"""Makes the device under test: ``(device type, scratch directory)`` -> device."""


def iovirt_device(device: str, scratch: str) -> VirtioDevice:
    """iovirt's own device: a net port on a switch of its own, or a blk on a 1 MiB image in ``scratch``."""
    if device == "net":
        return VirtioNet(MAC, LearningSwitch(), label="conform-net")
    return VirtioBlk(os.path.join(scratch, "disk.img"), size=IMAGE_SIZE, label="conform-blk")


CTRL_QUEUE_PAIRS = 4
"""Queue pairs of :func:`iovirt_ctrl_net` (the multiqueue steering checks need more than one)."""


def iovirt_ctrl_net(device: str, scratch: str) -> VirtioDevice:
    """iovirt's net port with a control virtqueue and :data:`CTRL_QUEUE_PAIRS` queue pairs (virtio 1.4 5.1.9.5)."""
    if device != "net":
        raise ValueError(f"a control virtqueue is a net device's, not {device}'s")
    return VirtioNet(MAC, LearningSwitch(), queue_pairs=CTRL_QUEUE_PAIRS, ctrl_vq=True, label="conform-net")


@dataclass(frozen=True)
class PlatformTarget:
    """A device type behind the in-process virtio-pci transport; ``make_device`` builds the device."""

    device: str
    timeout: float = 5.0
    make_device: DeviceFactory = iovirt_device
    owner: bool = False
    """The device is iovirt's SR-IOV owner (a virtio-net PF with VFs and an administration virtqueue);
    ``make_device`` is not used then."""
    transport: ClassVar[str] = "pci"

    def __post_init__(self) -> None:
        if self.device not in IN_PROCESS_DEVICES:
            raise ValueError(f"device must be one of {IN_PROCESS_DEVICES}, got {self.device!r}")
        if self.owner and self.device != "net":
            raise ValueError("the SR-IOV owner target is a net device")

    def probe(self) -> Capabilities:
        """The features offered and the device configuration, read once after ACKNOWLEDGE|DRIVER."""
        caps = Capabilities(self.device)
        ctx = PciContext(self, caps)
        try:
            driver = ctx.driver
            driver.reset()
            driver.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
            driver.add_status(VIRTIO_CONFIG_S_DRIVER)
            caps.features = driver.device_features()
            # Without a device configuration capability there is nothing to read (4.1.4.6.1's check fails).
            if VIRTIO_PCI_CAP_DEVICE_CFG in driver.caps:
                caps.config = driver.read_device_config(0, CONFIG_PROBE_SIZE[self.device])
        finally:
            ctx.close()
        return caps

    def context(self, caps: Capabilities) -> "PciContext":
        """A fresh machine for one check."""
        return PciContext(self, caps)


class PciContext:
    """One check's machine: the platform, the function under test and its (probed) driver.

    The runner closes it when the check ends.
    """

    def __init__(self, target: PlatformTarget, caps: Capabilities) -> None:
        self.target = target
        self.caps = caps
        self.timeout = target.timeout
        self.scratch = tempfile.mkdtemp(prefix="iovirt-conform-")
        self.opened = False
        self.machine: SriovNetMachine | None = None
        """The SR-IOV owner's machine (PF, VFs, SR-IOV driver) with ``owner=True``."""
        try:
            if target.owner:
                self.machine = SriovNetMachine(OWNER_VFS, platform=fake_clock_platform([]), admin_vq=True)
                self.platform = self.machine.platform
                self.function = self.machine.pf
                self.device = self.function.device
            else:
                self.device = target.make_device(target.device, self.scratch)
                self.platform = fake_clock_platform([self.device])
                self.function = self.platform.functions[0]
            self.driver: VirtioPciDriver = self.platform.driver(self.function)
            self.driver.probe()
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise
        self.opened = True
        self.request_index = 1 if target.device == "net" else 0
        """The queue :meth:`post_request` uses: transmitq1 (net) or requestq1 (blk)."""

    def close(self) -> None:
        """Tear the machine down."""
        if self.machine is not None:
            self.machine.close()
        else:
            self.platform.close()
        close = getattr(self.device, "close", None)
        if close is not None:
            close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    # -- bring-up, step by step ---------------------------------------------------------
    def init(self, wanted: int | None = None, *, msix: bool = True) -> None:
        """3.1.1 up to (not including) DRIVER_OK: reset, ACKNOWLEDGE, DRIVER, features, MSI-X, every queue."""
        d = self.driver
        d.reset()
        d.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE)
        d.add_status(VIRTIO_CONFIG_S_DRIVER)
        d.negotiate(wanted)
        count = self.num_queues
        if msix:
            d.setup_msix(count)
        for index in range(count):
            d.setup_queue(index, QUEUE_SIZE)

    def bring_up(self, wanted: int | None = None, *, msix: bool = True) -> None:
        """:meth:`init` and DRIVER_OK."""
        self.init(wanted, msix=msix)
        self.driver.driver_ok()

    @property
    def num_queues(self) -> int:
        """``num_queues`` of the common configuration."""
        return self.driver.common_read(VIRTIO_PCI_COMMON_NUMQ, 2)

    # -- requests -------------------------------------------------------------------------
    def post_request(self) -> None:
        """Make one request available on :attr:`request_index` (not published): a frame (net), a read of sector 0 (blk)."""
        q = self.driver.queues[self.request_index]
        if self.target.device == "net":
            frame = b"\xff" * 6 + MAC + b"\x88\xb5" + b"iovirt-conform".ljust(46, b"\0")
            q.add_data([NetHdr().pack(NET_HDR_SIZE) + frame], ())
        else:
            q.add_data([struct.pack("<IIQ", *BLK_READ)], [SECTOR_SIZE + 1])

    def kick(self, index: int | None = None) -> None:
        """Publish and notify queue ``index`` (default :attr:`request_index`) whatever the suppression state.

        The in-process transport serves the queue during the notify write.
        An extra notification is always allowed (2.7.10), and a device that
        is not ready must not act on it (2.1.2).
        """
        index = self.request_index if index is None else index
        self.driver.queues[index].publish()
        self.driver.host.mmio_write(self.driver.notify_addr[index], 2, index)

    def used(self, index: int | None = None) -> int:
        """Used entries the device published on queue ``index`` and the driver has not taken."""
        q = self.driver.queues[self.request_index if index is None else index]
        return (q.used_idx() - q.last_used_idx) & 0xFFFF

    def take_interrupts(self) -> dict[int | str, int]:
        """Let the vCPUs take pending interrupts; returns the count per queue index and ``"config"`` so far."""
        self.platform.service_interrupts()
        return dict(self.driver.interrupts)

    def change_config(self) -> None:
        """The device side changes its configuration (net: link status; blk: capacity) and tells the transport.

        Only iovirt's own device types have a configuration this target knows
        how to change; for another ``make_device`` the check does not apply.
        """
        device = self.device
        if isinstance(device, VirtioNet):
            device.link_up = not device.link_up
        elif isinstance(device, VirtioBlk):
            device.capacity -= 1
        else:
            raise NotApplicable(f"{type(device).__name__}: no configuration change this target can make")
        self.function.config_changed()

    # -- config space -------------------------------------------------------------------
    def read_device_config(self, offset: int, length: int) -> bytes:
        """Bytes of the device configuration (re-read until ``config_generation`` is stable).

        A function without a VIRTIO_PCI_CAP_DEVICE_CFG capability has no
        configuration a driver can reach: a check that reads it does not
        apply (the missing capability fails 4.1.4.6.1's check).
        """
        if VIRTIO_PCI_CAP_DEVICE_CFG not in self.driver.caps:
            raise NotApplicable("no VIRTIO_PCI_CAP_DEVICE_CFG capability: the device configuration cannot be read")
        return self.driver.read_device_config(offset, length)

    def msix_table_size(self) -> int:
        """Table Size of the MSI-X capability (N-1 encoded, PCI 6.8.2.3), or 0 without one."""
        read = self.driver.cfg.read
        for cap_id, offset in walk_capabilities(read):
            if cap_id == PCI_CAP_ID_MSIX:
                return (read(offset + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_QSIZE) + 1
        raise CheckFailed("virtio-1.2 4.1.5.1.2: the function has no MSI-X capability")
