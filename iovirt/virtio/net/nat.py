"""NAT mode: source NAT from the router's subnets to the TAP uplink, with connection tracking.

``iovirt serve --router 10.0.1.1/24 --tap tap0 --nat 192.168.77.2/24,gw=192.168.77.1``
makes the TAP device the router's outside interface, with its own address
(``192.168.77.2``, answering ARP on the TAP) instead of a switch port: guests
reach the host's network without a bridge.  Packets the router sends out
leave with the outside address as their source (RFC 3022 NAPT): TCP and UDP
get an outside port, ICMP echo an outside identifier.  Next hops on the
outside subnet are reached directly, others through ``gw``.

Connection tracking (:class:`Conntrack`) keeps one entry per
(protocol, inside address, inside port, remote address, remote port):

- the outside port keeps the inside one when that is free for the remote
  ("port preservation", RFC 4787 4.2.1), else the next free one of
  ``ports``.  The mapping is per remote (address-and-port-dependent, as
  Linux's conntrack NAT), not the endpoint-independent mapping of RFC 4787
  REQ-1: a peer-to-peer hole-punching guest may need a bridge instead;
- a reply is accepted only from the remote the entry was made for, and
  translated back (address-and-port-dependent filtering);
- entries expire when idle: UDP after 300 s (RFC 4787 REQ-5: at least 120 s,
  300 s recommended), ICMP echo after 60 s (RFC 5508 REQ-1), TCP after
  7440 s once both sides have spoken and 240 s while it is opening or after a
  FIN or RST (RFC 5382 REQ-5, "transitory" 4 minutes).

Fragments (their ports are in the first fragment only), other protocols,
ICMP other than echo, and inbound packets matching no entry are dropped and
counted in the router's ``stats``.  A pending partial checksum from the host
is completed before translation; checksums are then updated incrementally
(RFC 1624).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from iovirt.virtio.net import ipv4
from iovirt.virtio.net.csum import ChecksumOffsetError, complete_checksum
from iovirt.virtio.net.defs import ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP
from iovirt.virtio.net.ipv4 import ETH_P_ARP, BadPacket, Subnet
from iovirt.virtio.net.router import Csum, Link, Router, router_mac

log = logging.getLogger("iovirt.nat")

UDP_TIMEOUT_S = 300.0
ICMP_TIMEOUT_S = 60.0
TCP_ESTABLISHED_S = 7440.0
TCP_TRANSITORY_S = 240.0
DEFAULT_PORTS = (1024, 65535)
DEFAULT_MAX_ENTRIES = 65536
SWEEP_INTERVAL_S = 1.0
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04
PROTOCOLS = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", ipv4.IPPROTO_ICMP: "icmp"}
# Where the L4 checksum sits, per protocol; whether the pseudo-header (addresses) is in it.
_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6, ipv4.IPPROTO_ICMP: 2}
_MIN_L4 = {IPPROTO_TCP: 20, IPPROTO_UDP: 8, ipv4.IPPROTO_ICMP: 8}

FiveTuple = tuple[int, int, int, int, int]  # protocol, inside IP, inside port, remote IP, remote port


@dataclass(slots=True)
class Connection:
    """One tracked connection: the inside endpoint, the remote, the outside port, its timers."""

    key: FiveTuple
    nat_port: int
    seen: float
    replied: bool = False
    closing: bool = False


class Conntrack:
    """Connection tracking and port allocation; no I/O (the clock is given, so tests move time)."""

    def __init__(self, clock: Callable[[], float], ports: tuple[int, int] = DEFAULT_PORTS,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        low, high = ports
        if not 1 <= low <= high <= 0xFFFF:
            raise ValueError(f"NAT port range {low}..{high} is not within 1..65535")
        self.clock = clock
        self.ports = ports
        self.max_entries = max_entries
        self.outbound: dict[FiveTuple, Connection] = {}
        self.inbound: dict[tuple[int, int, int, int], Connection] = {}  # protocol, remote IP, remote port, NAT port
        self._cursor = low
        self._next_sweep = clock() + SWEEP_INTERVAL_S
        self.expired = 0

    def timeout(self, conn: Connection) -> float:
        """How long ``conn`` may stay idle."""
        protocol = conn.key[0]
        if protocol == IPPROTO_UDP:
            return UDP_TIMEOUT_S
        if protocol == ipv4.IPPROTO_ICMP:
            return ICMP_TIMEOUT_S
        return TCP_ESTABLISHED_S if conn.replied and not conn.closing else TCP_TRANSITORY_S

    def sweep(self, now: float) -> None:
        """Forget the connections idle longer than their timeout."""
        self._next_sweep = now + SWEEP_INTERVAL_S
        for conn in [c for c in self.outbound.values() if now - c.seen > self.timeout(c)]:
            self._remove(conn)
            self.expired += 1

    def _remove(self, conn: Connection) -> None:
        protocol, _, _, rip, rport = conn.key
        del self.outbound[conn.key]
        del self.inbound[(protocol, rip, rport, conn.nat_port)]

    def lookup_out(self, key: FiveTuple) -> Connection | None:
        """The live connection of an outbound packet, or a new one; None when no port or entry is free."""
        now = self.clock()
        if now >= self._next_sweep:
            self.sweep(now)
        conn = self.outbound.get(key)
        if conn is not None and now - conn.seen > self.timeout(conn):
            self._remove(conn)
            self.expired += 1
            conn = None
        if conn is None:
            conn = self._new(key, now)
            if conn is None:
                return None
        conn.seen = now
        return conn

    def _new(self, key: FiveTuple, now: float) -> Connection | None:
        if len(self.outbound) >= self.max_entries:
            self.sweep(now)
            if len(self.outbound) >= self.max_entries:
                return None
        protocol, _, port, rip, rport = key
        low, high = self.ports
        if not (low <= port <= high and (protocol, rip, rport, port) not in self.inbound):
            span = high - low + 1
            for step in range(span):
                candidate = low + (self._cursor - low + step) % span
                if (protocol, rip, rport, candidate) not in self.inbound:
                    port = candidate
                    self._cursor = low + (candidate - low + 1) % span
                    break
            else:
                return None
        conn = Connection(key, port, now)
        self.outbound[key] = conn
        self.inbound[(protocol, rip, rport, port)] = conn
        return conn

    def lookup_in(self, protocol: int, rip: int, rport: int, nat_port: int) -> Connection | None:
        """The connection a packet from the remote to ``nat_port`` replies to (None: unsolicited or expired)."""
        conn = self.inbound.get((protocol, rip, rport, nat_port))
        now = self.clock()
        if conn is None or now - conn.seen > self.timeout(conn):
            return None
        conn.seen = now
        conn.replied = True
        return conn


def _l4(frame: bytearray, hlen: int, protocol: int) -> int:
    """Where the L4 header starts; :class:`BadPacket` when the packet is too short for the ports."""
    start = ETH_HLEN + hlen
    end = ETH_HLEN + int.from_bytes(frame[ETH_HLEN + 2 : ETH_HLEN + 4], "big")
    if end - start < _MIN_L4[protocol]:
        raise BadPacket("malformed", f"{PROTOCOLS[protocol]} header truncated ({end - start} bytes)")
    return start


def _word(frame: bytearray, at: int) -> int:
    return int.from_bytes(frame[at : at + 2], "big")


def _put(frame: bytearray, at: int, value: int, size: int = 2) -> None:
    frame[at : at + size] = value.to_bytes(size, "big")


class Nat:
    """The router's outside interface on the TAP uplink, source-translating what leaves through it.

    It is the TAP port's "switch" (:class:`~iovirt.virtio.net.tap.TapPort`
    attaches to it and forwards what the host sends into it).
    """

    def __init__(self, router: Router, subnet: Subnet, gateway: int | None = None,
                 ports: tuple[int, int] = DEFAULT_PORTS, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if gateway is not None and not subnet.contains(gateway):
            raise ValueError(f"NAT gateway {ipv4.ip_text(gateway)} is not on the outside subnet {subnet}")
        self.router = router
        self.gateway = gateway
        self.stats = router.stats
        self.conntrack = Conntrack(router.clock, ports, max_entries)
        self.tap: Any = None
        self.link = Link(f"nat:{subnet}", subnet, router_mac(0), self._send, router.stats, router.clock)
        router.uplink = self

    # -- the TAP port's side -------------------------------------------------------------------
    def attach(self, port: Any) -> None:
        """The TAP port joins (it sends what the host writes through :meth:`forward`)."""
        self.tap = port

    def detach(self, port: Any) -> None:
        """The TAP port leaves."""
        if self.tap is port:
            self.tap = None

    def _send(self, frame: bytes, csum: Csum) -> None:
        if self.tap is not None:
            self.tap.deliver(frame, csum)

    def forward(self, port: Any, frame: bytes, csum: Csum = None) -> int:
        """A frame from the host: ARP handled, IPv4 to the outside address translated in and routed."""
        if len(frame) < ETH_HLEN or frame[0:6] not in (self.link.mac, ipv4.BROADCAST_MAC):
            return 0
        ethertype = int.from_bytes(frame[12:14], "big")
        try:
            if ethertype == ETH_P_ARP:
                self.link.handle_arp(frame)
            elif ethertype == ETH_P_IP and frame[0:6] == self.link.mac:
                self._inbound(bytearray(frame), csum)
        except BadPacket as exc:
            self.router.drop(exc.reason, f"{self.link.name}: {exc}")
        return 1

    # -- the router's side ---------------------------------------------------------------------
    def owns(self, ip: int) -> bool:
        """Whether ``ip`` is the outside address."""
        return ip == self.link.subnet.ip

    def outbound(self, frame: bytearray, csum: Csum) -> None:
        """Translate the source of an IPv4 frame the router sends out, and send it to its next hop."""
        hlen = (frame[ETH_HLEN] & 0xF) * 4
        protocol = frame[ETH_HLEN + 9]
        if protocol not in PROTOCOLS:
            self.router.drop("nat_protocol", f"IP protocol {protocol} is not translated")
            return
        if ipv4.is_fragment(frame):
            self.router.drop("fragment", "fragments are not translated (the ports are in the first one only)")
            return
        l4 = _l4(frame, hlen, protocol)
        if protocol == ipv4.IPPROTO_ICMP:
            if frame[l4] != ipv4.ICMP_ECHO_REQUEST:
                self.router.drop("nat_protocol", f"ICMP type {frame[l4]} is not translated (echo only)")
                return
            port_at, rport = l4 + 4, 0  # the echo identifier stands for both ports (RFC 5508)
        else:
            port_at, rport = l4, _word(frame, l4 + 2)
        inside_ip, remote = ipv4.src_ip(frame), ipv4.dst_ip(frame)
        conn = self.conntrack.lookup_out((protocol, inside_ip, _word(frame, port_at), remote, rport))
        if conn is None:
            self.router.drop("nat_ports_exhausted", "no free NAT port or connection entry")
            return
        if protocol == IPPROTO_TCP:
            flags = frame[l4 + 13]
            if flags & (TCP_FIN | TCP_RST):
                conn.closing = True
        self._rewrite(frame, l4, protocol, ETH_HLEN + 12, self.link.subnet.ip, port_at, conn.nat_port)
        self.stats["nat_out"] += 1
        next_hop = remote if self.link.subnet.contains(remote) or self.gateway is None else self.gateway
        self.link.output(frame, next_hop, None)

    def _inbound(self, frame: bytearray, csum: Csum) -> None:
        hlen = ipv4.check_ipv4(frame)
        if ipv4.dst_ip(frame) != self.link.subnet.ip:
            return
        protocol = frame[ETH_HLEN + 9]
        if protocol not in PROTOCOLS or ipv4.is_fragment(frame):
            self.router.route(self.link, frame, None)  # to the outside address itself: answered or dropped there
            return
        if csum is not None:
            try:
                complete_checksum(frame, *csum)
            except ChecksumOffsetError as exc:
                raise BadPacket("malformed", str(exc)) from None
        l4 = _l4(frame, hlen, protocol)
        if protocol == ipv4.IPPROTO_ICMP:
            if frame[l4] != ipv4.ICMP_ECHO_REPLY:
                self.router.route(self.link, frame, None)
                return
            port_at, rport = l4 + 4, 0
        else:
            port_at, rport = l4 + 2, _word(frame, l4)
        conn = self.conntrack.lookup_in(protocol, ipv4.src_ip(frame), rport, _word(frame, port_at))
        if conn is None:
            self.router.drop("nat_no_mapping", "an inbound packet matches no connection")
            return
        if protocol == IPPROTO_TCP and frame[l4 + 13] & (TCP_FIN | TCP_RST):
            conn.closing = True
        _, inside_ip, inside_port, _, _ = conn.key
        self._rewrite(frame, l4, protocol, ETH_HLEN + 16, inside_ip, port_at, inside_port)
        self.stats["nat_in"] += 1
        self.router.route(self.link, frame, None)

    @staticmethod
    def _rewrite(frame: bytearray, l4: int, protocol: int, ip_at: int, ip: int, port_at: int, port: int) -> None:
        """Put ``ip`` at ``ip_at`` and ``port`` at ``port_at``, every checksum updated (RFC 1624)."""
        old_ip = int.from_bytes(frame[ip_at : ip_at + 4], "big")
        old_port = _word(frame, port_at)
        hcsum_at = ETH_HLEN + 10
        _put(frame, hcsum_at, ipv4.csum_adjust32(_word(frame, hcsum_at), old_ip, ip))
        csum_at = l4 + _CSUM_AT[protocol]
        l4csum = _word(frame, csum_at)
        if protocol != IPPROTO_UDP or l4csum:  # a UDP checksum of 0 means none (RFC 768)
            if protocol != ipv4.IPPROTO_ICMP:  # TCP and UDP sums cover the addresses (pseudo-header)
                l4csum = ipv4.csum_adjust32(l4csum, old_ip, ip)
            l4csum = ipv4.csum_adjust(l4csum, old_port, port)
            if protocol == IPPROTO_UDP and l4csum == 0:
                l4csum = 0xFFFF  # RFC 768: a computed 0 is sent as all ones
            _put(frame, csum_at, l4csum)
        _put(frame, ip_at, ip, 4)
        _put(frame, port_at, port)
