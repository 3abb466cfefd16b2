"""Validation of a split ring's size and addresses, shared by both queue implementations."""

from __future__ import annotations

from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.virtio.defs import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    VIRTQ_MAX_SIZE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from iovirt.virtio.errors import QueueConfigError


def check_layout(
    memory: GuestMemory, index: int, size: int, desc_addr: int, avail_addr: int, used_addr: int
) -> None:
    """Raise :class:`QueueConfigError` unless the ring is usable (virtio 2.7).

    Queue Size must be a power of 2 no larger than 32768; the descriptor
    table 16-byte aligned, the avail ring 2-byte and the used ring 4-byte
    aligned; each part entirely inside guest memory.
    """
    if size <= 0 or size > VIRTQ_MAX_SIZE or size & (size - 1):
        raise QueueConfigError(f"Queue Size {size} is not a power of 2 in [1, {VIRTQ_MAX_SIZE}]", index)
    for name, addr, align, length, access in (
        ("descriptor table", desc_addr, DESC_ALIGN, desc_table_size(size), Access.READ),
        ("avail ring", avail_addr, AVAIL_ALIGN, avail_ring_size(size), Access.READ),
        ("used ring", used_addr, USED_ALIGN, used_ring_size(size), Access.READ | Access.WRITE),
    ):
        if addr % align:
            raise QueueConfigError(f"{name} address {addr:#x} is not {align}-byte aligned", index)
        try:
            memory.check_range(addr, length, access)
        except GuestMemoryError as exc:
            raise QueueConfigError(f"{name} [{addr:#x}, +{length:#x}) is not in guest memory: {exc}", index) from exc
