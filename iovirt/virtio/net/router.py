"""Routed mode: an IPv4 router whose interfaces are ports of the learning switch.

``iovirt serve --router 10.0.1.1/24,vlan=10 --router 10.0.2.1/24,vlan=20``
gives the switch one gateway port per subnet (an access port of the VLAN, or
VLAN-unaware without ``vlan=``).  Each interface answers ARP for its address
(RFC 826) and ICMP echo to it; the router forwards IPv4 between the subnets as
RFC 1812 asks: the header is checked (5.2.2), the TTL decremented and the
header checksum updated incrementally (RFC 1624), a packet whose TTL runs out
dropped with an ICMP time exceeded to its source (5.3.1).  Next hops are
resolved with ARP; packets waiting for an answer are held (a few per address).

With ``--nat`` (:mod:`iovirt.virtio.net.nat`) packets to any other
destination leave through the TAP uplink, source-translated.

What cannot be forwarded is dropped and counted in ``Router.stats`` by
reason (``dropped_malformed``, ``dropped_ttl``, ``dropped_no_route``, ...),
never raised: frames come from guests.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Protocol

from iovirt.virtio.net import ipv4
from iovirt.virtio.net.csum import ChecksumOffsetError, complete_checksum
from iovirt.virtio.net.defs import ETH_HLEN, ETH_P_IP
from iovirt.virtio.net.ipv4 import ETH_P_ARP, Arp, BadPacket, Subnet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.vlan import PortVlan

log = logging.getLogger("iovirt.router")

Csum = tuple[int, int] | None
ARP_TIMEOUT_S = 60.0  # how long a neighbour's MAC is believed without hearing from it
ARP_PENDING = 16  # packets held per address while its MAC is asked for
ARP_HOLD_S = 3.0  # how long packets wait for an answer (one request per address meanwhile) before they are dropped
MAX_NEIGHBOURS = 1024  # addresses remembered per interface (a guest may claim any address of a /8)
MAX_UNRESOLVED = 256  # addresses asked for at once per interface
MULTICAST_BASE = 0xE0000000  # 224.0.0.0: class D (multicast) and E (reserved) above it
ICMP_QUOTED = 8  # RFC 792: the offending header and the first 64 bits of its data


def router_mac(n: int) -> bytes:
    """The MAC of router interface ``n``: locally administered, unicast (02:69:6f:76 is "iov")."""
    return bytes([0x02, 0x69, 0x6F, 0x76, (n >> 8) & 0xFF, n & 0xFF])


class Link:
    """One IPv4 interface: its address, its MAC, its neighbours (ARP), and how it sends a frame."""

    def __init__(self, name: str, subnet: Subnet, mac: bytes, send: Callable[[bytes, Csum], object],
                 stats: collections.Counter[str], clock: Callable[[], float]) -> None:
        self.name = name
        self.subnet = subnet
        self.mac = mac
        self._send = send
        self.stats = stats
        self.clock = clock
        self.neighbours: dict[int, tuple[bytes, float]] = {}  # IP -> (MAC, when heard)
        self._pending: dict[int, collections.deque[tuple[bytearray, Csum]]] = {}
        self._asked: dict[int, float] = {}

    def handle_arp(self, frame: bytes) -> None:
        """Learn the sender (RFC 826 "merge"), answer a request for this address, flush what waited."""
        arp = Arp.parse(frame)
        if not self.subnet.contains(arp.spa):
            return
        if arp.spa in self.neighbours or arp.tpa == self.subnet.ip:
            self._remember(arp.spa, arp.sha)
            for waiting, csum in self._pending.pop(arp.spa, ()):
                waiting[0:6] = arp.sha
                self._send(bytes(waiting), csum)
            self._asked.pop(arp.spa, None)
        if arp.oper == ipv4.ARP_REQUEST and arp.tpa == self.subnet.ip:
            self.stats["arp_replies"] += 1
            self._send(Arp(ipv4.ARP_REPLY, self.mac, self.subnet.ip, arp.sha, arp.spa).frame(arp.sha), None)

    def _remember(self, ip: int, mac: bytes) -> None:
        now = self.clock()
        if ip not in self.neighbours and len(self.neighbours) >= MAX_NEIGHBOURS:
            for old in [k for k, (_, heard) in self.neighbours.items() if now - heard > ARP_TIMEOUT_S]:
                del self.neighbours[old]
            if len(self.neighbours) >= MAX_NEIGHBOURS:
                self.stats["arp_table_full"] += 1
                return
        self.neighbours[ip] = (mac, now)

    def _expire_pending(self, now: float) -> None:
        """Drop what waited longer than :data:`ARP_HOLD_S` for an address that never answered."""
        for ip in [ip for ip, asked in self._asked.items() if now - asked > ARP_HOLD_S]:
            self.stats["dropped_arp_unresolved"] += len(self._pending.pop(ip, ()))
            del self._asked[ip]

    def output(self, frame: bytearray, next_hop: int, csum: Csum) -> None:
        """Send an IPv4 frame to ``next_hop`` on this link: now if its MAC is known, else after ARP answers."""
        frame[6:12] = self.mac
        known = self.neighbours.get(next_hop)
        now = self.clock()
        if known is not None and now - known[1] <= ARP_TIMEOUT_S:
            frame[0:6] = known[0]
            self._send(bytes(frame), csum)
            return
        self._expire_pending(now)
        queue = self._pending.get(next_hop)
        if queue is None:
            if len(self._pending) >= MAX_UNRESOLVED:
                self.stats["dropped_arp_unresolved"] += 1
                return
            queue = self._pending[next_hop] = collections.deque(maxlen=ARP_PENDING)
        if len(queue) == ARP_PENDING:
            self.stats["dropped_arp_pending"] += 1
        queue.append((frame, csum))
        if next_hop not in self._asked:
            self._asked[next_hop] = now
            request = Arp(ipv4.ARP_REQUEST, self.mac, self.subnet.ip, b"\0" * 6, next_hop)
            self._send(request.frame(ipv4.BROADCAST_MAC), None)


class Uplink(Protocol):
    """Where the router sends what no interface's subnet holds (the NAT, :class:`~iovirt.virtio.net.nat.Nat`)."""

    def outbound(self, frame: bytearray, csum: Csum) -> None:
        """Take an IPv4 frame (TTL already decremented) bound outside."""
        ...

    def owns(self, ip: int) -> bool:
        """Whether ``ip`` is the uplink's own address."""
        ...


class RouterInterface:
    """A router interface as a port of the switch: frames the switch delivers go to the router."""

    def __init__(self, router: "Router", switch: LearningSwitch, subnet: Subnet, mac: bytes,
                 vlan: PortVlan | None) -> None:
        self.name = self.label = f"router:{subnet}"
        self.router = router
        self.switch = switch
        self.link = Link(self.name, subnet, mac, self._send, router.stats, router.clock)
        switch.attach(self)
        if vlan is not None:
            switch.set_vlan(self, vlan)

    def _send(self, frame: bytes, csum: Csum) -> None:
        self.switch.forward(self, frame, csum)

    def deliver(self, frame: bytes, csum: Csum) -> bool:
        """A frame from the switch: ARP or IPv4 for this interface's MAC is handled, the rest ignored."""
        dst = frame[0:6]
        if dst != self.link.mac and dst != ipv4.BROADCAST_MAC:
            return False
        self.router.receive(self.link, frame, csum)
        return True

    def close(self) -> None:
        """Leave the switch."""
        self.switch.detach(self)


class Router:
    """IPv4 forwarding between :class:`RouterInterface` ports (and an optional NAT :class:`Uplink`)."""

    def __init__(self, switch: LearningSwitch, clock: Callable[[], float] = time.monotonic) -> None:
        self.switch = switch
        self.clock = clock
        self.stats: collections.Counter[str] = collections.Counter()
        self.interfaces: list[RouterInterface] = []
        self.uplink: Uplink | None = None

    def add_interface(self, subnet: Subnet, vlan: PortVlan | None = None) -> RouterInterface:
        """A gateway port for ``subnet`` (an access port of ``vlan``, or VLAN-unaware)."""
        for other in self.interfaces:
            if other.link.subnet.contains(subnet.ip) or subnet.contains(other.link.subnet.ip):
                raise ValueError(f"router interface {subnet} overlaps {other.link.subnet}")
        iface = RouterInterface(self, self.switch, subnet, router_mac(len(self.interfaces) + 1), vlan)
        self.interfaces.append(iface)
        log.info("router interface %s (%s), MAC %s", subnet, "VLAN-unaware" if vlan is None else vlan.describe(),
                 iface.link.mac.hex(":"))
        return iface

    def counters(self) -> dict[str, int]:
        """The router's counters, with ``nat_connections`` (tracked connections) in NAT mode."""
        counters = dict(self.stats)
        conntrack = getattr(self.uplink, "conntrack", None)
        if conntrack is not None:
            counters["nat_connections"] = len(conntrack.outbound)
        return counters

    def close(self) -> None:
        """Take every interface off the switch."""
        for iface in self.interfaces:
            iface.close()
        self.interfaces.clear()

    # -- receive -----------------------------------------------------------------------------
    def receive(self, link: Link, frame: bytes, csum: Csum) -> None:
        """A frame on an inside ``link``: ARP handled, IPv4 routed; bad input dropped and counted."""
        ethertype = int.from_bytes(frame[12:14], "big")
        try:
            if ethertype == ETH_P_ARP:
                link.handle_arp(frame)
            elif ethertype == ETH_P_IP and frame[0:6] == link.mac:
                self.route(link, bytearray(frame), csum)
        except BadPacket as exc:
            self.drop(exc.reason, f"{link.name}: {exc}")

    def drop(self, reason: str, detail: str) -> None:
        """Count a dropped packet (``dropped_<reason>``); the first of each reason is logged."""
        key = "dropped_" + reason
        if not self.stats[key]:
            log.warning("router: dropped a packet (%s); further drops of this kind are only counted", detail)
        self.stats[key] += 1

    def route(self, ingress: Link, frame: bytearray, csum: Csum) -> None:
        """Forward one IPv4 frame (RFC 1812 5.2-5.3) that arrived on ``ingress`` (inside, or the NAT's link)."""
        hlen = ipv4.check_ipv4(frame)
        dst = ipv4.dst_ip(frame)
        if self._local(dst):
            self._answer(ingress, frame, hlen)
            return
        if dst >= MULTICAST_BASE:  # no multicast routing here; class E is reserved (RFC 1812 4.2.2.11)
            self.drop("no_route", f"multicast or reserved destination {ipv4.ip_text(dst)}")
            return
        egress = self._egress(dst)
        if egress is not None and dst | egress.subnet.mask == 0xFFFFFFFF and egress.subnet.prefix < 31:
            # RFC 2644 / RFC 1812 5.3.5.2: directed broadcasts are not forwarded by default.
            self.drop("no_route", f"directed broadcast to {ipv4.ip_text(dst)}")
            return
        if egress is None and self.uplink is None:
            self.drop("no_route", f"no route to {ipv4.ip_text(dst)}")
            return
        if frame[ETH_HLEN + 8] <= 1:
            self._time_exceeded(ingress, frame, hlen)
            return
        ipv4.decrement_ttl(frame)
        self.stats["forwarded"] += 1
        if egress is not None:
            egress.output(frame, dst, csum)
            return
        assert self.uplink is not None
        if csum is not None:  # the NAT rewrites the L4 checksum: it must be a full one first (5.1.6.2)
            try:
                complete_checksum(frame, *csum)
            except ChecksumOffsetError as exc:
                raise BadPacket("malformed", str(exc)) from None
        self.uplink.outbound(frame, None)

    def _local(self, ip: int) -> bool:
        return any(i.link.subnet.ip == ip for i in self.interfaces) or (
            self.uplink is not None and self.uplink.owns(ip))

    def _egress(self, dst: int) -> Link | None:
        best: Link | None = None
        for iface in self.interfaces:
            subnet = iface.link.subnet
            if subnet.contains(dst) and (best is None or subnet.prefix > best.subnet.prefix):
                best = iface.link
        return best

    def _answer(self, ingress: Link, frame: bytearray, hlen: int) -> None:
        """A packet to the router itself: ICMP echo is answered (RFC 1122 3.2.2.6), the rest dropped."""
        start = ETH_HLEN + hlen
        end = ETH_HLEN + int.from_bytes(frame[ETH_HLEN + 2 : ETH_HLEN + 4], "big")
        if (frame[ETH_HLEN + 9] != ipv4.IPPROTO_ICMP or end - start < 8
                or frame[start] != ipv4.ICMP_ECHO_REQUEST or ipv4.is_fragment(frame)):
            self.drop("local", "not an ICMP echo request to the router")
            return
        reply = ipv4.icmp(ipv4.ICMP_ECHO_REPLY, 0, bytes(frame[start + 4 : end]))
        packet = ipv4.ipv4_header(ipv4.dst_ip(frame), ipv4.src_ip(frame), ipv4.IPPROTO_ICMP, len(reply)) + reply
        self.stats["echo_replies"] += 1
        ingress.output(bytearray(ipv4.ethernet(b"\0" * 6, ingress.mac, ETH_P_IP, packet)), ipv4.src_ip(frame), None)

    def _time_exceeded(self, ingress: Link, frame: bytearray, hlen: int) -> None:
        """TTL ran out: dropped, and the source told (RFC 1812 5.3.1, ICMP type 11 code 0)."""
        self.drop("ttl", "TTL exceeded in transit")
        source = ipv4.src_ip(frame)
        if not ingress.subnet.contains(source):
            return
        quoted = bytes(frame[ETH_HLEN : ETH_HLEN + hlen + ICMP_QUOTED])
        message = ipv4.icmp(ipv4.ICMP_TIME_EXCEEDED, 0, b"\0" * 4 + quoted)
        packet = ipv4.ipv4_header(ingress.subnet.ip, source, ipv4.IPPROTO_ICMP, len(message)) + message
        self.stats["icmp_time_exceeded"] += 1
        ingress.output(bytearray(ipv4.ethernet(b"\0" * 6, ingress.mac, ETH_P_IP, packet)), source, None)
