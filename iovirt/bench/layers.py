"""Scapy layers for ``struct virtio_net_hdr`` (virtio 1.2 section 5.1.6, "Device Operation").

Every frame on a virtio-net queue is preceded by this header::

    u8   flags        NEEDS_CSUM 1, DATA_VALID 2, RSC_INFO 4
    u8   gso_type     NONE 0, TCPV4 1, UDP 3, TCPV6 4, UDP_L4 5; ECN 0x80 ORed in
    le16 hdr_len
    le16 gso_size
    le16 csum_start
    le16 csum_offset
    le16 num_buffers  (absent in the 10-byte legacy form)
    le32 hash_value   \\
    le16 hash_report   > only with VIRTIO_NET_F_HASH_REPORT (5.1.6, 20 bytes)
    le16 padding      /

Which form is on the wire depends on the negotiated features (5.1.6): 12
bytes with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF, 10 bytes for a legacy
driver without either, 20 with VIRTIO_NET_F_HASH_REPORT.  One class per form;
:func:`hdr_class` picks the right one.  The ECN bit of ``gso_type`` is its own
one-bit field (``gso_ecn``) so that dissection shows the GSO type by name.
Scapy has no virtio layer of its own (its ``tuntap`` only knows the
TUN_VNET_HDR flag).
"""

from __future__ import annotations

from scapy.fields import AnyField, BitEnumField, BitField, FlagsField, LEIntField, LEShortEnumField, LEShortField
from scapy.layers.l2 import Ether
from scapy.packet import Packet, bind_layers

from iovirt.bench.clock import wall_time
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.net.defs import VIRTIO_NET_F_HASH_REPORT, VIRTIO_NET_F_MRG_RXBUF

HDR_FLAGS = ["NEEDS_CSUM", "DATA_VALID", "RSC_INFO"]
"""5.1.6 ``flags`` bits, least significant first."""

GSO_TYPES = {0: "NONE", 1: "TCPV4", 3: "UDP", 4: "TCPV6", 5: "UDP_L4"}
"""5.1.6 ``gso_type`` values without the ECN bit (0x80)."""

HASH_REPORT_TYPES = {
    0: "NONE", 1: "IPv4", 2: "TCPv4", 3: "UDPv4", 4: "IPv6", 5: "TCPv6", 6: "UDPv6",
    7: "IPv6_EX", 8: "TCPv6_EX", 9: "UDPv6_EX",
}
"""5.1.6.4.3 ``VIRTIO_NET_HASH_REPORT_*``."""

_LEGACY_FIELDS: list[AnyField] = [
    FlagsField("flags", 0, 8, HDR_FLAGS),
    BitField("gso_ecn", 0, 1),
    BitEnumField("gso_type", 0, 7, GSO_TYPES),
    LEShortField("hdr_len", 0),
    LEShortField("gso_size", 0),
    LEShortField("csum_start", 0),
    LEShortField("csum_offset", 0),
]
_NUM_BUFFERS: list[AnyField] = [LEShortField("num_buffers", 0)]
_HASH_FIELDS: list[AnyField] = [
    LEIntField("hash_value", 0),
    LEShortEnumField("hash_report", 0, HASH_REPORT_TYPES),
    LEShortField("padding", 0),
]


class VirtioNetHdrLegacy(Packet):
    """The 10-byte header of a legacy driver that negotiated neither VERSION_1 nor MRG_RXBUF."""

    name = "virtio_net_hdr (legacy)"
    fields_desc = list(_LEGACY_FIELDS)

    def mysummary(self) -> str:
        return self.sprintf("virtio_net_hdr flags=%flags% gso=%gso_type%")


class VirtioNetHdr(Packet):
    """The 12-byte header (VERSION_1 or MRG_RXBUF): the legacy fields plus ``num_buffers``."""

    name = "virtio_net_hdr"
    fields_desc = _LEGACY_FIELDS + _NUM_BUFFERS

    def mysummary(self) -> str:
        return self.sprintf("virtio_net_hdr flags=%flags% gso=%gso_type% num_buffers=%num_buffers%")


class VirtioNetHdrHashReport(Packet):
    """The 20-byte header with VIRTIO_NET_F_HASH_REPORT: ``hash_value``, ``hash_report``, padding."""

    name = "virtio_net_hdr (hash report)"
    fields_desc = _LEGACY_FIELDS + _NUM_BUFFERS + _HASH_FIELDS

    def mysummary(self) -> str:
        return self.sprintf(
            "virtio_net_hdr flags=%flags% gso=%gso_type% num_buffers=%num_buffers% hash=%hash_value%/%hash_report%"
        )


def hdr_class(features: int) -> type[Packet]:
    """The header class for the negotiated ``features`` (5.1.6)."""
    if features >> VIRTIO_NET_F_HASH_REPORT & 1:
        return VirtioNetHdrHashReport
    if features >> VIRTIO_F_VERSION_1 & 1 or features >> VIRTIO_NET_F_MRG_RXBUF & 1:
        return VirtioNetHdr
    return VirtioNetHdrLegacy


HDR_BY_SIZE: dict[int, type[Packet]] = {
    len(VirtioNetHdrLegacy()): VirtioNetHdrLegacy,
    len(VirtioNetHdr()): VirtioNetHdr,
    len(VirtioNetHdrHashReport()): VirtioNetHdrHashReport,
}
"""The header class by its size: 10, 12 or 20 bytes (5.1.6)."""


def dissect(hdr: bytes, frame: bytes, t_ns: int) -> Packet:
    """``hdr + frame`` as ``VirtioNetHdr* / Ether / ...``, its ``time`` the wall-clock time of ``t_ns``."""
    pkt = HDR_BY_SIZE[len(hdr)](hdr + frame)
    pkt.time = wall_time(t_ns)
    return pkt


# An Ethernet frame always follows the header (5.1.6).
for _cls in (VirtioNetHdrLegacy, VirtioNetHdr, VirtioNetHdrHashReport):
    bind_layers(_cls, Ether)
