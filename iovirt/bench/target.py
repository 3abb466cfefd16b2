"""The device behind a bench port: an in-process device, or any vhost-user back-end.

A target gives the bench what a guest driver has: guest memory with an
allocator, negotiated features, driver-side rings
(:class:`~iovirt.virtio.driver.DriverQueue`), a way to notify a queue and a
bounded wait for the device's used-buffer notification.  The bench code above
it is the same for both targets.

* :class:`InProcessTarget` runs a :class:`~iovirt.virtio.device.VirtioDevice`
  in the caller's thread: a kick processes the queue before it returns.
* :class:`VhostUserTarget` plays a VMM against a back-end's UNIX socket
  (:class:`~iovirt.vhost_user.driver.VhostUserDriver`: memfd memory shared
  with SET_MEM_TABLE, eventfd kicks and calls).  Whatever the back-end does
  (no answer, a closed socket, nonsense) ends in a :class:`TargetError`.
"""

from __future__ import annotations

import functools
import os
import select
import socket
from collections import Counter
from typing import Iterable, Protocol

from iovirt.errors import IovirtError
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.bench.errors import TargetError
from iovirt.vhost_user.driver import AnyDriverQueue, VhostUserDriver
from iovirt.vhost_user.messages import VHOST_USER_F_PROTOCOL_FEATURES
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.driver import DriverQueue

DEFAULT_MEMORY = 64 << 20
DEFAULT_TIMEOUT = 2.0
"""Seconds any single wait on a device may take unless told otherwise."""

_POLL_S = 0.1  # re-check the ring this often while waiting, in case a notification is lost
_TEARDOWN_S = 1.0  # bound on waiting for a back-end to drop a closed connection


class DriverTarget(Protocol):
    """What a bench port needs from the device it drives."""

    name: str
    memory: GuestMemory
    alloc: BumpAllocator
    offered: int
    """Virtio feature bits the device offered."""
    features: int
    """Virtio feature bits negotiated (offered and wanted)."""
    notifications: Counter[int]
    """Used-buffer notifications seen, by queue index."""

    def start_queues(self, indexes: Iterable[int], size: int) -> dict[int, AnyDriverQueue]:
        """Lay out rings for ``indexes`` and hand them to the device, enabled."""
        ...

    def kick(self, index: int) -> None:
        """Publish the queue's avail idx and notify the device if it asked for it (2.7.10)."""
        ...

    def notify(self, index: int) -> None:
        """Notify the device of queue ``index`` (the caller published the avail idx and checked it is wanted)."""
        ...

    def wait(self, index: int, timeout: float) -> bool:
        """Wait at most ``timeout`` s for a used-buffer notification on ``index``."""
        ...

    def close(self) -> None:
        """Let the device go."""
        ...


class InProcessTarget:
    """A device model in this process, driven synchronously.

    The device runs in the caller's thread: when :meth:`kick` returns, it has
    done all it will do, so :meth:`wait` never blocks.
    """

    def __init__(self, device: VirtioDevice, features: int, memory_size: int = DEFAULT_MEMORY) -> None:
        self.device = device
        self.name = f"in-process {device.label}"
        self.memory = GuestMemory.from_ranges([(0, memory_size)])
        self.alloc = BumpAllocator(0x1000, memory_size - 0x1000)
        self.offered = device.device_features()
        self.features = self.offered & features
        device.set_features(self.features)
        self.queues: dict[int, AnyDriverQueue] = {}
        self.notifications: Counter[int] = Counter()

    def start_queues(self, indexes: Iterable[int], size: int) -> dict[int, AnyDriverQueue]:
        """Build rings in this target's memory and start the device's queues on them."""
        event_idx = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        for index in indexes:
            queue = DriverQueue(self.memory, self.alloc, size, event_idx=event_idx, index=index)
            queue.set_interrupts(True)
            self.device.start_queue(index, self.memory, queue.state(), functools.partial(self._notify, index))
            self.device.set_queue_enabled(index, True)
            self.queues[index] = queue
        return {i: self.queues[i] for i in indexes}

    def _notify(self, index: int) -> None:
        self.notifications[index] += 1

    def kick(self, index: int) -> None:
        """Publish and run the device on the queue (if it did not suppress notifications)."""
        self._check_alive()
        if self.queues[index].publish():
            self.device.kick(index)

    def notify(self, index: int) -> None:
        """Run the device on the queue."""
        self._check_alive()
        self.device.kick(index)

    def wait(self, index: int, timeout: float) -> bool:  # noqa: ARG002 - nothing runs meanwhile
        """Nothing can change while the caller waits: report whether the device is still usable."""
        self._check_alive()
        return False

    def _check_alive(self) -> None:
        if self.device.needs_reset:
            raise TargetError(self.name, "the device set DEVICE_NEEDS_RESET (it rejected driver input; see its log)")

    def close(self) -> None:
        """Reset the device and free the memory."""
        self.device.reset()
        self.memory.close()


class VhostUserTarget:
    """Any vhost-user back-end, driven over its UNIX socket like a VMM would."""

    def __init__(
        self, socket_path: str, features: int, timeout: float = DEFAULT_TIMEOUT, memory_size: int = DEFAULT_MEMORY
    ) -> None:
        self.name = f"vhost-user back-end {socket_path}"
        self.timeout = timeout
        try:
            self.driver = VhostUserDriver(socket_path, memory_size=memory_size, features=features, timeout=timeout)
        except (IovirtError, OSError) as exc:
            raise TargetError(self.name, f"bring-up failed: {exc}") from exc
        self.memory = self.driver.memory
        self.alloc = self.driver.alloc
        self.offered = self.driver.offered & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.features = self.driver.features & ~(1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self.notifications: Counter[int] = Counter()

    def start_queues(self, indexes: Iterable[int], size: int) -> dict[int, AnyDriverQueue]:
        """SET_VRING_NUM/BASE/ADDR/CALL/KICK (and ENABLE) for each ring."""
        try:
            return self.driver.start_queues(list(indexes), size)  # ends with DRIVER_OK under F_STATUS
        except (IovirtError, OSError) as exc:
            raise TargetError(self.name, f"vring setup failed: {exc}") from exc

    def kick(self, index: int) -> None:
        """Publish, and write the kick eventfd if the back-end wants it."""
        self.driver.kick(index)

    def notify(self, index: int) -> None:
        """Write the kick eventfd."""
        self.driver.frontend.kick(index)

    def wait(self, index: int, timeout: float) -> bool:
        """Wait for the call eventfd; a closed or chattering socket raises :class:`TargetError`."""
        call_fd = self.driver.frontend.call_fds[index]
        sock = self.driver.frontend.sock
        readable, _, _ = select.select([call_fd, sock.fileno()], [], [], min(timeout, _POLL_S))
        if sock.fileno() in readable:
            self._check_socket(sock)
        if call_fd in readable:
            try:
                os.eventfd_read(call_fd)
            except BlockingIOError:
                return False
            self.notifications[index] += 1
            return True
        return False

    def _check_socket(self, sock: socket.socket) -> None:
        # Between requests the back-end has nothing to say on this socket
        # (its own requests go over the back-end channel), so a readable
        # socket is either a close or nonsense.
        try:
            data = sock.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            raise TargetError(self.name, f"connection failed: {exc}") from exc
        if not data:
            raise TargetError(self.name, "the back-end closed the connection")
        raise TargetError(self.name, f"unsolicited bytes on the front-end socket: {data[:16].hex()}...")

    def close(self) -> None:
        """Disconnect (the back-end stops the rings), wait (bounded) until it has dropped us, free the memory.

        A back-end may still be tearing the old device down when the next
        connection arrives (DPDK's vhost PMD then detaches the new device
        with the old one): half-close, and wait for the back-end's end of
        file before letting go.
        """
        try:
            self.driver.frontend.sock.shutdown(socket.SHUT_WR)
            self.driver.frontend.wait_closed(min(self.timeout, _TEARDOWN_S))
        except OSError:
            pass  # already closed by the back-end
        self.driver.close()
