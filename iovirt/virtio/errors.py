"""Errors of the virtqueue layer.

Every error caused by what a driver put in guest memory carries the queue
index and, where there is one, the descriptor index and the chain head, so
that a device can log it once with context and drop the chain or set
``DEVICE_NEEDS_RESET`` (virtio 2.1.2).
"""

from __future__ import annotations

from iovirt.errors import IovirtError


class VirtqueueError(IovirtError):
    """A virtqueue rule broken by the driver or by a caller.

    Attributes: ``queue`` (queue index), ``desc`` (descriptor index or
    ``None``), ``head`` (chain head or ``None``).
    """

    def __init__(self, message: str, queue: int, desc: int | None = None, head: int | None = None) -> None:
        where = f"queue {queue}"
        if head is not None:
            where += f", chain head {head}"
        if desc is not None:
            where += f", desc {desc}"
        super().__init__(f"{where}: {message}")
        self.queue = queue
        self.desc = desc
        self.head = head


class QueueConfigError(VirtqueueError):
    """The queue's size or ring addresses are invalid (2.7: power of two, alignment, in memory)."""


class QueueStateError(VirtqueueError):
    """Saved queue state is inconsistent and cannot be restored."""


class DescIndexError(VirtqueueError):
    """A descriptor index (head or ``next``) is not below the table's size."""


class DescLoopError(VirtqueueError):
    """Following ``next`` revisits a descriptor: the chain loops."""


class ChainTooLongError(VirtqueueError):
    """A chain is longer than the Queue Size (2.7.5.3.1)."""


class NestedIndirectError(VirtqueueError):
    """``VIRTQ_DESC_F_INDIRECT`` inside an indirect table (2.7.5.3.1)."""


class IndirectTableError(VirtqueueError):
    """An indirect table whose length is zero or not a multiple of 16, or that has NEXT set."""


class DescBufferError(VirtqueueError):
    """A buffer lies (partly) outside guest memory or wraps 2^64."""

    def __init__(self, message: str, queue: int, desc: int | None, head: int | None, addr: int, length: int) -> None:
        super().__init__(f"{message} (buffer [{addr:#x}, +{length:#x}))", queue, desc, head)
        self.addr = addr
        self.length = length


class DescOrderError(VirtqueueError):
    """A device-readable descriptor follows a device-writable one (2.7.4.2)."""


class AvailIndexError(VirtqueueError):
    """The avail index ran ahead of the last seen one by more than the Queue Size."""


class UsedRingError(VirtqueueError):
    """A caller pushed an impossible used entry (head out of range, more than was popped)."""


class UsedOrderError(UsedRingError):
    """With VIRTIO_F_IN_ORDER, a used entry for a chain other than the oldest in flight (2.7.9, 2.8.8).

    ``head`` is the chain pushed, ``expected`` the one the device must use next.
    """

    def __init__(self, message: str, queue: int, head: int, expected: int) -> None:
        super().__init__(message, queue, head=head)
        self.expected = expected
