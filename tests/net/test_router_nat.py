"""Issue 19: routed and NAT modes (iovirt/virtio/net/router.py, nat.py, ipv4.py).

Packets are built and checked with scapy: every checksum the router and the
NAT update incrementally is compared with the one scapy computes afresh.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

from iovirt.virtio.net.csum import internet_checksum
from iovirt.virtio.net.ipv4 import Subnet, csum_adjust
from iovirt.virtio.net.nat import ICMP_TIMEOUT_S, TCP_ESTABLISHED_S, TCP_TRANSITORY_S, UDP_TIMEOUT_S, Conntrack, Nat
from iovirt.virtio.net.router import ARP_HOLD_S, MAX_NEIGHBOURS, MAX_UNRESOLVED, Router, router_mac
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.vlan import PortVlan

GUEST_A, GUEST_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
HOST_MAC = "02:00:00:00:00:99"
BCAST = "ff:ff:ff:ff:ff:ff"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Port:
    """A guest's switch port (or the TAP) that keeps what it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        self.frames.append(frame)
        return True

    def take(self) -> list[Ether]:
        got = [Ether(f) for f in self.frames]
        self.frames.clear()
        return got


def checksums_valid(pkt: Ether) -> bool:
    """Whether scapy, recomputing every checksum, gets the ones in ``pkt``."""
    fresh = pkt.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if fresh.haslayer(layer):
            del fresh[layer].chksum
    return Ether(bytes(fresh)) == Ether(bytes(pkt)) and bytes(Ether(bytes(fresh))) == bytes(pkt)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def net(clock: Clock):
    """Two subnets on VLANs 10 and 20, one guest on each, the router between them."""
    switch = LearningSwitch(clock=clock)
    a, b = Port("a"), Port("b")
    for port, vid in ((a, 10), (b, 20)):
        switch.attach(port)
        switch.set_vlan(port, PortVlan(access=vid))
    router = Router(switch, clock)
    router.add_interface(Subnet.parse("10.0.1.1/24"), PortVlan(access=10))
    router.add_interface(Subnet.parse("10.0.2.1/24"), PortVlan(access=20))
    return switch, router, a, b


def arp_reply_to(switch: LearningSwitch, port: Port, mac: str, ip: str, router_ip: str, iface: int) -> None:
    rmac = router_mac(iface).hex(":")
    switch.forward(port, bytes(Ether(src=mac, dst=rmac) / ARP(op=2, hwsrc=mac, psrc=ip, hwdst=rmac, pdst=router_ip)))


def test_router_answers_arp_for_its_address(net) -> None:
    switch, router, a, b = net
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=BCAST) / ARP(op=1, hwsrc=GUEST_A, psrc="10.0.1.5",
                                                                 pdst="10.0.1.1")))
    (reply,) = a.take()
    assert reply[ARP].op == 2 and reply[ARP].psrc == "10.0.1.1" and reply[ARP].hwsrc == router_mac(1).hex(":")
    assert reply[ARP].pdst == "10.0.1.5" and reply.dst == GUEST_A
    assert b.take() == []  # the other VLAN hears nothing
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=BCAST) / ARP(op=1, hwsrc=GUEST_A, psrc="10.0.1.5",
                                                                 pdst="10.0.1.7")))
    assert a.take() == [] and router.stats["arp_replies"] == 1


def test_router_forwards_between_subnets_ttl_and_checksum(net) -> None:
    switch, router, a, b = net
    ping = Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src="10.0.1.5", dst="10.0.2.6", ttl=9) / ICMP(id=7)
    switch.forward(a, bytes(ping))
    (request,) = b.take()  # the router asks for 10.0.2.6, holding the packet
    assert request[ARP].op == 1 and request[ARP].pdst == "10.0.2.6" and request[ARP].psrc == "10.0.2.1"
    arp_reply_to(switch, b, GUEST_B, "10.0.2.6", "10.0.2.1", 2)
    (forwarded,) = b.take()
    assert forwarded.src == router_mac(2).hex(":") and forwarded.dst == GUEST_B
    assert forwarded[IP].ttl == 8 and forwarded[ICMP].id == 7 and checksums_valid(forwarded)
    # Now resolved: the next one goes straight through; IP options keep their place.
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"))
                            / IP(src="10.0.1.5", dst="10.0.2.6", ttl=64, options=b"\x01\x01\x01\x00")
                            / UDP(sport=5, dport=6) / Raw(b"x" * 20)))
    (udp,) = b.take()
    assert udp[IP].ttl == 63 and udp[IP].ihl == 6 and checksums_valid(udp)
    assert router.stats["forwarded"] == 2


def test_ttl_exhausted_is_dropped_with_time_exceeded(net) -> None:
    switch, router, a, b = net
    arp_reply_to(switch, a, GUEST_A, "10.0.1.5", "10.0.1.1", 1)
    a.take()
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"))
                            / IP(src="10.0.1.5", dst="10.0.2.6", ttl=1) / UDP(sport=1, dport=2)))
    assert b.take() == []
    (icmp,) = a.take()
    assert icmp[ICMP].type == 11 and icmp[IP].src == "10.0.1.1" and icmp[IP].dst == "10.0.1.5"
    assert checksums_valid(icmp) and router.stats["dropped_ttl"] == 1


def test_router_answers_ping_to_itself(net) -> None:
    switch, router, a, b = net
    arp_reply_to(switch, a, GUEST_A, "10.0.1.5", "10.0.1.1", 1)
    a.take()
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"))
                            / IP(src="10.0.1.5", dst="10.0.1.1") / ICMP(id=3, seq=4) / Raw(b"hello")))
    (reply,) = a.take()
    assert reply[ICMP].type == 0 and reply[ICMP].id == 3 and reply[Raw].load == b"hello" and checksums_valid(reply)


@pytest.mark.parametrize("raw", [
    b"\x45\x00",  # truncated header
    bytes(IP(src="10.0.1.5", dst="10.0.2.6"))[:-1],  # total length beyond the packet
    b"\x46" + bytes(IP(src="10.0.1.5", dst="10.0.2.6"))[1:],  # IHL says options that are not there
    bytes(IP(src="10.0.1.5", dst="10.0.2.6", chksum=0x1234)),  # bad header checksum
    b"\x65" + bytes(IP(src="10.0.1.5", dst="10.0.2.6"))[1:],  # version 6 in an IPv4 EtherType
])
def test_malformed_ipv4_is_dropped_and_counted(net, raw: bytes) -> None:
    switch, router, a, b = net
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"), type=0x0800)) + raw)
    assert b.take() == [] and router.stats["dropped_malformed"] == 1


def test_truncated_arp_and_no_route_are_counted(net) -> None:
    switch, router, a, b = net
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=BCAST, type=0x0806)) + b"\x00\x01\x08")
    assert router.stats["dropped_malformed"] == 1
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src="10.0.1.5", dst="8.8.8.8")
                            / ICMP()))
    assert router.stats["dropped_no_route"] == 1


def test_overlapping_router_interfaces_are_refused(net) -> None:
    _, router, _, _ = net
    with pytest.raises(ValueError, match="overlaps"):
        router.add_interface(Subnet.parse("10.0.1.200/16"))


def test_csum_adjust_matches_rfc1624_example() -> None:
    # RFC 1624 section 4: HC = 0xDD2F, m = 0x5555 -> m' = 0x3285 gives HC' = 0x0000.
    assert csum_adjust(0xDD2F, 0x5555, 0x3285) == 0x0000


# -- NAT ----------------------------------------------------------------------------------------
@pytest.fixture
def nat(clock: Clock):
    """A guest on 10.0.1.0/24 (VLAN-unaware), the router, the NAT on 192.168.77.2/24 through a fake TAP."""
    switch = LearningSwitch(clock=clock)
    guest = Port("guest")
    switch.attach(guest)
    router = Router(switch, clock)
    router.add_interface(Subnet.parse("10.0.1.1/24"))
    nat = Nat(router, Subnet.parse("192.168.77.2/24"), ports=(40000, 40001))
    tap = Port("tap")
    nat.attach(tap)
    arp_reply_to(switch, guest, GUEST_A, "10.0.1.5", "10.0.1.1", 1)
    guest.take()
    # The host answers ARP for itself on the TAP.
    nat.forward(tap, bytes(Ether(src=HOST_MAC, dst=router_mac(0).hex(":")) / ARP(
        op=2, hwsrc=HOST_MAC, psrc="192.168.77.1", hwdst=router_mac(0).hex(":"), pdst="192.168.77.2")))
    return switch, router, nat, guest, tap


def from_guest(switch: LearningSwitch, guest: Port, l4, dst: str = "192.168.77.1", src: str = "10.0.1.5") -> None:
    switch.forward(guest, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src=src, dst=dst) / l4))


def from_host(nat: Nat, tap: Port, l4, src: str = "192.168.77.1", dst: str = "192.168.77.2", **ip) -> None:
    nat.forward(tap, bytes(Ether(src=HOST_MAC, dst=router_mac(0).hex(":")) / IP(src=src, dst=dst, **ip) / l4))


def test_nat_answers_arp_on_the_tap(nat) -> None:
    _, _, n, _, tap = nat
    n.forward(tap, bytes(Ether(src=HOST_MAC, dst=BCAST) / ARP(op=1, hwsrc=HOST_MAC, psrc="192.168.77.1",
                                                               pdst="192.168.77.2")))
    (reply,) = tap.take()
    assert reply[ARP].op == 2 and reply[ARP].hwsrc == router_mac(0).hex(":")


def test_tcp_source_nat_and_reply_translation(nat) -> None:
    switch, router, n, guest, tap = nat
    from_guest(switch, guest, TCP(sport=40001, dport=8080, flags="S") / Raw(b"syn"))
    (out,) = tap.take()
    assert out[IP].src == "192.168.77.2" and out[TCP].sport == 40001  # the port kept: free and in range
    assert out.dst == HOST_MAC and out[IP].ttl == 63 and checksums_valid(out)
    from_host(n, tap, TCP(sport=8080, dport=40001, flags="SA") / Raw(b"synack"))
    (back,) = guest.take()
    assert back[IP].dst == "10.0.1.5" and back[TCP].dport == 40001 and back.dst == GUEST_A
    assert checksums_valid(back) and router.stats["nat_out"] == 1 and router.stats["nat_in"] == 1


def test_port_allocation_and_exhaustion(nat) -> None:
    switch, router, n, guest, tap = nat
    # Two inside hosts using the same source port to the same server get different outside ports.
    from_guest(switch, guest, UDP(sport=5000, dport=53), src="10.0.1.5")
    from_guest(switch, guest, UDP(sport=5000, dport=53), src="10.0.1.6")
    first, second = tap.take()
    assert {first[UDP].sport, second[UDP].sport} == {40000, 40001}
    assert checksums_valid(first) and checksums_valid(second)
    # The range (two ports) is used up for this server: a third is dropped and counted.
    from_guest(switch, guest, UDP(sport=5000, dport=53), src="10.0.1.7")
    assert tap.take() == [] and router.stats["dropped_nat_ports_exhausted"] == 1
    # Another server may reuse the ports.
    from_guest(switch, guest, UDP(sport=5000, dport=54), src="10.0.1.7")
    assert len(tap.take()) == 1
    # Replies reach the right host (once the router has its MAC).
    arp_reply_to(switch, guest, GUEST_B, "10.0.1.6", "10.0.1.1", 1)
    from_host(n, tap, UDP(sport=53, dport=second[UDP].sport))
    (back,) = guest.take()
    assert back[IP].dst == "10.0.1.6" and back.dst == GUEST_B and back[UDP].dport == 5000 and checksums_valid(back)


def test_icmp_echo_identifier_is_translated(nat) -> None:
    switch, router, n, guest, tap = nat
    from_guest(switch, guest, ICMP(type=8, id=77, seq=1) / Raw(b"ping"))
    (out,) = tap.take()
    assert out[ICMP].id in (40000, 40001) and checksums_valid(out)
    from_host(n, tap, ICMP(type=0, id=out[ICMP].id, seq=1) / Raw(b"ping"))
    (back,) = guest.take()
    assert back[ICMP].id == 77 and back[IP].dst == "10.0.1.5" and checksums_valid(back)


def test_unsolicited_and_expired_inbound_are_dropped(nat, clock: Clock) -> None:
    switch, router, n, guest, tap = nat
    from_host(n, tap, UDP(sport=53, dport=40000))
    assert guest.take() == [] and router.stats["dropped_nat_no_mapping"] == 1
    from_guest(switch, guest, UDP(sport=40000, dport=53))
    tap.take()
    from_host(n, tap, UDP(sport=99, dport=40000))  # another remote port: filtered
    assert guest.take() == [] and router.stats["dropped_nat_no_mapping"] == 2
    clock.now += UDP_TIMEOUT_S + 1
    from_host(n, tap, UDP(sport=53, dport=40000))
    assert guest.take() == [] and router.stats["dropped_nat_no_mapping"] == 3


def test_conntrack_timeouts_per_protocol_and_tcp_state(clock: Clock) -> None:
    ct = Conntrack(clock, ports=(1000, 1009))
    udp = ct.lookup_out((17, 1, 1000, 9, 53))
    icmp = ct.lookup_out((1, 1, 5, 9, 0))
    tcp = ct.lookup_out((6, 1, 2000, 9, 80))
    assert udp is not None and icmp is not None and tcp is not None
    assert 1000 <= tcp.nat_port <= 1009  # 2000 is outside the range: a free one of the range
    assert ct.timeout(tcp) == TCP_TRANSITORY_S
    assert ct.lookup_in(6, 9, 80, tcp.nat_port) is tcp
    assert ct.timeout(tcp) == TCP_ESTABLISHED_S
    tcp.closing = True
    assert ct.timeout(tcp) == TCP_TRANSITORY_S
    tcp.closing = False
    clock.now += ICMP_TIMEOUT_S + 2
    ct.sweep(clock.now)
    assert (1, 1, 5, 9, 0) not in ct.outbound and (17, 1, 1000, 9, 53) in ct.outbound
    clock.now += UDP_TIMEOUT_S
    ct.sweep(clock.now)
    assert list(ct.outbound) == [(6, 1, 2000, 9, 80)] and ct.expired == 2
    assert len(ct.inbound) == 1


def test_conntrack_entry_cap(clock: Clock) -> None:
    ct = Conntrack(clock, max_entries=2)
    assert ct.lookup_out((17, 1, 1, 9, 1)) and ct.lookup_out((17, 1, 2, 9, 1))
    assert ct.lookup_out((17, 1, 3, 9, 1)) is None
    clock.now += UDP_TIMEOUT_S + 1
    assert ct.lookup_out((17, 1, 3, 9, 1)) is not None


def test_fragments_and_other_protocols_are_dropped_with_counters(nat) -> None:
    switch, router, n, guest, tap = nat
    switch.forward(guest, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"))
                                / IP(src="10.0.1.5", dst="192.168.77.1", flags="MF") / UDP(sport=1, dport=2)))
    switch.forward(guest, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"))
                                / IP(src="10.0.1.5", dst="192.168.77.1", proto=47) / Raw(b"gre!")))
    from_guest(switch, guest, ICMP(type=3, code=1) / Raw(b"x" * 28))
    assert tap.take() == []
    assert router.stats["dropped_fragment"] == 1 and router.stats["dropped_nat_protocol"] == 2


def test_truncated_l4_headers_are_dropped(nat) -> None:
    switch, router, n, guest, tap = nat
    switch.forward(guest, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":"))
                                / IP(src="10.0.1.5", dst="192.168.77.1", proto=6) / Raw(b"\x00\x01\x00\x02")))
    from_host(n, tap, Raw(b"\x00"), proto=17)
    assert tap.take() == [] and guest.take() == []
    assert router.stats["dropped_malformed"] == 2


def test_udp_without_checksum_stays_without(nat) -> None:
    switch, router, n, guest, tap = nat
    from_guest(switch, guest, UDP(sport=40000, dport=53, chksum=0) / Raw(b"q"))
    (out,) = tap.take()
    assert out[UDP].chksum == 0 and out[IP].src == "192.168.77.2"


def test_pending_guest_checksum_is_completed_before_translation(nat) -> None:
    switch, router, n, guest, tap = nat
    pkt = Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src="10.0.1.5", dst="192.168.77.1") / UDP(
        sport=40000, dport=53) / Raw(b"partial")
    raw = bytearray(bytes(pkt))
    # NEEDS_CSUM: the field holds the pseudo-header sum only (virtio 1.2 5.1.6.2).
    pseudo = internet_checksum(bytes(raw[26:34]) + b"\x00\x11" + bytes(raw[38:40]))
    raw[40:42] = pseudo.to_bytes(2, "big")
    switch.forward(guest, bytes(raw), (34, 6))
    (out,) = tap.take()
    assert checksums_valid(out) and out[IP].src == "192.168.77.2"


def test_ping_to_the_nat_address_is_answered(nat) -> None:
    _, _, n, _, tap = nat
    from_host(n, tap, ICMP(type=8, id=1, seq=1))
    (reply,) = tap.take()
    assert reply[ICMP].type == 0 and reply[IP].src == "192.168.77.2" and checksums_valid(reply)


def test_unanswered_arp_drops_the_held_packets(net, clock: Clock) -> None:
    switch, router, a, b = net
    send = Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src="10.0.1.5", dst="10.0.2.9") / UDP()
    for _ in range(3):
        switch.forward(a, bytes(send))
    assert len(b.take()) == 1  # one ARP request while the address is unresolved
    clock.now += ARP_HOLD_S + 1
    switch.forward(a, bytes(send))  # the three held packets are given up; this one asks again
    assert router.stats["dropped_arp_unresolved"] == 3 and len(b.take()) == 1


def test_arp_state_is_bounded(net, clock: Clock) -> None:
    """A guest sending to (or claiming) every address of its subnet cannot grow the router without bound."""
    switch, router, a, b = net
    router.add_interface(Subnet.parse("10.8.0.1/16"))
    link = router.interfaces[2].link
    for n in range(MAX_UNRESOLVED + 10):
        dst = f"10.8.{n >> 8}.{(n & 0xFF) + 2 if (n & 0xFF) < 250 else 3}"
        switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src="10.0.1.5", dst=dst) / UDP()))
    assert len(link._pending) <= MAX_UNRESOLVED and router.stats["dropped_arp_unresolved"] >= 1
    guest = Port("g")
    switch.attach(guest)
    for n in range(MAX_NEIGHBOURS + 10):
        ip = f"10.8.{100 + (n >> 8)}.{(n & 0xFF) or 1}"
        switch.forward(guest, bytes(Ether(src=GUEST_B, dst=BCAST) / ARP(op=1, hwsrc=GUEST_B, psrc=ip, pdst="10.8.0.1")))
    assert len(link.neighbours) <= MAX_NEIGHBOURS and router.stats["arp_table_full"] >= 1


@pytest.mark.parametrize("dst", ["10.0.2.255", "224.0.0.5", "239.1.2.3", "250.0.0.1"])
def test_broadcast_and_multicast_are_not_routed(net, dst: str) -> None:
    switch, router, a, b = net
    switch.forward(a, bytes(Ether(src=GUEST_A, dst=router_mac(1).hex(":")) / IP(src="10.0.1.5", dst=dst) / UDP()))
    assert b.take() == [] and router.stats["dropped_no_route"] == 1
