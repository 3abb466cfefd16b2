"""Issue 19: arbitrary frames into a VLAN switch with a router and a NAT never raise (bad input is counted).

Frames are random bytes, or valid Ethernet/802.1Q/ARP/IPv4 headers with
random fields and random tails, sent from guests on access, trunk and
VLAN-unaware ports and from the TAP side of the NAT.
"""

from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from iovirt.virtio.net.ipv4 import Subnet
from iovirt.virtio.net.nat import Nat
from iovirt.virtio.net.router import Router, router_mac
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.vlan import PortVlan


class Port:
    def __init__(self, name: str) -> None:
        self.name = name

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        assert len(frame) >= 14
        return True


def build():
    switch = LearningSwitch()
    ports = [Port(f"p{i}") for i in range(3)]
    for port, config in zip(ports, (PortVlan(access=10), PortVlan(trunk=frozenset({10, 20})), None)):
        switch.attach(port)
        if config is not None:
            switch.set_vlan(port, config)
    router = Router(switch)
    router.add_interface(Subnet.parse("10.0.1.1/24"), PortVlan(access=10))
    router.add_interface(Subnet.parse("10.0.2.1/24"))
    nat = Nat(router, Subnet.parse("192.168.7.2/24"), gateway=0xC0A80701, ports=(1000, 1003))
    tap = Port("tap")
    nat.attach(tap)
    return switch, ports, nat, tap


MACS = st.sampled_from([router_mac(0), router_mac(1), router_mac(2), b"\xff" * 6, b"\x02\0\0\0\0\x01"])
ADDRS = st.sampled_from([0x0A000105, 0x0A000206, 0x0A000101, 0xC0A80702, 0xC0A80701, 0x08080808, 0xE0000001])


@st.composite
def frames(draw) -> bytes:
    dst, src = draw(MACS), draw(st.sampled_from([b"\x02\0\0\0\0\x05", b"\x02\0\0\0\0\x06"]))
    tag = draw(st.one_of(st.just(b""), st.builds(lambda t: b"\x81\x00" + t.to_bytes(2, "big"),
                                                     st.integers(0, 0xFFFF))))
    kind = draw(st.sampled_from(["ip", "arp", "raw"]))
    if kind == "raw":
        return dst + src + tag + draw(st.binary(max_size=80))
    if kind == "arp":
        body = struct.pack("!HHBBH6sI6sI", 1, 0x0800, 6, 4, draw(st.integers(0, 3)), src, draw(ADDRS),
                           b"\0" * 6, draw(ADDRS))
        return dst + src + tag + b"\x08\x06" + body[: draw(st.integers(0, len(body)))]
    proto = draw(st.sampled_from([1, 6, 17, 47]))
    ihl = draw(st.integers(4, 7))
    tail = draw(st.binary(max_size=40))
    total = draw(st.one_of(st.just(ihl * 4 + len(tail)), st.integers(0, 0xFFFF)))
    header = bytearray(struct.pack("!BBHHHBBHII", 0x40 | ihl, 0, total, 0, draw(st.integers(0, 0xFFFF)),
                                   draw(st.integers(0, 3)), proto, 0, draw(ADDRS), draw(ADDRS)))
    header += bytes(max(0, ihl * 4 - 20))
    if draw(st.booleans()):  # a valid header checksum, so the packet gets past the header check
        total_sum = sum(struct.unpack(f"!{len(header) // 2}H", bytes(header)))
        while total_sum >> 16:
            total_sum = (total_sum & 0xFFFF) + (total_sum >> 16)
        header[10:12] = (~total_sum & 0xFFFF).to_bytes(2, "big")
    return dst + src + tag + b"\x08\x00" + bytes(header) + tail


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), frames(), st.one_of(st.none(), st.tuples(st.integers(0, 90),
                                                                                        st.integers(0, 20)))),
                max_size=12))
def test_random_frames_never_raise(batch) -> None:
    switch, ports, nat, tap = build()
    for where, frame, csum in batch:
        if where == 3:
            nat.forward(tap, frame, csum)
        else:
            switch.forward(ports[where], frame, csum)
