"""Play a VMM and its guest driver against any vhost-user back-end.

:class:`VhostUserDriver` connects a :class:`~iovirt.vhost_user.frontend.VhostUserFrontend`,
shares memfd guest memory the way a VMM does, negotiates, and sets up
(through :mod:`iovirt.vhost_user.bringup`) driver-side rings (:class:`~iovirt.virtio.driver.DriverQueue`) for the vrings
it is asked for (:class:`~iovirt.virtio.packed_driver.PackedDriverQueue` with
``packed=True``, which accepts VIRTIO_F_RING_PACKED).  With ``iommu=True`` it accepts VIRTIO_F_ACCESS_PLATFORM and
puts a :class:`~iovirt.vhost_user.viommu.FrontendIommu` in front: rings and
buffers live at IOVAs (guest memory mapped at ``IOVA_BASE``), and the
back-end's IOTLB misses are answered by :meth:`FrontendIommu.serve`.  iovirt's tests, the packet bench and the conformance suite
use it to drive iovirt's own back-end or any other one.
"""

from __future__ import annotations

import mmap
import os
from typing import Iterable

from iovirt.memory import BumpAllocator
from iovirt.vhost_user import bringup
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.viommu import FrontendIommu
from iovirt.virtio.defs import (
    PACKED_WRAP_BIT,
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_IN_ORDER,
    VIRTIO_F_NOTIFICATION_DATA,
    VIRTIO_F_RING_PACKED,
)
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.packed_driver import PackedDriverQueue

AnyDriverQueue = DriverQueue | PackedDriverQueue
"""A driver-side ring of either layout; which one follows VIRTIO_F_RING_PACKED (virtio 1.2 §2.7, §2.8)."""

PACKED_START_BASE = PACKED_WRAP_BIT | PACKED_WRAP_BIT << 16
"""SET_VRING_BASE of a fresh packed ring: both indexes 0, both wrap counters 1 (vhost-user.rst "Vring base")."""

GUEST_BASE = 0x0
DEFAULT_MEMORY = 64 << 20
IOVA_BASE = 0x10_0000_0000
"""Where guest memory appears in IOVA space with ``iommu=True`` (deliberately not its GPA)."""


#: Ring features this driver's rings (:class:`DriverQueue`, :class:`PackedDriverQueue`) do not implement,
#: so it never acks them (virtio 1.2 §6.1: a driver accepts only features it understands): notification
#: data in kicks (§2.9).  The packed layout (§2.8) is acked only when asked for (``packed=True``;
#: :func:`bringup.negotiate`); IN_ORDER (§2.7.9, §2.8.8) whenever offered: the rings then use descriptors
#: in ring order and take batched used entries.
UNIMPLEMENTED_RING_FEATURES = 1 << VIRTIO_F_NOTIFICATION_DATA


class VhostUserDriver:
    """A front-end plus guest memory plus driver-side rings for one vhost-user device."""

    def __init__(
        self,
        socket_path: str,
        *,
        memory_size: int = DEFAULT_MEMORY,
        features: int = (1 << 64) - 1,
        protocol_features: int = (1 << 64) - 1,
        timeout: float = 5.0,
        mem_slots: bool = False,
        iommu: bool = False,
        packed: bool = False,
    ) -> None:
        self.frontend = VhostUserFrontend.connect(socket_path, timeout=timeout)
        self.iommu: FrontendIommu | None = None
        try:
            self.region = self.frontend.add_region(GUEST_BASE, memory_size)
            self.memory = self.frontend.memory
            self.alloc = BumpAllocator(GUEST_BASE + 0x1000, memory_size - 0x1000)
            features &= ~UNIMPLEMENTED_RING_FEATURES
            negotiated = bringup.negotiate(self.frontend, features, protocol_features, iommu=iommu, packed=packed)
            self.offered = negotiated.offered
            self.features, self.protocol_features = negotiated.features, negotiated.protocol_features
            bringup.share_memory(self.frontend, [self.region], mem_slots=mem_slots)
            if self.features >> VIRTIO_F_ACCESS_PLATFORM & 1:
                self.iommu = FrontendIommu(self.frontend)
                self.iommu.map(IOVA_BASE, GUEST_BASE, memory_size)
                self.memory = self.iommu.memory
                self.alloc = BumpAllocator(IOVA_BASE + 0x1000, memory_size - 0x1000)
        except BaseException:
            self.frontend.close()
            raise
        self.queues: dict[int, AnyDriverQueue] = {}

    @property
    def packed(self) -> bool:
        """Whether VIRTIO_F_RING_PACKED was negotiated (the rings are packed)."""
        return bool(self.features >> VIRTIO_F_RING_PACKED & 1)

    def start_queues(self, indexes: Iterable[int], size: int = 256) -> dict[int, AnyDriverQueue]:
        """Lay out rings in guest memory and hand them to the back-end (NUM/BASE/ADDR/CALL/KICK/ENABLE).

        With VHOST_USER_PROTOCOL_F_STATUS negotiated, ends with SET_STATUS
        DRIVER_OK as QEMU does: a back-end may serve nothing before it (DPDK's
        vhost library waits for it).
        """
        indexes = list(indexes)
        event_idx = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        in_order = bool(self.features >> VIRTIO_F_IN_ORDER & 1)
        for index in indexes:
            queue: AnyDriverQueue
            if self.packed:
                queue = PackedDriverQueue(self.memory, self.alloc, size, event_idx=event_idx, index=index,
                                          in_order=in_order)
                queue.set_interrupts(True)
                bringup.start_vring(self.frontend, index, size, queue.desc_addr, queue.driver_addr,
                                    queue.device_addr, base=PACKED_START_BASE)
            else:
                queue = DriverQueue(self.memory, self.alloc, size, event_idx=event_idx, index=index, in_order=in_order)
                queue.set_interrupts(True)
                bringup.start_vring(self.frontend, index, size, queue.desc_addr, queue.avail_addr, queue.used_addr)
            self.queues[index] = queue
            if self.iommu is not None:
                # The misses for the ring were sent before SET_VRING_KICK was acked.
                self.iommu.serve()
        bringup.driver_ok(self.frontend)
        return {i: self.queues[i] for i in indexes}

    def rings(self) -> list[bringup.RingLayout]:
        """Where the started rings are."""
        return [bringup.RingLayout(i, q.desc_addr, *_areas(q)) for i, q in self.queues.items()]

    def start_logging(self) -> mmap.mmap:
        """Share a dirty log and turn LOG_ALL on, as QEMU does when a migration starts; returns the log."""
        fd, size = bringup.make_log(self.frontend)
        try:
            bringup.start_logging(self.frontend, fd, size, self.rings())
            if self.iommu is not None:
                self.iommu.serve()  # the rings restart: their misses, if any
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def stop_logging(self) -> None:
        """LOG_ALL off, VHOST_VRING_F_LOG off on every ring."""
        bringup.stop_logging(self.frontend, self.rings())
        if self.iommu is not None:
            self.iommu.serve()

    def kick(self, index: int) -> None:
        """Publish the queue's avail idx and kick if the device asked for it."""
        if self.queues[index].publish():
            self.frontend.kick(index)

    def close(self) -> None:
        """Disconnect and free the shared memory."""
        if self.iommu is not None:
            self.iommu.close()
        self.frontend.close()

    def __enter__(self) -> "VhostUserDriver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _areas(queue: AnyDriverQueue) -> tuple[int, int]:
    """SET_VRING_ADDR's avail and used addresses: a packed ring's Driver and Device areas."""
    if isinstance(queue, PackedDriverQueue):
        return queue.driver_addr, queue.device_addr
    return queue.avail_addr, queue.used_addr
