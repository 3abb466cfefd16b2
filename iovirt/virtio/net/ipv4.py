"""IPv4 and ARP as the router and the NAT need them: header checks, incremental checksums, small builders.

- The IPv4 header (RFC 791 3.1): version/IHL, total length, flags and
  fragment offset, TTL, protocol, header checksum, addresses; options when
  IHL > 5.  A router checks the header before it forwards (RFC 1812 5.2.2).
- Incremental checksum update (RFC 1624 eqn. 3): ``HC' = ~(~HC + ~m + m')``
  for a 16-bit word changing from m to m', so a TTL decrement or an address
  rewrite costs a few additions, not a pass over the packet.
- ARP for IPv4 over Ethernet (RFC 826): 28 bytes after the Ethernet header.
- ICMP (RFC 792): echo (type 8/0, identifier at offset 4) and time exceeded
  (type 11, carrying the offending header and 8 bytes of its data).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from iovirt.virtio.net.csum import internet_checksum
from iovirt.virtio.net.defs import ETH_HLEN, ETH_P_IP

ETH_P_ARP = 0x0806
ARP_REQUEST, ARP_REPLY = 1, 2
ARP_LEN = 28  # htype, ptype, hlen, plen, oper, sha, spa, tha, tpa (RFC 826)
IPV4_MIN_HLEN = 20
IPPROTO_ICMP = 1
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_TIME_EXCEEDED = 0, 8, 11
IP_MF = 0x2000  # "more fragments"
IP_OFFSET_MASK = 0x1FFF
DEFAULT_TTL = 64  # RFC 1700's recommended initial TTL
BROADCAST_MAC = b"\xff" * 6

_ARP = struct.Struct("!HHBBH6s4s6s4s")


class BadPacket(ValueError):
    """A header that cannot be forwarded; the text says why (the reason a counter is kept under)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Subnet:
    """An interface address with its prefix: ``10.0.1.1/24``."""

    ip: int
    prefix: int

    @classmethod
    def parse(cls, text: str) -> "Subnet":
        """``A.B.C.D/N`` (``ValueError`` for anything else, or a network or broadcast address as the IP)."""
        try:
            iface = ipaddress.IPv4Interface(text.strip())
        except (ipaddress.AddressValueError, ipaddress.NetmaskValueError, ValueError):
            raise ValueError(f"want an IPv4 address with its prefix, A.B.C.D/N, got {text!r}") from None
        if "/" not in text:
            raise ValueError(f"want an IPv4 address with its prefix, A.B.C.D/N, got {text!r}")
        if iface.network.prefixlen < 31 and iface.ip in (iface.network.network_address,
                                                          iface.network.broadcast_address):
            raise ValueError(f"{text}: the network or broadcast address is not an interface address")
        return cls(int(iface.ip), iface.network.prefixlen)

    @property
    def mask(self) -> int:
        """The netmask as a 32-bit integer."""
        return (0xFFFFFFFF << (32 - self.prefix)) & 0xFFFFFFFF

    def contains(self, ip: int) -> bool:
        """Whether ``ip`` is on this subnet."""
        return (ip ^ self.ip) & self.mask == 0

    def __str__(self) -> str:
        return f"{ipaddress.IPv4Address(self.ip)}/{self.prefix}"


def ip_text(ip: int) -> str:
    """Dotted quad of a 32-bit address."""
    return str(ipaddress.IPv4Address(ip))


def csum_adjust(csum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: the checksum field once a 16-bit word went from ``old`` to ``new``."""
    total = (~csum & 0xFFFF) + (~old & 0xFFFF) + new
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def csum_adjust32(csum: int, old: int, new: int) -> int:
    """:func:`csum_adjust` for a 32-bit field (an address): two 16-bit words."""
    csum = csum_adjust(csum, old >> 16, new >> 16)
    return csum_adjust(csum, old & 0xFFFF, new & 0xFFFF)


def check_ipv4(frame: bytes | bytearray) -> int:
    """Check the IPv4 header of an Ethernet frame (RFC 1812 5.2.2); returns the header length.

    :class:`BadPacket` (reason ``malformed``) for a truncated packet, another
    version, IHL < 5, a total length outside the frame, or a bad header checksum.
    """
    if len(frame) < ETH_HLEN + IPV4_MIN_HLEN:
        raise BadPacket("malformed", f"{len(frame)}-byte frame is too short for an IPv4 header")
    vihl = frame[ETH_HLEN]
    hlen = (vihl & 0xF) * 4
    if vihl >> 4 != 4 or hlen < IPV4_MIN_HLEN:
        raise BadPacket("malformed", f"version/IHL byte {vihl:#04x} is not IPv4 with IHL >= 5")
    total = int.from_bytes(frame[ETH_HLEN + 2 : ETH_HLEN + 4], "big")
    if total < hlen or ETH_HLEN + total > len(frame):
        raise BadPacket("malformed", f"total length {total} outside the {len(frame) - ETH_HLEN}-byte packet")
    if internet_checksum(memoryview(frame)[ETH_HLEN : ETH_HLEN + hlen]) != 0xFFFF:
        raise BadPacket("malformed", "bad IPv4 header checksum")
    return hlen


def is_fragment(frame: bytes | bytearray) -> bool:
    """Whether the packet is a fragment (MF set or a non-zero offset, RFC 791)."""
    flags = int.from_bytes(frame[ETH_HLEN + 6 : ETH_HLEN + 8], "big")
    return bool(flags & (IP_MF | IP_OFFSET_MASK))


def src_ip(frame: bytes | bytearray) -> int:
    """The IPv4 source address of an Ethernet frame."""
    return int.from_bytes(frame[ETH_HLEN + 12 : ETH_HLEN + 16], "big")


def dst_ip(frame: bytes | bytearray) -> int:
    """The IPv4 destination address of an Ethernet frame."""
    return int.from_bytes(frame[ETH_HLEN + 16 : ETH_HLEN + 20], "big")


def decrement_ttl(frame: bytearray) -> None:
    """TTL - 1 and the header checksum updated incrementally (RFC 1624; the word is TTL and protocol)."""
    ttl_at = ETH_HLEN + 8
    old = int.from_bytes(frame[ttl_at : ttl_at + 2], "big")
    new = old - 0x100
    frame[ttl_at : ttl_at + 2] = new.to_bytes(2, "big")
    csum = int.from_bytes(frame[ETH_HLEN + 10 : ETH_HLEN + 12], "big")
    frame[ETH_HLEN + 10 : ETH_HLEN + 12] = csum_adjust(csum, old, new).to_bytes(2, "big")


def ipv4_header(src: int, dst: int, protocol: int, payload_len: int, ttl: int = DEFAULT_TTL) -> bytes:
    """A 20-byte IPv4 header with its checksum."""
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, IPV4_MIN_HLEN + payload_len, 0, 0, ttl, protocol, 0,
                                   src.to_bytes(4, "big"), dst.to_bytes(4, "big")))
    header[10:12] = (~internet_checksum(header) & 0xFFFF).to_bytes(2, "big")
    return bytes(header)


def icmp(type_: int, code: int, rest: bytes) -> bytes:
    """An ICMP message (RFC 792): type, code, checksum, then ``rest``."""
    body = bytearray(bytes([type_, code, 0, 0]) + rest)
    body[2:4] = (~internet_checksum(body) & 0xFFFF).to_bytes(2, "big")
    return bytes(body)


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    """An untagged Ethernet frame."""
    return dst + src + ethertype.to_bytes(2, "big") + payload


@dataclass(frozen=True)
class Arp:
    """An ARP packet for IPv4 over Ethernet (RFC 826)."""

    oper: int
    sha: bytes
    spa: int
    tha: bytes
    tpa: int

    @classmethod
    def parse(cls, frame: bytes | bytearray) -> "Arp":
        """The ARP packet of an Ethernet frame; :class:`BadPacket` for a short or non-IPv4/Ethernet one."""
        if len(frame) < ETH_HLEN + ARP_LEN:
            raise BadPacket("malformed", f"{len(frame)}-byte frame is too short for ARP")
        htype, ptype, hlen, plen, oper, sha, spa, tha, tpa = _ARP.unpack_from(frame, ETH_HLEN)
        if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
            raise BadPacket("malformed", "ARP not for IPv4 over Ethernet")
        return cls(oper, sha, int.from_bytes(spa, "big"), tha, int.from_bytes(tpa, "big"))

    def frame(self, eth_dst: bytes) -> bytes:
        """This packet in an Ethernet frame to ``eth_dst``."""
        return ethernet(eth_dst, self.sha, ETH_P_ARP, _ARP.pack(
            1, ETH_P_IP, 6, 4, self.oper, self.sha, self.spa.to_bytes(4, "big"), self.tha, self.tpa.to_bytes(4, "big"),
        ))
