"""One front-end connection to the back-end under test, with shared memory and driver rings.

:class:`Link` plays the VMM (negotiation, memfd memory, vring set-up, here
with every step selectable so that checks can leave a ring disabled or
negotiate without ``VHOST_USER_F_PROTOCOL_FEATURES``) and the guest driver
(:class:`~iovirt.virtio.driver.DriverQueue`).  Every wait is bounded.  Used
entries are validated as they are read (virtio 1.2 2.7.8.2): a back-end that
writes garbage into a used ring fails the running check with the reason.
"""

from __future__ import annotations

import socket
import time
from typing import Sequence

from iovirt.conformance.registry import CheckFailed
from iovirt.memory import BumpAllocator, MemoryRegion
from iovirt.vhost_user import bringup
from iovirt.vhost_user.bringup import PROTOCOL_BIT
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES
from iovirt.vhost_user.driver import IOVA_BASE, PACKED_START_BASE, AnyDriverQueue
from iovirt.vhost_user.viommu import FrontendIommu
from iovirt.virtio.defs import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
)
from iovirt.virtio.driver import DriverQueue, DriverQueueError, UsedElem
from iovirt.virtio.packed_driver import PackedDriverQueue
from iovirt.virtio.net.defs import (
    NET_HDR_LEGACY_SIZE,
    NET_HDR_SIZE,
    VIRTIO_NET_F_HASH_REPORT,  # changes the net header layout (5.1.6), which NetPort does not parse
    VIRTIO_NET_F_MRG_RXBUF,
)

REGION_SIZE = 4 << 20
REGION_STRIDE = 16 << 20  # gaps between regions: a back-end mixing up regions reads the wrong place
POLL_S = 0.0005
TEARDOWN_S = 1.0
"""Bound on waiting for the back-end to drop a closed link before the next one connects."""

TRANSPORT_BITS = sum(1 << b for b in range(24, 41))  # 2.2: bits 24..40 are ring and negotiation extensions
DRIVER_FEATURES = (
    ((1 << 64) - 1) & ~TRANSPORT_BITS & ~(1 << VIRTIO_NET_F_HASH_REPORT)
    | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_VERSION_1) | PROTOCOL_BIT
)
"""What this driver can accept (2.2.1: a driver MUST NOT accept a feature it does not understand):
no IN_ORDER's batched used entries; RING_PACKED only on a link opened with ``packed=True``, ACCESS_PLATFORM
only with ``iommu=True``."""


class Link:
    """A front-end connection set up step by step.

    ``features``/``protocol_features`` are masks of what to accept from the
    offer; ``protocol`` False negotiates without bit 30 (no protocol
    features at all).  ``regions`` memfd regions are shared with
    SET_MEM_TABLE, or one ADD_MEM_REG each when ``mem_slots``.  Rings and
    buffers are allocated from the last region.  ``packed`` accepts VIRTIO_F_RING_PACKED when offered:
    the rings are then packed (2.8).  ``iommu`` accepts VIRTIO_F_ACCESS_PLATFORM when offered: the driver
    then works in IOVAs (``IOVA_BASE`` + guest-physical address) behind :attr:`iommu`, which answers the
    back-end's misses while the link waits for used buffers.
    """

    def __init__(
        self,
        path: str,
        timeout: float,
        *,
        features: int = (1 << 64) - 1,
        protocol_features: int = (1 << 64) - 1,
        protocol: bool = True,
        regions: int = 1,
        mem_slots: bool = False,
        packed: bool = False,
        iommu: bool = False,
    ) -> None:
        self.timeout = timeout
        self.iommu: FrontendIommu | None = None
        self.frontend = VhostUserFrontend.connect(path, timeout=timeout)
        try:
            self.regions: list[MemoryRegion] = [
                self.frontend.add_region(i * REGION_STRIDE, REGION_SIZE) for i in range(regions)
            ]
            self.memory = self.frontend.memory
            self.allocs = [BumpAllocator(r.gpa + 0x1000, r.size - 0x1000) for r in self.regions]
            self.alloc = self.allocs[-1]
            accept = DRIVER_FEATURES | (1 << VIRTIO_F_RING_PACKED if packed else 0)
            accept |= 1 << VIRTIO_F_ACCESS_PLATFORM if iommu else 0
            self.negotiated = bringup.negotiate(
                self.frontend, features & accept, protocol_features, protocol=protocol, packed=packed, iommu=iommu
            )
            bringup.features_ok(self.frontend)  # QEMU's order: FEATURES_OK right after SET_FEATURES
            bringup.share_memory(self.frontend, self.regions, mem_slots=mem_slots)
            if self.negotiated.has(VIRTIO_F_ACCESS_PLATFORM):
                self.iommu = FrontendIommu(self.frontend)
                for r in self.regions:
                    self.iommu.map(IOVA_BASE + r.gpa, r.gpa, r.size)
                self.memory = self.iommu.memory
                self.allocs = [BumpAllocator(IOVA_BASE + r.gpa + 0x1000, r.size - 0x1000) for r in self.regions]
                self.alloc = self.allocs[-1]
        except BaseException:
            self.frontend.close()
            raise
        self.queues: dict[int, AnyDriverQueue] = {}
        self._writable: dict[tuple[int, int], int] = {}

    def add_region(self, *, mem_slots: bool) -> MemoryRegion:
        """Create one more region after the others and share it (ADD_MEM_REG, or the whole table again)."""
        region = self.frontend.add_region(len(self.regions) * REGION_STRIDE, REGION_SIZE)
        self.regions.append(region)
        self.allocs.append(BumpAllocator(region.gpa + 0x1000, region.size - 0x1000))
        bringup.share_memory(self.frontend, [region], mem_slots=mem_slots)
        return region

    @property
    def packed(self) -> bool:
        """Whether VIRTIO_F_RING_PACKED was negotiated (the rings are packed)."""
        return self.negotiated.has(VIRTIO_F_RING_PACKED)

    @property
    def has_status(self) -> bool:
        """Whether VHOST_USER_PROTOCOL_F_STATUS was negotiated (the back-end then waits for DRIVER_OK)."""
        return bringup.has_status(self.frontend)

    @property
    def status(self) -> int:
        """The device status last set (0 until SET_STATUS)."""
        return self.frontend.status

    def driver_ok(self) -> None:
        """Tell the back-end the driver is ready (3.1.1 step 8), as a VMM does after starting the rings.

        Without F_STATUS there is no such message; with it, a back-end may
        serve no ring before DRIVER_OK (DPDK's vhost library waits for it).
        """
        bringup.driver_ok(self.frontend)

    def close(self) -> None:
        """Disconnect and wait (bounded) until the back-end has dropped the connection; frees memory and eventfds.

        A back-end may still be tearing down the previous device when the
        next connection arrives; DPDK's vhost PMD then attaches the new
        device and detaches it again when the old one's teardown runs.
        Half-closing and waiting for the back-end's end of file orders the
        two: a back-end closes its end once it has processed ours.
        """
        try:
            self.frontend.sock.shutdown(socket.SHUT_WR)
            self.frontend.wait_closed(min(self.timeout, TEARDOWN_S))
        except OSError:
            pass  # already closed by the back-end
        if self.iommu is not None:
            self.iommu.close()
        self.frontend.close()

    # -- rings -----------------------------------------------------------------------
    def queue(
        self, index: int, size: int = 64, *, enable: bool = True, call: bool = True, kick: bool = True
    ) -> AnyDriverQueue:
        """Lay out a ring (packed when negotiated, else split) and hand it over: NUM, BASE, ADDR, CALL, KICK,
        then ENABLE 1 or 0 (with bit 30).

        Rings start disabled; an explicit disable also catches a back-end ignoring enable 0.
        """
        event_idx = self.negotiated.has(VIRTIO_F_EVENT_IDX)
        q: AnyDriverQueue
        if self.packed:
            q = PackedDriverQueue(self.memory, self.alloc, size, event_idx=event_idx, index=index)
            areas, base = (q.driver_addr, q.device_addr), PACKED_START_BASE
        else:
            q = DriverQueue(self.memory, self.alloc, size, event_idx=event_idx, index=index)
            areas, base = (q.avail_addr, q.used_addr), 0
        q.set_interrupts(True)
        self.queues[index] = q
        bringup.start_vring(
            self.frontend, index, q.size, q.desc_addr, *areas, base=base, call=call, kick=kick, enable=enable
        )
        if self.iommu is not None:
            self.iommu.serve()  # the misses for the ring, sent before SET_VRING_KICK was acked
        return q

    def split_queue(self, index: int) -> DriverQueue:
        """Queue ``index``, which must be a split ring (checks of split-ring layout use this)."""
        q = self.queues[index]
        assert isinstance(q, DriverQueue), "a split-ring helper used on a packed ring"
        return q

    def restart(self, index: int, base: int, *, call: bool = True, kick: bool = True) -> None:
        """(Re)start vring ``index`` from avail index ``base`` as QEMU does after GET_VRING_BASE (no ENABLE)."""
        q = self.split_queue(index)
        bringup.start_vring(
            self.frontend, index, q.size, q.desc_addr, q.avail_addr, q.used_addr,
            base=base, call=call, kick=kick, enable=None,
        )

    def rebase(self, index: int, base: int) -> None:
        """Stop vring ``index`` (GET_VRING_BASE) and restart it with avail and used idx at ``base``.

        Used to put a ring next to the 16-bit index wrap; no buffer may be outstanding.
        """
        q = self.split_queue(index)
        self.frontend.get_vring_base(index)
        q.set_avail_idx(base)
        q.publish()
        q.last_used_idx = base
        self.memory.write_u16(q.used_addr + 2, base)  # a VMM restarts the ring it left, used idx included
        # avail_event still names an index before the jump: the driver's first kick would be skipped
        # (2.7.10) and a device that waits for kicks would never start.  Ask for that kick.
        self.memory.write_u16(q.used_addr + 4 + 8 * q.size, base)
        self.restart(index, base)
        if self.negotiated.has(VHOST_USER_F_PROTOCOL_FEATURES):
            self.frontend.set_vring_enable(index, True)

    def add(
        self, index: int, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), *, indirect: bool = False
    ) -> int:
        """Make one chain available on queue ``index`` (not yet published); returns its head."""
        head = self.queues[index].add_data(out, in_sizes, indirect=indirect)
        self._writable[(index, head)] = sum(in_sizes)
        return head

    def add_buffers(
        self,
        index: int,
        readable: Sequence[tuple[int, int]],
        writable: Sequence[tuple[int, int]],
        *,
        indirect: bool = False,
        lead: int = 0,
    ) -> int:
        """Make a chain of given guest buffers available (for layouts add() cannot build); with ``indirect``,
        ``lead`` buffers stay in split-ring descriptors before the indirect one."""
        q = self.queues[index]
        if lead:
            head = self.split_queue(index).add_chain(readable, writable, indirect=indirect, lead=lead)
        else:
            head = q.add_chain(readable, writable, indirect=indirect)
        self._writable[(index, head)] = sum(n for _, n in writable)
        return head

    def submit(self, index: int) -> None:
        """Publish the avail idx and kick when the device asks for it (2.7.13.4) and there is a kick fd."""
        if self.queues[index].publish() and index in self.frontend.kick_fds:
            self.frontend.kick(index)

    def outstanding(self, index: int) -> int:
        """Chains made available and not yet used."""
        return sum(1 for (i, _h) in self._writable if i == index)

    def used_count(self, index: int) -> int:
        """New used entries the device published (not yet read); split rings only."""
        q = self.split_queue(index)
        return (q.used_idx() - q.last_used_idx) & 0xFFFF

    def wait_used(self, index: int, n: int = 1, timeout: float | None = None) -> list[UsedElem]:
        """Wait (bounded) for ``n`` used entries on queue ``index`` and read them; fails the check on timeout."""
        got = self.poll_used(index, n, self.timeout if timeout is None else timeout)
        if len(got) < n:
            raise CheckFailed(
                f"queue {index}: {len(got)} of {n} buffers used within {self.timeout if timeout is None else timeout:g} s"
            )
        return got

    def poll_used(self, index: int, n: int, timeout: float) -> list[UsedElem]:
        """Read used entries until ``n`` arrived or ``timeout`` passed; returns what arrived."""
        deadline = time.monotonic() + timeout
        got: list[UsedElem] = []
        while True:
            got += self.read_used(index)
            if len(got) >= n or time.monotonic() >= deadline:
                return got
            if self.iommu is not None:
                self.iommu.serve(POLL_S)  # the back-end may be waiting for a translation
            else:
                time.sleep(POLL_S)

    def read_used(self, index: int) -> list[UsedElem]:
        """Take the new used entries, validating them (2.7.8.2)."""
        q = self.queues[index]
        new = 0 if isinstance(q, PackedDriverQueue) else self.used_count(index)
        pending = self.outstanding(index)
        if new > pending:
            raise CheckFailed(
                f"virtio-1.2 2.7.8.2: queue {index} used idx moved by {new} with only {pending} buffers available"
            )
        try:
            elems = q.get_used()
        except DriverQueueError as exc:
            raise CheckFailed(f"virtio-1.2 2.7.8.2: {exc}") from None
        for elem in elems:
            writable = self._writable.pop((index, elem.head))
            # 2.8.4: in a packed ring the used length of a buffer without device-writable descriptors is reserved
            # ("ignored by drivers"); only a split ring's used len (2.7.8) counts bytes for every buffer.
            if isinstance(q, PackedDriverQueue) and writable == 0:
                continue
            if elem.len > writable:
                raise CheckFailed(
                    f"virtio-1.2 2.7.8.2: queue {index} used len {elem.len} for head {elem.head} "
                    f"exceeds its {writable} device-writable bytes"
                )
        return elems

    # -- virtio-net ------------------------------------------------------------------
    @property
    def net_hdr_len(self) -> int:
        """5.1.6: 12 bytes with VERSION_1 or MRG_RXBUF, else the legacy 10."""
        n = self.negotiated
        return NET_HDR_SIZE if n.has(VIRTIO_F_VERSION_1) or n.has(VIRTIO_NET_F_MRG_RXBUF) else NET_HDR_LEGACY_SIZE
