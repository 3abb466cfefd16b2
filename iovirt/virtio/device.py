"""The transport-independent part of a virtio device (virtio 1.2 sections 2 and 3).

A :class:`VirtioDevice` owns its feature bits, its device-specific
configuration space and what it does with the chains of each queue.  It does
not know how it is reached: the vhost-user backend and the in-process
virtio-pci transport both hand it :class:`~iovirt.virtio.queue.SplitQueue`
objects (vhost-user: packed queues with the same API when the front-end
negotiated VIRTIO_F_RING_PACKED) and a per-queue ``notify`` callable (the used-buffer notification),
and call :meth:`VirtioDevice.kick` when the driver notifies a queue.

Bad input from the driver ends in :meth:`VirtioDevice.fail`: it is logged
once with context and the device marks itself as needing a reset (2.1.2),
stops processing, and the transport reports it (``DEVICE_NEEDS_RESET`` or a
closed connection).  It never escapes as an exception to the transport.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable, ClassVar, cast

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1
from iovirt.virtio.kickjob import KickJob
from iovirt.virtio.queue import SplitQueue, queue_class
from iovirt.virtio.state import QueueState

Notify = Callable[[], None]


# Feature bits every iovirt device offers (6 Reserved Feature Bits).
COMMON_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_EVENT_IDX) | (1 << VIRTIO_F_INDIRECT_DESC)


class FeatureError(IovirtError):
    """The driver accepted feature bits the device did not offer (3.1.1)."""

    def __init__(self, offered: int, accepted: int) -> None:
        extra = accepted & ~offered
        super().__init__(f"driver accepted features {extra:#x} that were not offered (offered {offered:#x})")
        self.offered = offered
        self.accepted = accepted


class VirtioDevice:
    """Base class: features, config space, queues, kicks and reset.

    Subclasses set ``device_id`` and ``name``, implement
    :meth:`device_features`, :meth:`config_space` and :meth:`process_queue`,
    and may override ``_reset`` (the reset template method calls it; do not
    override :meth:`reset`).
    """

    device_id: ClassVar[int] = 0
    name: ClassVar[str] = "virtio"

    def __init__(self, num_queues: int, queue_max_size: int = 1024, label: str = "") -> None:
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self.label = label or self.name
        self.log = logging.getLogger(f"iovirt.{self.name}")
        self.queues: list[SplitQueue | None] = [None] * num_queues
        self.notifiers: list[Notify | None] = [None] * num_queues
        self.enabled: list[bool] = [False] * num_queues
        self.driver_features = 0
        self.memory: GuestMemory | None = None
        self.needs_reset = False
        self.on_needs_reset: Callable[["VirtioDevice", Exception], None] | None = None
        # The transport's timer, if it has one: run a callable after a delay (seconds) on the thread that
        # serves the queues (a device holding requests back serves them again when it may).
        self.call_later: Callable[[float, Callable[[], None]], None] | None = None
        self.requeue: Callable[[int], None] | None = None
        """Set by a transport: serve queue ``index`` again soon, as a kick would, after what else is waiting."""
        # Per-queue counters (frames/requests, bytes, drops, kicks, calls), counted per batch;
        # ``counting`` off skips the data-path counters (the benchmark measures their cost with it).
        self.queue_stats: list[collections.Counter[str]] = [collections.Counter() for _ in range(num_queues)]
        self.counting = True
        self.wake_fd: int | None = None
        """An eventfd the device signals when it has work no driver notification brings (events injected
        from another thread, a source that may have data again): the transport then kicks every running
        queue from its own thread.  ``None``: the device only works on kicks."""

    # -- features and config (3.1, 4.x device configuration layout) -------------
    def device_features(self) -> int:
        """Feature bits the device offers."""
        raise NotImplementedError

    def config_space(self) -> bytes:
        """The device-specific configuration structure, as the driver reads it."""
        raise NotImplementedError

    def set_features(self, features: int) -> None:
        """Accept the driver's feature bits; raises :class:`FeatureError` for unoffered bits."""
        offered = self.device_features()
        if features & ~offered:
            raise FeatureError(offered, features)
        self.driver_features = features

    def has_feature(self, bit: int) -> bool:
        """Whether feature ``bit`` was negotiated."""
        return bool(self.driver_features >> bit & 1)

    def read_config(self, offset: int, size: int) -> bytes:
        """Bytes of the config space; bytes beyond its end read as zero."""
        data = self.config_space()[offset : offset + size]
        return data + bytes(size - len(data))

    def config_fields(self) -> tuple[tuple[int, int], ...]:
        """``(offset, size)`` of each field of the config space, for accesses that must hit one field; () if unknown."""
        return ()

    def write_config(self, offset: int, data: bytes) -> bool:
        """A driver write to the config space; returns False when refused (read-only field)."""
        self.log.warning("%s: config write of %d bytes at %#x refused: read-only", self.label, len(data), offset)
        return False

    # -- queues --------------------------------------------------------------------
    def start_queue(
        self,
        index: int,
        memory: GuestMemory,
        state: QueueState,
        notify: Notify,
        wrap: Callable[[SplitQueue], SplitQueue] | None = None,
        *,
        packed: bool = False,
        in_order: bool = False,
    ) -> SplitQueue:
        """Start serving queue ``index`` from ``state``; ``notify`` signals used buffers.

        ``wrap``, if given, puts a wrapper with the queue's API around the
        queue (a transport's bookkeeping, e.g. vhost-user inflight tracking).
        ``packed``: the transport negotiated VIRTIO_F_RING_PACKED, the ring is
        a packed one (2.8; ``state`` positions carry wrap counters in bit 15).
        ``in_order``: the transport negotiated VIRTIO_F_IN_ORDER (2.7.9, 2.8.8);
        the queue then refuses used entries out of pop order.
        """
        state = QueueState(**{
            **state.to_dict(), "index": index, "event_idx": self.has_feature(VIRTIO_F_EVENT_IDX), "in_order": in_order,
        })
        # A packed queue has the split queue's API (iovirt/virtio/queue.py): devices cannot tell.
        queue = cast(SplitQueue, queue_class(packed).from_state(memory, state))
        if wrap is not None:
            queue = wrap(queue)
        self.memory = memory
        self.queues[index] = queue
        self.notifiers[index] = notify
        return queue

    def stop_queue(self, index: int) -> QueueState | None:
        """Stop serving queue ``index``; returns its state (where to resume)."""
        queue = self.queues[index]
        self.queues[index] = None
        self.notifiers[index] = None
        if queue is None:
            return None
        state = queue.state()
        queue.release()
        return state

    def set_queue_enabled(self, index: int, enabled: bool) -> None:
        """Enable or disable a queue (vhost-user SET_VRING_ENABLE / queue_enable)."""
        self.enabled[index] = enabled

    def kick(self, index: int) -> None:
        """The driver notified queue ``index``: process what is available."""
        queue = self.queues[index]
        if queue is None or self.needs_reset:
            return
        try:
            self.process_queue(index, queue)
        except IovirtError as exc:
            self.fail(exc)

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Handle the available chains of one queue."""
        raise NotImplementedError

    def kick_job(self, index: int) -> KickJob | None:
        """Queue ``index``'s kicks as a kick job a transport may run in C (``iovirt/virtio/kickjob.py``), if it can now.

        None (this default): every kick goes to :meth:`kick`.
        """
        return None

    def signal(self, index: int) -> None:
        """Send the used-buffer notification of queue ``index`` if the driver wants it."""
        queue = self.queues[index]
        notify = self.notifiers[index]
        if queue is not None and notify is not None and queue.need_notify():
            notify()

    def fail(self, error: Exception) -> None:
        """Bad input from the driver: log once, stop, and ask for a reset (2.1.2)."""
        if not self.needs_reset:
            self.log.error("%s: %s; device needs reset", self.label, error)
        self.needs_reset = True
        if self.on_needs_reset is not None:
            self.on_needs_reset(self, error)

    # -- reset (template method) -------------------------------------------------------
    def reset(self) -> None:
        """Return to the initial state (2.4): queues stopped, features cleared."""
        for index in range(self.num_queues):
            self.stop_queue(index)
        self.enabled = [False] * self.num_queues
        self.driver_features = 0
        self.needs_reset = False
        self._reset()

    def _reset(self) -> None:
        """Device-specific reset work."""
