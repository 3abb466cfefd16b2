"""virtio-net device statistics through the control queue (virtio 1.4 5.1.9.5.11, VIRTIO_NET_F_DEVICE_STATS).

``VIRTIO_NET_CTRL_STATS_QUERY`` answers ``struct virtio_net_stats_capabilities`` (one le64 of the
types supported: here the control queue's, and the basic receive and transmit ones);
``VIRTIO_NET_CTRL_STATS_GET`` takes ``struct virtio_net_ctrl_queue_stats`` (entries of vq_index and a
types bitmap) and answers, for each entry and each type in it from the lowest bit, a
``virtio_net_stats_reply_hdr`` (type, vq_index, the entry's size in bytes) and its le64 counters.  One
bad entry (a queue out of range, an unknown type, a type not for that queue) fails the whole
command (5.1.9.5.11.12).  Counters are reported modulo 2**64: they wrap to zero (5.1.9.5.11.12).

Where the counts come from: the device's per-queue counters (``queue_stats``: frames, bytes, drops,
malformed transmit chains, driver notifications and interrupts).  Frames dropped for want of receive
buffers are counted device-wide (no queue is chosen for them yet), so ``rx_drop_overruns`` stays 0
and ``rx_drops`` counts the drops of the queue's own buffers (too small, a bad checksum offset).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from iovirt.virtio.net.defs import (
    VIRTIO_NET_CTRL_QUEUE_STATS,
    VIRTIO_NET_STATS_REPLY_HDR,
    VIRTIO_NET_STATS_TYPE_CVQ,
    VIRTIO_NET_STATS_TYPE_REPLY_CVQ,
    VIRTIO_NET_STATS_TYPE_REPLY_RX_BASIC,
    VIRTIO_NET_STATS_TYPE_REPLY_TX_BASIC,
    VIRTIO_NET_STATS_TYPE_RX_BASIC,
    VIRTIO_NET_STATS_TYPE_TX_BASIC,
)

if TYPE_CHECKING:
    from iovirt.virtio.net.device import VirtioNet

SUPPORTED_STATS_TYPES = VIRTIO_NET_STATS_TYPE_CVQ | VIRTIO_NET_STATS_TYPE_RX_BASIC | VIRTIO_NET_STATS_TYPE_TX_BASIC
U64_MASK = (1 << 64) - 1

# The le64 counters of each reply, in the order of its struct (the names of queue_stats keys).
RX_BASIC = ("notifications", "frames", "bytes", "interrupts", "dropped", "overruns")
TX_BASIC = ("notifications", "frames", "bytes", "interrupts", "dropped", "errors")

_LE64 = struct.Struct("<Q")


class StatsRequestError(ValueError):
    """A ``virtio_net_ctrl_queue_stats`` the device refuses; the text says which entry and why."""


def capabilities() -> bytes:
    """``struct virtio_net_stats_capabilities``."""
    return _LE64.pack(SUPPORTED_STATS_TYPES)


def _valid_types(net: "VirtioNet", vq_index: int) -> int:
    """The types that apply to queue ``vq_index``: its direction's basic counters, or the control queue's."""
    if vq_index == 2 * net.queue_pairs:
        return VIRTIO_NET_STATS_TYPE_CVQ
    return VIRTIO_NET_STATS_TYPE_TX_BASIC if vq_index % 2 else VIRTIO_NET_STATS_TYPE_RX_BASIC


def parse_request(net: "VirtioNet", payload: bytes) -> list[tuple[int, int]]:
    """The ``(vq_index, types_bitmap)`` entries of a STATS_GET; :class:`StatsRequestError` if any is bad."""
    size = VIRTIO_NET_CTRL_QUEUE_STATS.size
    if len(payload) % size:
        raise StatsRequestError(f"{len(payload)} bytes of virtio_net_ctrl_queue_stats, not a multiple of {size}")
    entries = [VIRTIO_NET_CTRL_QUEUE_STATS.unpack_from(payload, pos) for pos in range(0, len(payload), size)]
    for n, (vq_index, types) in enumerate(entries):
        if vq_index >= net.num_queues:
            raise StatsRequestError(f"entry {n}: vq_index {vq_index} beyond the {net.num_queues} queues")
        if types & ~SUPPORTED_STATS_TYPES:
            raise StatsRequestError(f"entry {n}: unknown types {types & ~SUPPORTED_STATS_TYPES:#x}")
        if types & ~_valid_types(net, vq_index):
            raise StatsRequestError(f"entry {n}: types {types:#x} not valid for queue {vq_index}")
    return entries


def reply(net: "VirtioNet", entries: list[tuple[int, int]], commands: int, ok: int) -> bytes:
    """The statistics asked for; ``commands`` and ``ok`` are the control queue's counts (this command included)."""
    out = bytearray()
    for vq_index, types in entries:
        for reply_type in (VIRTIO_NET_STATS_TYPE_REPLY_RX_BASIC, VIRTIO_NET_STATS_TYPE_REPLY_TX_BASIC,
                           VIRTIO_NET_STATS_TYPE_REPLY_CVQ):
            if not types >> reply_type & 1:
                continue
            if reply_type == VIRTIO_NET_STATS_TYPE_REPLY_CVQ:
                values = [commands, ok]
            else:
                counters = net.queue_stats[vq_index]
                names = RX_BASIC if reply_type == VIRTIO_NET_STATS_TYPE_REPLY_RX_BASIC else TX_BASIC
                values = [counters[name] for name in names]
            size = VIRTIO_NET_STATS_REPLY_HDR.size + _LE64.size * len(values)
            out += VIRTIO_NET_STATS_REPLY_HDR.pack(reply_type, vq_index, size)
            out += b"".join(_LE64.pack(v & U64_MASK) for v in values)
    return bytes(out)
