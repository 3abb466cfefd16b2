"""What both split-queue twins check, and every error they raise, written once.

``_queue_py.py`` and ``_queue_c.pyx`` test the ring rules (virtio 1.2
section 2.7) on their own hot paths, but build each error with one of the
functions here, so the type, the text and the attributes cannot differ
between them.  Checks off the hot path (restoring saved state, the ring
parts' placement, rewinding) live here whole.
"""

from __future__ import annotations

from iovirt.memory import Access, GuestMemory
from iovirt.virtio.defs import VIRTQ_DESC_SIZE, avail_ring_size, desc_table_size, used_ring_size
from iovirt.virtio.errors import (
    AvailIndexError,
    ChainTooLongError,
    DescBufferError,
    DescIndexError,
    DescLoopError,
    DescOrderError,
    IndirectTableError,
    NestedIndirectError,
    QueueConfigError,
    QueueStateError,
    UsedOrderError,
    UsedRingError,
)
from iovirt.virtio.state import QueueState

#: The used ring's ``len`` is an le32 (2.7.8).
USED_LEN_MAX = 0xFFFFFFFF


# -- restore and setup ---------------------------------------------------------------
def check_state(state: QueueState) -> None:
    """Raise :class:`QueueStateError` unless saved indexes can be resumed (untrusted input)."""
    for name in ("last_avail_idx", "used_idx"):
        value = getattr(state, name)
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise QueueStateError(f"{name} {value!r} is not a 16-bit index", state.index)
    if ((state.last_avail_idx - state.used_idx) & 0xFFFF) > state.size:
        raise QueueStateError(
            f"last_avail_idx {state.last_avail_idx} is more than Queue Size {state.size} "
            f"ahead of used idx {state.used_idx}",
            state.index,
        )


def ring_parts(size: int, desc_addr: int, avail_addr: int, used_addr: int) -> tuple[tuple[int, int], ...]:
    """``(addr, length)`` of the descriptor table, the avail ring and the used ring."""
    return (
        (desc_addr, desc_table_size(size)),
        (avail_addr, avail_ring_size(size)),
        (used_addr, used_ring_size(size)),
    )


def ring_part_gpa(memory: GuestMemory, index: int, addr: int, length: int) -> int:
    """The guest-physical start of a ring part, which must be one run in one region.

    The accelerated queue keeps one host pointer per part, so both twins
    refuse a part that a translator scatters or that straddles regions.
    Call after :func:`iovirt.virtio.layout.check_layout`.
    """
    pieces = memory.translate(addr, length, Access.READ)
    if len(pieces) != 1:
        raise QueueConfigError(
            f"ring part [{addr:#x}, +{length:#x}) is not contiguous in one guest memory region", index
        )
    return pieces[0][0]


def released(index: int) -> QueueStateError:
    """The queue was released (its device stopped) and used again."""
    return QueueStateError("queue was released", index)


# -- avail side ------------------------------------------------------------------------
def avail_index(index: int, count: int, last_avail_idx: int, size: int) -> AvailIndexError:
    """The avail idx ran more than Queue Size entries ahead (a broken or malicious driver)."""
    return AvailIndexError(
        f"avail idx moved {count} entries past last_avail_idx {last_avail_idx}, more than Queue Size {size}",
        index,
    )


def head_index(index: int, head: int, size: int) -> DescIndexError:
    """An avail ring entry names a descriptor past the table (2.7.6)."""
    return DescIndexError(f"head {head} >= Queue Size {size}", index, head, head)


def next_index(index: int, desc: int, head: int, nxt: int, table_len: int) -> DescIndexError:
    """A ``next`` past the table it indexes (2.7.5)."""
    return DescIndexError(f"next {nxt} >= table size {table_len}", index, desc, head)


def loop(index: int, desc: int, head: int, table_len: int) -> DescLoopError:
    """Following ``next`` visited more descriptors than the table has."""
    return DescLoopError(f"chain visits more than {table_len} descriptors: next loop", index, desc, head)


def too_long(index: int, desc: int, head: int, count: int, size: int) -> ChainTooLongError:
    """A chain of more than Queue Size descriptors (2.7.5.3.1)."""
    return ChainTooLongError(f"chain of {count} descriptors exceeds Queue Size {size}", index, desc, head)


def nested_indirect(index: int, desc: int, head: int) -> NestedIndirectError:
    """``VIRTQ_DESC_F_INDIRECT`` inside an indirect table (2.7.5.3.1)."""
    return NestedIndirectError("VIRTQ_DESC_F_INDIRECT inside an indirect table", index, desc, head)


def indirect_next(index: int, desc: int, head: int) -> IndirectTableError:
    """An indirect descriptor with NEXT set (2.7.5.3.1)."""
    return IndirectTableError("indirect descriptor has VIRTQ_DESC_F_NEXT set", index, desc, head)


def indirect_length(index: int, desc: int, head: int, length: int) -> IndirectTableError:
    """An indirect table that holds no whole descriptor (2.7.5.3.1)."""
    return IndirectTableError(
        f"indirect table length {length} is zero or not a multiple of {VIRTQ_DESC_SIZE}", index, desc, head
    )


def order(index: int, desc: int, head: int) -> DescOrderError:
    """A device-readable descriptor after a device-writable one (2.7.4.2)."""
    return DescOrderError("device-readable descriptor after a device-writable one", index, desc, head)


def buffer_wraps(index: int, desc: int, head: int, addr: int, length: int) -> DescBufferError:
    """A buffer that runs past 2^64."""
    return DescBufferError("buffer wraps past 2^64", index, desc, head, addr, length)


def buffer_outside(
    index: int, desc: int, head: int, addr: int, length: int, cause: Exception
) -> DescBufferError:
    """A buffer the memory map (or the IOMMU) refuses for the access it needs; ``cause`` says why."""
    return DescBufferError(f"buffer outside guest memory: {cause}", index, desc, head, addr, length)


def table_unreadable(index: int, desc: int, head: int, table: int, cause: Exception) -> DescBufferError:
    """A descriptor of ``table`` that cannot be read; ``cause`` says why."""
    return DescBufferError(
        f"descriptor table unreadable: {cause}", index, desc, head, table + VIRTQ_DESC_SIZE * desc, VIRTQ_DESC_SIZE
    )


# -- used side -------------------------------------------------------------------------
def check_rewind(index: int, count: int, in_flight: int) -> None:
    """Raise :class:`UsedRingError` unless ``count`` popped chains can be given back."""
    if not 0 <= count <= in_flight:
        raise UsedRingError(f"cannot rewind {count} chains, {in_flight} in flight", index)


def used_id(index: int, head: int, size: int) -> UsedRingError:
    """A used entry for a descriptor past the table."""
    return UsedRingError(f"used id {head} is not a descriptor of Queue Size {size}", index, head=head)


def used_len(index: int, head: int, length: int) -> UsedRingError:
    """A used length that the le32 ``len`` field cannot hold."""
    return UsedRingError(f"used len {length} is not in [0, {USED_LEN_MAX:#x}]", index, head=head)


def batch_used_len(length: int) -> ValueError:
    """``ChainBatch.set_used_len`` given a length the le32 ``len`` field cannot hold."""
    return ValueError(f"used len {length} is not in [0, {USED_LEN_MAX:#x}]")


def too_many_used(index: int, count: int, in_flight: int) -> UsedRingError:
    """More used entries than chains popped and not yet returned."""
    return UsedRingError(f"{count} used entries but {in_flight} chains in flight", index)


def used_order(index: int, head: int, expected: int) -> UsedOrderError:
    """VIRTIO_F_IN_ORDER: the device uses buffers in the order they were made available (2.7.9, 2.8.8)."""
    return UsedOrderError(
        f"used id {head} out of order: with VIRTIO_F_IN_ORDER the oldest chain in flight, {expected}, is next",
        index, head, expected,
    )


def in_order_overrun(index: int, in_flight: int, count: int, size: int) -> AvailIndexError:
    """VIRTIO_F_IN_ORDER: more chains in flight than Queue Size (the driver reused descriptors it has not got back)."""
    return AvailIndexError(
        f"{in_flight} chains in flight and {count} more available: more than Queue Size {size} "
        "with VIRTIO_F_IN_ORDER",
        index,
    )
