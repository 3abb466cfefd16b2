"""virtio-net constants and the ``virtio_net_hdr`` (virtio 1.2 section 5.1; the control queue at 1.4, 5.1.9.5)."""

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
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_DEVICE_STATS = 50  # virtio 1.4
VIRTIO_NET_F_HASH_TUNNEL = 51
VIRTIO_NET_F_VQ_NOTF_COAL = 52
VIRTIO_NET_F_NOTF_COAL = 53
VIRTIO_NET_F_GUEST_USO4 = 54  # virtio 1.4
VIRTIO_NET_F_GUEST_USO6 = 55
VIRTIO_NET_F_HOST_USO = 56
VIRTIO_NET_F_HASH_REPORT = 57  # the header grows hash fields (5.1.6): iovirt's devices do not offer it
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61

# 5.1.4 config status
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
VIRTIO_NET_SPEED_UNKNOWN = 0xFFFFFFFF  # 5.1.4 speed and duplex (meaningful with VIRTIO_NET_F_SPEED_DUPLEX)
VIRTIO_NET_DUPLEX_UNKNOWN = 0xFF

# 5.1.9.5 (virtio 1.4) the control virtqueue: struct virtio_net_ctrl's ack, classes and commands
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1
VIRTIO_NET_CTRL_RX = 0  # 5.1.9.5.1
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2  # this one and the next three with VIRTIO_NET_F_CTRL_RX_EXTRA
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5
VIRTIO_NET_CTRL_MAC = 1  # 5.1.9.5.2
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1
VIRTIO_NET_CTRL_VLAN = 2  # 5.1.9.5.3
VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL = 0, 1
VIRTIO_NET_CTRL_ANNOUNCE = 3  # 5.1.9.5.4
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_CTRL_MQ = 4  # 5.1.9.5.6
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1  # 5.1.9.5.7, VIRTIO_NET_F_RSS
VIRTIO_NET_CTRL_HASH_TUNNEL = 7  # 5.1.9.4.4
VIRTIO_NET_CTRL_HASH_TUNNEL_SET = 0
VIRTIO_NET_CTRL_NOTF_COAL = 6  # 5.1.9.5.10
VIRTIO_NET_CTRL_NOTF_COAL_TX_SET = 0
VIRTIO_NET_CTRL_NOTF_COAL_RX_SET = 1
VIRTIO_NET_CTRL_NOTF_COAL_VQ_SET = 2
VIRTIO_NET_CTRL_NOTF_COAL_VQ_GET = 3
VIRTIO_NET_CTRL_STATS = 8  # 5.1.9.5.11
VIRTIO_NET_CTRL_STATS_QUERY = 0
VIRTIO_NET_CTRL_STATS_GET = 1

# 5.1.9.4.3.1 hash types (supported_hash_types, virtio_net_rss_config.hash_types)
VIRTIO_NET_HASH_TYPE_IPv4 = 1 << 0
VIRTIO_NET_HASH_TYPE_TCPv4 = 1 << 1
VIRTIO_NET_HASH_TYPE_UDPv4 = 1 << 2
# 5.1.9.4.4 encapsulation types for the inner header hash (supported_tunnel_types, enabled_tunnel_types)
VIRTIO_NET_HASH_TUNNEL_TYPE_VXLAN = 1 << 4
VIRTIO_NET_HASH_TUNNEL_TYPE_IPIP = 1 << 7
VIRTIO_NET_HASH_TUNNEL_TYPE_NVGRE = 1 << 8
VXLAN_PORT = 4789  # RFC 7348: the IANA UDP destination port of VXLAN
VXLAN_HLEN = 8
IPPROTO_IPIP = 4

# 5.1.9.5.11 statistic types: bits of supported_stats_types / types_bitmap, and the reply header's type
VIRTIO_NET_STATS_TYPE_REPLY_RX_BASIC = 0
VIRTIO_NET_STATS_TYPE_REPLY_TX_BASIC = 16
VIRTIO_NET_STATS_TYPE_REPLY_CVQ = 32
VIRTIO_NET_STATS_TYPE_RX_BASIC = 1 << VIRTIO_NET_STATS_TYPE_REPLY_RX_BASIC
VIRTIO_NET_STATS_TYPE_TX_BASIC = 1 << VIRTIO_NET_STATS_TYPE_REPLY_TX_BASIC
VIRTIO_NET_STATS_TYPE_CVQ = 1 << VIRTIO_NET_STATS_TYPE_REPLY_CVQ
VIRTIO_NET_CTRL_COAL = struct.Struct("<II")  # struct virtio_net_ctrl_coal: max_packets, max_usecs
VIRTIO_NET_CTRL_COAL_VQ = struct.Struct("<HHII")  # struct virtio_net_ctrl_coal_vq: vq_index, reserved, coal
VIRTIO_NET_CTRL_QUEUE_STATS = struct.Struct("<H6xQ")  # one stats[] entry: vq_index, reserved[3], types_bitmap
VIRTIO_NET_STATS_REPLY_HDR = struct.Struct("<BxHxxH")  # type, reserved, vq_index, reserved1, size

# 5.1.6 virtio_net_hdr flags and gso types
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4
VIRTIO_NET_HDR_F_UDP_TUNNEL_CSUM = 8  # virtio 1.4: outer UDP checksum of a tunnel GSO packet
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4 = 0x20  # virtio 1.4: UDP-tunnel GSO, outer IPv4 / IPv6
VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV6 = 0x40
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
# Where the data path's forward stopped (the first item of its answer): the transmit ring is empty, the batch
# budget is spent, a notification is due, the last batch is for the switch (another flow, or chains rejected),
# frames of the last batch were left for the receiver's own path (from ``stop`` on), a ring needs the
# queue's own calls (nothing of it taken), the receive ring has no buffer while chains wait to be sent (a kick
# job only: it takes no more transmit chains than there are receive buffers), the receive ring's next chain is
# for the queue's own calls (a bad one: the rest of the batch goes through the receiver's batch path, from ``stop``).
(FORWARD_EMPTY, FORWARD_BUDGET, FORWARD_NOTIFY, FORWARD_SWITCH, FORWARD_HOLD, FORWARD_SLOW, FORWARD_WAIT,
 FORWARD_REFUSED) = range(8)
# What a frame channel's push answers (a batch crossing to a port another worker serves): the channel is full
# (nothing taken), the batch was taken, the batch was taken into an empty channel (the receiver may sleep: wake it).
CHANNEL_FULL, CHANNEL_PUSHED, CHANNEL_WAS_EMPTY = range(3)


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
