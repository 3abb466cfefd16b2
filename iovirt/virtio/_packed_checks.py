"""What both packed-queue twins check, and every error they raise, written once.

``_packed_py.py`` and ``_packed_c.pyx`` test the packed ring's rules
(virtio 1.2 section 2.8) on their own hot paths, but build each error here
(or with the split ring's constructors in :mod:`iovirt.virtio._queue_checks`
where the rule is the same), so the type, the text and the attributes cannot
differ between them.

In a packed-ring error, ``head`` is the ring slot of the list's first
descriptor and ``desc`` the slot (or indirect-table index) of the offending
one: a broken list may have no readable Buffer ID.
"""

from __future__ import annotations

from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.virtio.defs import (
    DESC_ALIGN,
    PACKED_EVENT_ALIGN,
    PACKED_EVENT_SIZE,
    PACKED_WRAP_BIT,
    VIRTQ_DESC_SIZE,
    VIRTQ_MAX_SIZE,
)
from iovirt.virtio.errors import DescIndexError, IndirectTableError, QueueConfigError, QueueStateError, UsedRingError
from iovirt.virtio.state import QueueState


# -- restore and setup ---------------------------------------------------------------
def ring_parts(size: int, desc_addr: int, driver_addr: int, device_addr: int) -> tuple[tuple[int, int], ...]:
    """``(addr, length)`` of the Descriptor Ring, the Driver and the Device Event Suppression areas (2.8.13)."""
    return (
        (desc_addr, VIRTQ_DESC_SIZE * size),
        (driver_addr, PACKED_EVENT_SIZE),
        (device_addr, PACKED_EVENT_SIZE),
    )


def check_layout(memory: GuestMemory, index: int, size: int, desc_addr: int, driver_addr: int, device_addr: int) -> None:
    """Raise :class:`QueueConfigError` unless the packed ring is usable (2.8, 2.8.13).

    Queue Size need not be a power of 2 but is at most 2^15; the Descriptor
    Ring is 16-byte aligned, the event suppression areas 4-byte aligned;
    every part lies in guest memory, and the device writes the Descriptor
    Ring (used descriptors) and the Device area.
    """
    if not 0 < size <= VIRTQ_MAX_SIZE:
        raise QueueConfigError(f"Queue Size {size} is not in [1, {VIRTQ_MAX_SIZE}]", index)
    (desc, desc_len), (driver, _), (device, _) = ring_parts(size, desc_addr, driver_addr, device_addr)
    for name, addr, align, length, access in (
        ("descriptor ring", desc, DESC_ALIGN, desc_len, Access.READ | Access.WRITE),
        ("driver event suppression area", driver, PACKED_EVENT_ALIGN, PACKED_EVENT_SIZE, Access.READ),
        ("device event suppression area", device, PACKED_EVENT_ALIGN, PACKED_EVENT_SIZE, Access.READ | Access.WRITE),
    ):
        if addr % align:
            raise QueueConfigError(f"{name} address {addr:#x} is not {align}-byte aligned", index)
        try:
            memory.check_range(addr, length, access)
        except GuestMemoryError as exc:
            raise QueueConfigError(f"{name} [{addr:#x}, +{length:#x}) is not in guest memory: {exc}", index) from exc


def check_state(state: QueueState) -> None:
    """Raise :class:`QueueStateError` unless saved packed-ring positions can be resumed (untrusted input).

    ``last_avail_idx`` and ``used_idx`` hold a ring slot in bits 0-14 and
    its wrap counter in bit 15 (vhost-user.rst, VHOST_USER_SET_VRING_BASE
    for packed virtqueues).
    """
    for name in ("last_avail_idx", "used_idx"):
        value = getattr(state, name)
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise QueueStateError(f"{name} {value!r} is not a 16-bit index", state.index)
        if not isinstance(state.size, int) or value & ~PACKED_WRAP_BIT >= state.size:
            raise QueueStateError(
                f"{name} {value:#x}: slot {value & ~PACKED_WRAP_BIT} is not below Queue Size {state.size}",
                state.index,
            )


def saved_list(index: int, raw: bytes, size: int) -> bytes:
    """A resubmitted list's saved ring descriptors (untrusted: from a shared inflight region).

    Raises :class:`QueueStateError` unless it is 1 to Queue Size whole descriptors.
    """
    raw = bytes(raw)
    count, rest = divmod(len(raw), VIRTQ_DESC_SIZE)
    if rest or not 0 < count <= size:
        raise QueueStateError(f"a resubmitted list of {len(raw)} bytes is not 1 to {size} descriptors", index)
    return raw


# -- avail side ------------------------------------------------------------------------
def buffer_id(index: int, desc: int, head: int, buf_id: int, size: int) -> DescIndexError:
    """A Buffer ID this device cannot track: at most Queue Size buffers are in flight, named 0..size-1."""
    return DescIndexError(f"buffer id {buf_id} >= Queue Size {size}", index, desc, head)


def id_in_flight(index: int, desc: int, head: int, buf_id: int) -> DescIndexError:
    """A list made available with the Buffer ID of one the device still holds."""
    return DescIndexError(f"buffer id {buf_id} is already in flight", index, desc, head)


def indirect_in_chain(index: int, desc: int, head: int) -> IndirectTableError:
    """VIRTQ_DESC_F_INDIRECT on a descriptor of a list linked by VIRTQ_DESC_F_NEXT (2.8.20)."""
    return IndirectTableError("indirect descriptor inside a list linked by VIRTQ_DESC_F_NEXT", index, desc, head)


# -- used side -------------------------------------------------------------------------
def used_not_in_flight(index: int, buf_id: int) -> UsedRingError:
    """A used entry for a Buffer ID the device does not hold."""
    return UsedRingError(f"used id {buf_id} is not a buffer id in flight", index, head=buf_id)


def check_rewind(index: int, count: int, recent: int) -> None:
    """Raise :class:`UsedRingError` unless the last ``count`` popped lists can be given back.

    Only lists popped since the last push can: the rewound lists must be
    the ring's last ones and all still held, which a push could break.
    """
    if not 0 <= count <= recent:
        raise UsedRingError(f"cannot rewind {count} chains, {recent} popped since the last push", index)
