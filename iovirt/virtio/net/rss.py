"""Receive-side scaling (virtio 1.4 5.1.9.5.7, VIRTIO_NET_F_RSS) and the inner header hash (5.1.9.4.4,
VIRTIO_NET_F_HASH_TUNNEL), for the in-process device's control queue.

``VIRTIO_NET_CTRL_MQ_RSS_CONFIG`` carries ``struct virtio_net_rss_config``: the hash types enabled, the
indirection table (its mask, then mask + 1 receive queue ids, each bits 1..16 of a virtqueue index),
the queue for unclassified frames, ``max_tx_vq`` and the Toeplitz key.  A received frame's hash
(5.1.9.4.3: Toeplitz over the IPv4 source and destination addresses, then the TCP or UDP ports when
that hash type is enabled) masked indexes the table; a frame the device computes no hash for (not
IPv4, a fragment, or its hash type not enabled) goes to ``unclassified_queue``.  Only the IPv4 hash
types are supported (``supported_hash_types``).

With VIRTIO_NET_CTRL_HASH_TUNNEL_SET the driver enables encapsulation types (supported: IPIP and VXLAN):
a frame whose outer header is one of them is hashed on its inner IPv4 header (and ports); any other is
hashed on its outer header (5.1.9.4.4.4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iovirt.virtio.net.defs import (
    ETH_HLEN,
    ETH_P_IP,
    IPPROTO_IPIP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP,
    VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN,
    VIRTIO_NET_HASH_TYPE_IPv4,
    VIRTIO_NET_HASH_TYPE_TCPv4,
    VIRTIO_NET_HASH_TYPE_UDPv4,
    VXLAN_HLEN,
    VXLAN_PORT,
)

SUPPORTED_HASH_TYPES = VIRTIO_NET_HASH_TYPE_IPv4 | VIRTIO_NET_HASH_TYPE_TCPv4 | VIRTIO_NET_HASH_TYPE_UDPv4
RSS_MAX_KEY_SIZE = 40  # 5.1.4.1: at least 40 with VIRTIO_NET_F_RSS
RSS_MAX_INDIRECTION_TABLE_LENGTH = 128
IP_MF, IP_OFFSET = 0x2000, 0x1FFF  # RFC 791: more fragments, fragment offset
SUPPORTED_TUNNEL_TYPES = VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP | VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN

_HEAD = struct.Struct("<IHH")  # hash_types, indirection_table_mask, unclassified_queue
_TAIL = struct.Struct("<HB")  # max_tx_vq, hash_key_length


class RssConfigError(ValueError):
    """A ``virtio_net_rss_config`` the device refuses; the text says which field and why."""


def toeplitz(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of ``data`` under ``key`` (32 bits), as 5.1.9.4.3 defines it."""
    window = int.from_bytes(key[:4].ljust(4, b"\0"), "big")
    rest = key[4:]
    result = 0
    for n, byte in enumerate(data):
        next_byte = rest[n] if n < len(rest) else 0
        for bit in range(8):
            if byte & (0x80 >> bit):
                result ^= window
            window = (window << 1 | (next_byte >> (7 - bit) & 1)) & 0xFFFFFFFF
    return result


def inner_ipv4(frame: bytes, tunnel_types: int) -> bytes | None:
    """The inner IPv4 packet of a frame whose outer header is one of the enabled ``tunnel_types``, else ``None``."""
    if not tunnel_types or len(frame) < ETH_HLEN + 20 or int.from_bytes(frame[12:14], "big") != ETH_P_IP:
        return None
    ip = frame[ETH_HLEN:]
    ihl = (ip[0] & 0xF) * 4
    if int.from_bytes(ip[6:8], "big") & (IP_MF | IP_OFFSET):
        return None  # a fragment: no inner header to read
    if tunnel_types & VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP and ip[9] == IPPROTO_IPIP:
        return ip[ihl:]
    if (tunnel_types & VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN and ip[9] == IPPROTO_UDP
            and int.from_bytes(ip[ihl + 2 : ihl + 4], "big") == VXLAN_PORT):
        inner = ip[ihl + 8 + VXLAN_HLEN :]  # UDP header, VXLAN header, then an Ethernet frame
        if int.from_bytes(inner[12:14], "big") == ETH_P_IP:
            return inner[ETH_HLEN:]
    return None


def hash_input(frame: bytes, hash_types: int, tunnel_types: int = 0) -> bytes | None:
    """The bytes hashed for ``frame`` under the enabled ``hash_types`` (on the inner header when its outer one is
    of an enabled ``tunnel_types``), or ``None``: the device computes no hash."""
    inner = inner_ipv4(frame, tunnel_types)
    if inner is not None:
        return _ipv4_input(inner, hash_types)
    if len(frame) < ETH_HLEN + 20 or int.from_bytes(frame[12:14], "big") != ETH_P_IP:
        return None
    return _ipv4_input(frame[ETH_HLEN:], hash_types)


def _ipv4_input(ip: bytes, hash_types: int) -> bytes | None:
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 0xF) * 4
    addresses = ip[12:20]
    fragment = int.from_bytes(ip[6:8], "big") & (IP_MF | IP_OFFSET)
    proto = ip[9]
    ports_type = {IPPROTO_TCP: VIRTIO_NET_HASH_TYPE_TCPv4, IPPROTO_UDP: VIRTIO_NET_HASH_TYPE_UDPv4}.get(proto, 0)
    if ports_type & hash_types and not fragment and len(ip) >= ihl + 4:
        return addresses + ip[ihl : ihl + 4]
    if hash_types & VIRTIO_NET_HASH_TYPE_IPv4:
        return addresses
    return None


@dataclass(frozen=True)
class RssConfig:
    """What one VIRTIO_NET_CTRL_MQ_RSS_CONFIG set; queue ids are virtqueue indexes (receive queues: even)."""

    hash_types: int
    indirection_table: tuple[int, ...]
    unclassified_queue: int
    max_tx_vq: int
    key: bytes

    @classmethod
    def parse(cls, payload: bytes, queue_pairs: int) -> "RssConfig":
        """Check and take a ``virtio_net_rss_config`` for a device of ``queue_pairs`` pairs."""
        if len(payload) < _HEAD.size:
            raise RssConfigError(f"{len(payload)} bytes, shorter than the fixed fields")
        hash_types, mask, unclassified = _HEAD.unpack_from(payload)
        entries = mask + 1
        if entries & mask or entries > RSS_MAX_INDIRECTION_TABLE_LENGTH:
            raise RssConfigError(f"indirection_table_mask {mask:#x}: {entries} entries, not a power of two up to "
                                 f"{RSS_MAX_INDIRECTION_TABLE_LENGTH}")
        if hash_types & ~SUPPORTED_HASH_TYPES:
            raise RssConfigError(f"hash_types {hash_types:#x} beyond the supported {SUPPORTED_HASH_TYPES:#x}")
        table_end = _HEAD.size + 2 * entries
        if len(payload) < table_end + _TAIL.size:
            raise RssConfigError(f"{len(payload)} bytes, too short for {entries} indirection table entries")
        ids = struct.unpack_from(f"<{entries}H", payload, _HEAD.size)
        max_tx_vq, key_length = _TAIL.unpack_from(payload, table_end)
        key = payload[table_end + _TAIL.size :]
        if len(key) != key_length or not 0 < key_length <= RSS_MAX_KEY_SIZE:
            raise RssConfigError(f"hash_key_length {key_length} with {len(key)} key bytes (1..{RSS_MAX_KEY_SIZE})")
        if not 1 <= max_tx_vq <= queue_pairs:
            raise RssConfigError(f"max_tx_vq {max_tx_vq} outside 1..{queue_pairs}")
        queues = []
        for rq_id in (unclassified, *ids):
            if rq_id >> 15 or rq_id >= queue_pairs:
                raise RssConfigError(f"receive queue id {rq_id:#x}: not one of the {queue_pairs} receive queues")
            queues.append(2 * rq_id)  # vq_index_1_16: bits 1..16 of the virtqueue index
        return cls(hash_types, tuple(queues[1:]), queues[0], max_tx_vq, key)

    def queue(self, frame: bytes, tunnel_types: int = 0) -> int:
        """The virtqueue index ``frame`` goes to (5.1.9.5.7.3); ``tunnel_types``: those enabled for the inner hash."""
        data = hash_input(frame, self.hash_types, tunnel_types)
        if data is None:
            return self.unclassified_queue
        table = self.indirection_table
        return table[toeplitz(self.key, data) & (len(table) - 1)]
