"""virtio-net constants and the ``virtio_net_hdr`` (virtio 1.2 section 5.1)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

VIRTIO_ID_NET = 1

# 5.1.3 Feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_HOST_USO = 56
VIRTIO_NET_F_HASH_REPORT = 57  # the header grows hash fields (5.1.6): iovirt's devices do not offer it
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61

# 5.1.4 config status
VIRTIO_NET_S_LINK_UP = 1

# 5.1.6 virtio_net_hdr flags and gso types
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size  # 12: the header with num_buffers (VERSION_1 or MRG_RXBUF)
NET_HDR_LEGACY_SIZE = 10  # without num_buffers: legacy drivers without MRG_RXBUF

ETH_ALEN = 6
ETH_HLEN = 14
VLAN_HLEN = 4  # an IEEE 802.1Q tag between the MAC addresses and the ethertype
MAX_FRAME = 65535 + ETH_HLEN  # the largest frame a chain may carry: a 64 KiB IP packet behind its Ethernet header
ETH_P_IP, ETH_P_8021Q, ETH_P_IPV6 = 0x0800, 0x8100, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17

# Why the data path's tx_gather rejected a transmit chain: indexes of ``Frames.errors`` in both twins.
TX_SHORT, TX_LONG, TX_GSO, TX_CSUM = 0, 1, 2, 3


@dataclass(frozen=True)
class NetHdr:
    """``struct virtio_net_hdr`` (5.1.6): little-endian, 12 bytes with ``num_buffers``."""

    flags: int = 0
    gso_type: int = VIRTIO_NET_HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    def pack(self, size: int = NET_HDR_SIZE) -> bytes:
        """The header's bytes (``size`` 12, or 10 for the legacy form)."""
        raw = NET_HDR.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start, self.csum_offset, self.num_buffers
        )
        return raw[:size]

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "NetHdr":
        """Parse 10 or 12 bytes."""
        raw = bytes(data[:NET_HDR_SIZE])
        if len(raw) == NET_HDR_LEGACY_SIZE:
            raw += b"\0\0"
        return cls(*NET_HDR.unpack(raw))


NO_OFFLOAD = NetHdr()
