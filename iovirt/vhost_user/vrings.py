"""The vrings of one front-end connection: set-up, start/stop, notifications, IOTLB.

vhost-user.rst "Ring states": a ring is started by SET_VRING_KICK and
stopped by GET_VRING_BASE, and enabled or disabled by SET_VRING_ENABLE, two
independent axes; without ``VHOST_USER_F_PROTOCOL_FEATURES`` a ring is
enabled as soon as it starts.  Ring addresses are the VMM's (user) addresses,
translated through the memory table when the ring starts, or IOVAs once
``VIRTIO_F_ACCESS_PLATFORM`` is negotiated ("IOMMU support"): the device then
sees memory through a :class:`~iovirt.vhost_user.iotlb.DeviceIotlb`.  A ring
whose IOVAs are not translated yet waits (misses sent) and starts when the
answers arrive; an INVALIDATE of a running ring's pages suspends it until it
is kicked again.  The used index is read from the used ring in memory when
a ring starts.

Packed rings (virtio 1.2 section 2.8), when the front-end negotiated
VIRTIO_F_RING_PACKED: SET_VRING_ADDR's avail and used addresses are the
Driver and Device Event Suppression areas, and the ring's state is not in
memory, so SET/GET_VRING_BASE carry both positions (vhost-user.rst "Vring
descriptor indices for packed virtqueues"): the next avail slot in bits
0-14 with the driver's wrap counter in bit 15, the next used slot in bits
16-30 with the device's wrap counter in bit 31.

Dirty logging ("Migration"): while ``VHOST_F_LOG_ALL`` is negotiated, every
running queue logs its device writes in the session's
:class:`~iovirt.virtio.dirtylog.DirtyLog`, and its used ring at
``log_guest_addr`` when the ring's address carries ``VHOST_VRING_F_LOG``.
A ring that would run with LOG_ALL on and no log yet (QEMU restarts a
device during a migration with SET_FEATURES before SET_LOG_BASE) waits for
SET_LOG_BASE: the device never writes guest memory that it cannot log.

Kick eventfds are served by the data plane; the device signals the call
eventfd, and the err eventfd when it needs a reset.  The back-end shares
these eventfds' file descriptions with the front-end, which may have made
them blocking, fill their counters or drain them itself: they are set
non-blocking when taken over, and a call or err eventfd whose counter is
full ("the front-end is not reading it") costs a counted, dropped
notification, never a blocked data plane (issue 12, failure 4).  A started
ring's new call eventfd is signalled once (see :meth:`Vrings.set_eventfd`):
QEMU starts rings on an eventfd it does not read and sends the guest's
afterwards, and a notification lost in between would never be repeated.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, cast

from iovirt.errors import IovirtError
from iovirt.memory import Access, GuestMemory, GuestMemoryError, TranslationPending
from iovirt.vhost_user.channel import BackendChannel
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.fds import close_fds
from iovirt.vhost_user.inflight import InflightError, InflightQueue, PackedInflightQueue, QueueRegion
from iovirt.vhost_user.iotlb import CompletionFence, DeviceIotlb
from iovirt.vhost_user.memtable import GuestMemoryTable
from iovirt.vhost_user.messages import VHOST_VRING_F_LOG, BackendRequest, IotlbMsg
from iovirt.virtio.defs import (
    PACKED_EVENT_SIZE,
    PACKED_WRAP_BIT,
    VIRTQ_DESC_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from iovirt.virtio.dirtylog import DirtyLog
from iovirt.virtio.kickjob import KickJob
from iovirt.virtio.queue import SplitQueue, ring_of
from iovirt.virtio.state import QueueState

log = logging.getLogger("iovirt.vhost_user")


class VringError(IovirtError):
    """A vring request the back-end cannot apply (its text says why)."""


@dataclass
class RingAddr:
    """Where a ring's three parts are, as the front-end gave them (user addresses or IOVAs)."""

    desc: int
    avail: int
    used: int
    flags: int = 0  # VHOST_VRING_F_LOG: log the used ring at log_guest_addr
    log_guest_addr: int = 0


@dataclass(eq=False)
class Vring:
    """One vring as the front-end described it (hashed by identity: the data plane keys pollers by it)."""

    index: int
    num: int = 0
    addr: RingAddr | None = None
    base: int = 0
    used_idx: int = 0  # the used index when the ring last stopped (with ``base``, its stopped state)
    packed: bool = False  # a packed ring (VIRTIO_F_RING_PACKED negotiated when it started)
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    awaiting_translation: bool = False  # started, but its ring IOVAs are not in the IOTLB yet
    awaiting_log: bool = False  # started, but LOG_ALL is on and there is no log yet
    enabled: bool = False
    inflight: QueueRegion | None = field(default=None, repr=False)
    call_unread: int = 0  # notifications dropped: the call eventfd's counter was full
    err_unread: int = 0  # the same for the err eventfd

    def parts(self) -> list[tuple[int, int, Access]]:
        """``(address, size, access)`` of the descriptor table, avail ring and used ring.

        For a packed ring: the Descriptor Ring (the device writes used
        descriptors into it), the Driver and the Device areas (2.8.10).
        """
        assert self.addr is not None
        if self.packed:
            return [
                (self.addr.desc, VIRTQ_DESC_SIZE * self.num, Access.READ | Access.WRITE),
                (self.addr.avail, PACKED_EVENT_SIZE, Access.READ),
                (self.addr.used, PACKED_EVENT_SIZE, Access.READ | Access.WRITE),
            ]
        return [
            (self.addr.desc, desc_table_size(self.num), Access.READ),
            (self.addr.avail, avail_ring_size(self.num), Access.READ),
            (self.addr.used, used_ring_size(self.num), Access.READ | Access.WRITE),
        ]


class Vrings:
    """Every vring of one connection to ``device``, and the IOTLB in front of its memory."""

    def __init__(self, device: VhostUserDevice, dataplane: DataPlane, table: GuestMemoryTable, label: str) -> None:
        self.device = device
        self.dataplane = dataplane
        self.table = table
        self.label = label
        self.rings = [Vring(i) for i in range(device.num_queues)]
        self.auto_enable = True  # without VHOST_USER_F_PROTOCOL_FEATURES: enabled when started
        self.iotlb: DeviceIotlb | None = None
        self.dma_memory: GuestMemory = table.memory  # IOVAs through the IOTLB with ACCESS_PLATFORM
        self.backend_channel: BackendChannel | None = None
        self.log_all = False  # VHOST_F_LOG_ALL negotiated
        self.dirty_log: DirtyLog | None = None  # SET_LOG_BASE's log

    def __getitem__(self, index: int) -> Vring:
        if not 0 <= index < len(self.rings):
            raise VringError(f"vring index {index} beyond the device's {len(self.rings)} queues")
        return self.rings[index]

    @property
    def any_started(self) -> bool:
        """Whether a ring is started."""
        return any(v.started for v in self.rings)

    # -- set-up -----------------------------------------------------------------------
    def set_num(self, index: int, num: int) -> None:
        """SET_VRING_NUM: a power of 2 up to the device's maximum, on a stopped ring."""
        vring = self[index]
        limit = self.device.queue_max_size
        if num == 0 or num & (num - 1) or num > limit:
            raise VringError(f"ring size {num} is not a power of 2 in [1, {limit}]")
        if vring.started:
            raise VringError(f"vring {index} is started")
        _check_fits_inflight(vring, num, vring.inflight)
        vring.num = num

    def set_addr(self, index: int, addr: RingAddr) -> None:
        """SET_VRING_ADDR; QEMU re-sends a running ring's address (e.g. to toggle logging): restart it in place."""
        vring = self[index]
        vring.addr = addr
        if vring.started:
            self._save_base(vring)
            self._start(vring, vring.kick_fd)

    def set_base(self, index: int, base: int) -> None:
        """SET_VRING_BASE: the next avail index (packed: both positions), on a stopped ring."""
        vring = self[index]
        if vring.started:
            raise VringError(f"vring {index} is started")
        if self.device.ring_packed:
            _check_packed_base(index, base, vring.num)
            if base >> 16 == 0 and base & 0xFFFF:
                # vhost-user.rst gives the used position bits 16-31, but DPDK's virtio-user sends the avail
                # position alone (0x8000 for a fresh ring: used wrap counter 0, where virtio 1.2 §2.8.1 starts
                # both at 1), and DPDK's vhost library takes the used position to be the avail one.  On a
                # stopped ring every buffer made available was used, so that is where used stands.
                log.info("%s: vring %d: SET_VRING_BASE %#x gives no used position; it is taken to be the "
                         "avail position", self.label, index, base)
                base |= base << 16
        elif base > 0xFFFF:
            raise VringError(f"split ring base {base} is not a 16-bit index")
        vring.base = base

    def get_base(self, index: int) -> int:
        """GET_VRING_BASE: stop the ring; returns where it stopped."""
        vring = self[index]
        self.stop(vring)
        if vring.packed:
            log.info("%s: vring %d stopped at %s", self.label, index, _packed_positions(vring.base))
        else:
            log.info("%s: vring %d stopped at avail index %d", self.label, index, vring.base)
        return vring.base

    def set_kick(self, index: int, fd: int | None) -> None:
        """SET_VRING_KICK: (re)start the ring; ``fd`` (None: poll) is taken over on success."""
        vring = self[index]
        if fd is not None:
            take_eventfd(fd)
        self.stop(vring)
        self._start(vring, fd)

    def set_eventfd(self, index: int, name: str, fd: int | None) -> None:
        """SET_VRING_CALL/ERR: replace eventfd ``name`` ("call_fd"/"err_fd"; None with the no-fd bit)."""
        vring = self[index]
        if fd is not None:
            take_eventfd(fd)
        close_fds([getattr(vring, name)])
        setattr(vring, name, fd)
        if name == "call_fd" and fd is not None and vring.started:
            # A running ring's used-buffer notification may have gone to the eventfd
            # replaced here, which nobody may read (QEMU starts rings on its masked
            # notifier and sends the guest's with SET_VRING_CALL afterwards, without
            # waiting): with EVENT_IDX nothing later repeats it (2.7.10, 2.8.10), and the
            # driver would wait for it forever.  A spurious notification is harmless.
            self._signal(vring, fd, "call")

    def enable(self, index: int, enabled: bool) -> None:
        """SET_VRING_ENABLE."""
        self._enable(self[index], enabled)

    def enable_all(self, enabled: bool) -> None:
        """Enable (no protocol features) or disable (RESET_OWNER) every ring."""
        for vring in self.rings:
            self._enable(vring, enabled)

    def check_inflight_size(self, num_queues: int, queue_size: int) -> None:
        """Refuse an inflight region of ``queue_size`` entries per queue smaller than a ring set already."""
        for vring in self.rings[:num_queues]:
            if vring.num > queue_size:
                raise VringError(
                    f"vring {vring.index} has {vring.num} descriptors, more than the inflight region's "
                    f"queue_size {queue_size}"
                )

    def use_inflight(self, regions: list[QueueRegion]) -> None:
        """Track the first ``len(regions)`` rings in the inflight regions (from their next start).

        The other rings are no longer tracked: the previous region is unmapped.
        """
        for i, vring in enumerate(self.rings):
            vring.inflight = regions[i] if i < len(regions) else None

    # -- start and stop -------------------------------------------------------------------
    def _start(self, vring: Vring, kick_fd: int | None) -> None:
        if vring.num == 0 or vring.addr is None:
            raise VringError(f"vring {vring.index} has no size or no addresses yet")
        vring.packed = self.device.ring_packed
        try:
            running = self._start_device_queue(vring)
        except IovirtError as exc:
            raise VringError(f"vring {vring.index} cannot start: {exc}") from exc
        vring.started = True
        vring.kick_fd = kick_fd
        if self.auto_enable:
            self._enable(vring, True)
        kick = self._kicker(vring)
        if kick_fd is not None:
            counted, kicked = self._counted_kick(vring, kick)
            self.dataplane.add_ring(kick_fd, counted, lambda: self.device.queue(vring.index), kick, kicked,
                                    lambda: self._kick_job(vring))
        else:
            self.dataplane.add_poller(vring, kick)
        if running:
            kick()  # buffers made available before the kick fd arrived

    def _start_device_queue(self, vring: Vring) -> bool:
        """Hand ``vring`` to the device; False if its ring IOVAs are not translated yet.

        Raises :class:`IovirtError` for a ring that cannot be served.
        """
        desc, avail, used = self.placement(vring)
        if self.iotlb is not None:
            if not self._ring_translated(vring):
                if not vring.awaiting_translation:
                    log.info("%s: vring %d waits for IOTLB entries of its ring", self.label, vring.index)
                vring.awaiting_translation = True
                return False
        if self.log_all and self.dirty_log is None:
            if not vring.awaiting_log:
                log.warning("%s: vring %d waits: VHOST_F_LOG_ALL is on and there is no log (SET_LOG_BASE) "
                            "to log its writes in", self.label, vring.index)
            vring.awaiting_log = True
            return False
        # Checked at SET_VRING_NUM and SET_INFLIGHT_FD already; a head the region has
        # no entry for must never reach the data plane, whatever the order of requests.
        _check_fits_inflight(vring, vring.num, vring.inflight)
        memory = self.dma_memory
        if vring.packed:
            _check_packed_base(vring.index, vring.base, vring.num)
            wrap = None if vring.inflight is None else self._packed_inflight_wrapper(vring, vring.inflight)
            last_avail_idx, used_idx = vring.base & 0xFFFF, vring.base >> 16
        else:
            used_idx = memory.read_u16(used + 2)
            wrap = None if vring.inflight is None else self._inflight_wrapper(vring, vring.inflight, used_idx)
            last_avail_idx = vring.base
        if self.iotlb is not None:
            wrap = _fenced(wrap, self.iotlb)
        state = QueueState(vring.num, desc, avail, used, last_avail_idx=last_avail_idx, used_idx=used_idx)
        queue = self.device.start_queue(vring.index, memory, state, self._notifier(vring), wrap)
        self._install_log(vring, queue)
        vring.awaiting_translation = vring.awaiting_log = False
        if vring.packed:
            log.info("%s: vring %d started packed: size %d, desc %#x driver area %#x device area %#x, %s",
                     self.label, vring.index, vring.num, desc, avail, used, _packed_positions(vring.base))
        else:
            log.info(
                "%s: vring %d started: size %d, desc %#x avail %#x used %#x, avail index %d",
                self.label, vring.index, vring.num, desc, avail, used, vring.base,
            )
        return True

    def placement(self, vring: Vring) -> tuple[int, int, int]:
        """The ring's desc, avail and used addresses in :attr:`dma_memory` (guest-physical, or IOVAs).

        Raises :class:`IovirtError` for a user address outside the memory table.
        """
        addr = vring.addr
        assert addr is not None
        if self.iotlb is None:
            desc, avail, used = (self.table.user_to_guest(a) for a in (addr.desc, addr.avail, addr.used))
            return desc, avail, used
        # vhost-user.rst: "a ring address is an IOVA if VIRTIO_F_IOMMU_PLATFORM has been negotiated".
        return addr.desc, addr.avail, addr.used

    def _inflight_wrapper(
        self, vring: Vring, region: QueueRegion, used_idx: int
    ) -> Callable[[SplitQueue], SplitQueue]:
        """What puts inflight tracking around the device's queue, after recovering the region."""
        resubmit = self._recover(vring, region, used_idx)
        # The wrapper has the queue's whole API (QueueWrapper): the device cannot tell.
        return lambda queue: cast(SplitQueue, InflightQueue(queue, region, resubmit))

    def _recover(self, vring: Vring, region: QueueRegion, used_idx: int) -> list[int]:
        """The requests a previous back-end popped and never completed, in pop order.

        vhost-user.rst "Inflight I/O tracking", on reconnect: repair the last
        batch, then resubmit in the order of the counters.  Every chain popped
        is now either used or in flight, so the avail ring goes on after
        ``used_idx`` plus those in flight (as libvhost-user), whatever base
        the front-end restored.
        """
        heads = region.recover(used_idx)
        if heads:
            vring.base = (used_idx + len(heads)) & 0xFFFF
            log.info("%s: vring %d resubmits %d inflight requests (heads %s); avail index %d",
                     self.label, vring.index, len(heads), heads[:8], vring.base)
        return heads

    def _packed_inflight_wrapper(self, vring: Vring, region: QueueRegion) -> Callable[[SplitQueue], SplitQueue]:
        """What puts packed inflight tracking around the device's queue, after recovering the region.

        vhost-user.rst "Inflight I/O tracking", packed virtqueue.  A region
        set up by this back-end (GET_INFLIGHT_FD) starts where the front-end
        said (SET_VRING_BASE).  A region handed back (SET_INFLIGHT_FD, after
        a back-end restart) knows better than the front-end, which could not
        ask a dead back-end where its rings stopped: the used position is the
        region's, and the avail position follows the lists in flight, which
        took the ring slots between the two (2.8.6: a used descriptor skips
        as many slots as its list took).
        """
        try:
            packed = region.packed()
        except InflightError as exc:
            raise VringError(f"vring {vring.index} is packed: {exc}") from exc
        if packed.fresh:
            packed.start_at(vring.base >> 16)
            lists: list[tuple[int, list[bytes]]] = []
        else:
            desc, _, _ = self.placement(vring)
            memory = self.dma_memory
            used_pos, lists = packed.recover(lambda slot: memory.read_u16(desc + VIRTQ_DESC_SIZE * slot + 14))
            taken = sum(len(descs) for _, descs in lists)
            slot, wrap = (used_pos & ~PACKED_WRAP_BIT) + taken, used_pos >> 15
            laps, slot = divmod(slot, vring.num)
            avail_pos = slot | (wrap ^ (laps & 1)) << 15
            recovered = avail_pos | used_pos << 16
            if recovered != vring.base:
                log.info("%s: vring %d: the inflight region places the ring at %s (the front-end said %s)",
                         self.label, vring.index, _packed_positions(recovered), _packed_positions(vring.base))
            vring.base = recovered
            if lists:
                log.info("%s: vring %d resubmits %d inflight requests (entries %s); %s", self.label, vring.index,
                         len(lists), [head for head, _ in lists[:8]], _packed_positions(vring.base))
        return lambda queue: cast(SplitQueue, PackedInflightQueue(queue, packed, lists))

    def stop(self, vring: Vring) -> None:
        """Stop serving ``vring`` (its kick fd closed); remembers where it stopped."""
        if vring.kick_fd is not None:
            self.dataplane.remove(vring.kick_fd)
            close_fds([vring.kick_fd])
            vring.kick_fd = None
        self.dataplane.remove_poller(vring)
        vring.awaiting_translation = vring.awaiting_log = False
        if vring.started:
            self._save_base(vring)
            vring.started = False

    def _save_base(self, vring: Vring) -> None:
        state = self.device.stop_queue(vring.index)
        if state is not None:
            vring.base = state.last_avail_idx | (state.used_idx << 16 if vring.packed else 0)
            vring.used_idx = state.used_idx

    def reset(self) -> None:
        """RESET_DEVICE: every ring stopped and disabled, bases back to 0."""
        for vring in self.rings:
            self.stop(vring)
            vring.enabled = False
            vring.base = 0

    def close(self) -> None:
        """The front-end went away: every ring stopped, every eventfd closed."""
        for vring in self.rings:
            self.stop(vring)
            if vring.call_unread or vring.err_unread:
                log.info("%s: vring %d: %d call and %d err notifications dropped (eventfd not read)",
                         self.label, vring.index, vring.call_unread, vring.err_unread)
            for name in ("call_fd", "err_fd"):
                close_fds([getattr(vring, name)])
                setattr(vring, name, None)
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None

    def refresh(self, rings: list[Vring] | None = None) -> None:
        """Rings re-resolve their host pointers (the memory table or a ring's IOTLB entry changed)."""
        for vring in self.rings if rings is None else rings:
            queue = self.device.queue(vring.index)
            if queue is None:
                continue
            try:
                queue.refresh()
            except IovirtError as exc:
                self.device.stop_queue(vring.index)
                self.device.fail(exc)

    def _enable(self, vring: Vring, enabled: bool) -> None:
        if vring.enabled != enabled:
            log.info("%s: vring %d %s", self.label, vring.index, "enabled" if enabled else "disabled")
        vring.enabled = enabled
        self.device.set_queue_enabled(vring.index, enabled)
        if enabled and vring.started:
            self.device.kick(vring.index)

    # -- notifications ------------------------------------------------------------------
    def wake(self) -> None:
        """The device signalled its wake-up eventfd: run it on every started ring, as a kick would."""
        for vring in self.rings:
            if vring.started:
                self._kicker(vring)()

    def _kicker(self, vring: Vring) -> Callable[[], None]:
        def kick() -> None:
            if vring.awaiting_translation or vring.awaiting_log:
                self._resume(vring)
            else:
                self.device.kick(vring.index)

        return kick

    def requeue(self, index: int) -> None:
        """Serve ring ``index`` again soon without a kick (``VirtioDevice.requeue``): on its worker's next turn."""
        vring = self.rings[index]
        if not vring.started:
            return
        if vring.kick_fd is not None:
            self.dataplane.requeue(vring.kick_fd)
        else:
            self.dataplane.call_later(0.0, self._kicker(vring))  # a polled ring: its poller would, a turn later

    def _kick_job(self, vring: Vring) -> KickJob | None:
        """The device's kick job for ``vring`` (:meth:`VirtioDevice.kick_job`), unless the ring waits to start."""
        if vring.awaiting_translation or vring.awaiting_log:
            return None
        return self.device.kick_job(vring.index)

    def _counted_kick(self, vring: Vring, kick: Callable[[], None]) -> tuple[Callable[[], None], Callable[[int], None]]:
        """``kick``, counting each kick eventfd signal in the device's per-queue ``kicks``; and ``kicked(n)``.

        ``kicked(n)`` counts ``n`` signals served without ``kick`` (by a kick job).
        """
        device = self.device.device
        counters = device.queue_stats[vring.index]

        def kicked(n: int) -> None:
            if device.counting:
                counters["kicks"] += n

        def counted() -> None:
            kicked(1)
            kick()

        return counted, kicked

    def _notifier(self, vring: Vring) -> CallNotifier:
        return CallNotifier(self, vring)

    def signal_errors(self) -> None:
        """The device needs a reset: tell the front-end through the err eventfds (SET_VRING_ERR)."""
        for vring in self.rings:
            if vring.err_fd is not None:
                self._signal(vring, vring.err_fd, "err")

    def _signal(self, vring: Vring, fd: int, kind: str) -> None:
        """Add 1 to eventfd ``fd``, the ``kind`` ("call"/"err") eventfd of ``vring``, without blocking."""
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:
            # eventfd(2): a write that would overflow the counter waits for a read.
            # The front-end is not reading: drop this notification, count it, log it once.
            attr = f"{kind}_unread"
            count = getattr(vring, attr) + 1
            setattr(vring, attr, count)
            if count == 1:
                log.warning("%s: vring %d: %s eventfd full, the front-end is not reading it; "
                            "its notifications are dropped and counted", self.label, vring.index, kind)
        except OSError as exc:
            log.warning("%s: %s eventfd of vring %d: %s", self.label, kind, vring.index, exc)

    # -- IOMMU (vhost-user.rst "IOMMU support") ---------------------------------------
    def use_iotlb(self, enabled: bool) -> None:
        """A fresh, empty device IOTLB in front of the device's memory (or none).

        Buffer translations last while their request is in flight: every
        queue started behind it forgets them after each completion
        (:class:`~iovirt.vhost_user.iotlb.CompletionFence`).
        """
        if not enabled:
            self.iotlb = None
            self.dma_memory = self.table.memory
            return
        iotlb = DeviceIotlb(self.table, self._send_iotlb_msg, self.label)
        iotlb.on_resolved = self._translations_arrived
        iotlb.pinned = self._running_ring_ranges
        self.iotlb = iotlb
        self.dma_memory = self.table.memory.with_translator(iotlb)

    def _send_iotlb_msg(self, msg: IotlbMsg) -> bool:
        # No need_reply: the answer to a miss is the UPDATE on the main socket.
        channel = self.backend_channel
        return channel is not None and channel.send(BackendRequest.VHOST_USER_BACKEND_IOTLB_MSG, msg)

    def _ring_translated(self, vring: Vring) -> bool:
        """Whether every ring part translates; sends the misses of all parts at once."""
        pending = False
        for start, size, access in vring.parts():
            try:
                self.dma_memory.check_range(start, size, access)
            except TranslationPending:
                pending = True
        return not pending

    def _ring_ranges(self, vring: Vring) -> list[tuple[int, int]]:
        """IOVA ranges ``(start, end)`` of the ring parts of ``vring`` if its device queue runs."""
        if self.device.queue(vring.index) is None or vring.addr is None:
            return []
        return [(start, start + size) for start, size, _ in vring.parts()]

    def _running_ring_ranges(self) -> list[tuple[int, int]]:
        return [r for vring in self.rings for r in self._ring_ranges(vring)]

    def touching(self, iova: int, size: int) -> list[Vring]:
        """The running rings with a part in IOVA range ``[iova, iova+size)``."""
        end = iova + size
        return [v for v in self.rings if any(start < end and iova < stop for start, stop in self._ring_ranges(v))]

    def suspend(self, vring: Vring) -> None:
        """Stop the device queue of ``vring`` (its ring pages are invalidated); the next kick resumes it."""
        self._save_base(vring)
        vring.awaiting_translation = True
        log.info("%s: vring %d suspended: its ring pages were invalidated", self.label, vring.index)

    def _resume(self, vring: Vring) -> None:
        """Start the device queue of a started ring that waited for translations, then serve it."""
        try:
            running = self._start_device_queue(vring)
        except IovirtError as exc:
            # No request to refuse here: the driver gave a ring the device cannot use.
            vring.awaiting_translation = False
            self.device.fail(exc)
            return
        if running:
            self.device.kick(vring.index)

    def _translations_arrived(self) -> None:
        """An UPDATE answered a miss: serve again every ring that may have waited for it."""
        for vring in self.rings:
            if not vring.started:
                continue
            if vring.awaiting_translation or vring.awaiting_log:
                self._resume(vring)
            else:
                self.device.kick(vring.index)

    # -- dirty logging (vhost-user.rst "Migration") -------------------------------------
    def set_logging(self, log_all: bool, dirty_log: DirtyLog | None) -> None:
        """Log (or stop logging) the device's writes from now on; rings waiting for a log start."""
        self.log_all = log_all
        self.dirty_log = dirty_log
        for vring in self.rings:
            queue = self.device.queue(vring.index)
            if queue is not None:
                if log_all and dirty_log is None:
                    self._save_base(vring)  # no log to write in: the ring waits for one
                    vring.awaiting_log = True
                    log.warning("%s: vring %d waits: VHOST_F_LOG_ALL is on and there is no log (SET_LOG_BASE) "
                                "to log its writes in", self.label, vring.index)
                else:
                    self._install_log(vring, queue)
            elif vring.started and vring.awaiting_log and dirty_log is not None:
                self._resume(vring)

    def _install_log(self, vring: Vring, queue: SplitQueue) -> None:
        """Give a running queue the log (or none), and its used ring's guest-physical ranges."""
        ring = ring_of(queue)
        if not self.log_all or self.dirty_log is None:
            ring.set_dirty_log(None)  # type: ignore[attr-defined]
            return
        used: list[tuple[int, int]] = []
        addr = vring.addr
        if addr is not None and addr.flags >> VHOST_VRING_F_LOG & 1 and vring.packed:
            used = self._packed_log_ranges(vring)
        elif addr is not None and addr.flags >> VHOST_VRING_F_LOG & 1:
            size = used_ring_size(vring.num)
            try:
                if self.iotlb is None:
                    self.table.memory.check_range(addr.log_guest_addr, size, Access.WRITE)
                    used = [(addr.log_guest_addr, size)]
                else:
                    # With an IOMMU log_guest_addr is an IOVA, as the ring addresses (DPDK and
                    # Linux's vhost translate it): log the guest-physical pages behind it.
                    used = self.dma_memory.translate(addr.log_guest_addr, size, Access.WRITE)
            except GuestMemoryError as exc:
                raise VringError(f"vring {vring.index}: the used ring's log_guest_addr {addr.log_guest_addr:#x} "
                                 f"is not guest memory: {exc}") from exc
        ring.set_dirty_log(self.dirty_log, used)  # type: ignore[attr-defined]

    def _packed_log_ranges(self, vring: Vring) -> list[tuple[int, int]]:
        """Guest-physical ranges a packed ring's device writes land in: the Descriptor Ring and the Device area.

        A packed ring has no used ring for ``log_guest_addr`` to name: the
        device writes used descriptors into the Descriptor Ring (2.8.6), so
        both written parts are logged where the ring addresses put them (as
        DPDK logs a packed ring's descriptor writes).
        """
        desc, _, device = self.placement(vring)
        ranges: list[tuple[int, int]] = []
        for start, size in ((desc, VIRTQ_DESC_SIZE * vring.num), (device, PACKED_EVENT_SIZE)):
            try:
                ranges += self.dma_memory.translate(start, size, Access.WRITE)
            except GuestMemoryError as exc:
                raise VringError(
                    f"vring {vring.index}: packed ring part {start:#x} is not guest memory: {exc}"
                ) from exc
        return ranges


class CallNotifier:
    """A ring's used-buffer notification: add 1 to its call eventfd (SET_VRING_CALL), counted in ``calls``.

    :attr:`eventfd` and :meth:`count` let a kick job's loop write the
    eventfd itself and count its writes later (:mod:`iovirt.vhost_user.kickloop`).
    """

    __slots__ = ("_vrings", "_vring", "_device", "_counters")

    def __init__(self, vrings: Vrings, vring: Vring) -> None:
        self._vrings = vrings
        self._vring = vring
        self._device = vrings.device.device
        self._counters = self._device.queue_stats[vring.index]

    @property
    def eventfd(self) -> int | None:
        """The call eventfd now, or None."""
        return self._vring.call_fd

    def count(self, n: int) -> None:
        """Count ``n`` notifications written to :attr:`eventfd` by someone else."""
        if self._device.counting:
            self._counters["calls"] += n

    def __call__(self) -> None:
        fd = self._vring.call_fd
        if fd is not None:
            self.count(1)
            self._vrings._signal(self._vring, fd, "call")


def _fenced(
    wrap: Callable[[SplitQueue], SplitQueue] | None, iotlb: DeviceIotlb
) -> Callable[[SplitQueue], SplitQueue]:
    """``wrap`` (if any), then a :class:`CompletionFence` outside it: completions make ``iotlb`` forget buffers."""

    def fence(queue: SplitQueue) -> SplitQueue:
        inner = queue if wrap is None else wrap(queue)
        return cast(SplitQueue, CompletionFence(inner, iotlb.forget_unpinned))

    return fence


def _check_fits_inflight(vring: Vring, num: int, region: QueueRegion | None) -> None:
    """A ring tracked in an inflight region may not have more descriptors than the region has entries.

    vhost-user.rst "Inflight I/O tracking": ``desc_num`` entries per queue,
    indexed by head; a larger ring's heads would land past them.
    """
    if region is not None and num > region.queue_size:
        raise VringError(
            f"vring {vring.index} of {num} descriptors does not fit the inflight region's "
            f"queue_size {region.queue_size}"
        )


def _check_packed_base(index: int, base: int, num: int) -> None:
    """A packed ring's SET_VRING_BASE: two 15-bit slots below the ring size, each with its wrap counter.

    ``num`` 0 (SET_VRING_NUM not sent yet): checked again when the ring starts.
    """
    if not 0 <= base <= 0xFFFFFFFF:
        raise VringError(f"packed ring base {base:#x} is not 32 bits")
    for name, pos in (("avail", base & 0xFFFF), ("used", base >> 16)):
        slot = pos & ~PACKED_WRAP_BIT
        if num and slot >= num:
            raise VringError(f"vring {index}: packed ring base {base:#x}: {name} index {slot} is not below "
                             f"the ring size {num}")


def _packed_positions(base: int) -> str:
    """A packed ring's base, for log lines."""
    avail, used = base & 0xFFFF, base >> 16
    return (f"avail index {avail & ~PACKED_WRAP_BIT} wrap {avail >> 15}, "
            f"used index {used & ~PACKED_WRAP_BIT} wrap {used >> 15}")


def take_eventfd(fd: int) -> None:
    """Check that ``fd`` is an eventfd (as the kernel's vhost demands) and make it non-blocking.

    A pipe or a file would spin the data plane (a hung-up pipe is always
    readable) or block it (a full pipe).  The front-end owns the other end of
    the file description: a blocking eventfd it fills or drains itself would
    block the data plane, which serves every device of the process.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise VringError(f"fd {fd} is not usable: {exc}") from exc
    if target != "anon_inode:[eventfd]":
        raise VringError(f"fd {fd} is {target}, not an eventfd")
    os.set_blocking(fd, False)
