"""Issue 19: 802.1Q access and trunk ports on the learning switch (iovirt/virtio/net/vlan.py).

Tags are inserted and removed at the edge, learning is per (VLAN, MAC),
flooding stays within a VLAN, a trunk drops (and counts) VLANs it does not
carry, and malformed 802.1Q frames are dropped and counted, never a crash.
"""

from __future__ import annotations

import pytest

from iovirt.virtio.net import datapath
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.vlan import PortVlan, VlanConfigError, parse_trunk, parse_vid, tag_of, tagged, untag

BROADCAST = b"\xff" * 6
PAYLOAD = b"\x08\x00" + bytes(range(46))


class Port:
    """A switch port that keeps what it is given."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[tuple[bytes, tuple[int, int] | None]] = []

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        self.frames.append((frame, csum))
        return True

    def take(self) -> list[bytes]:
        frames = [f for f, _ in self.frames]
        self.frames.clear()
        return frames


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, vid: int | None = None, pcp: int = 0) -> bytes:
    plain = dst + src + PAYLOAD
    return plain if vid is None else tagged(plain, vid, pcp)


@pytest.fixture
def switch() -> LearningSwitch:
    return LearningSwitch()


def ports(switch: LearningSwitch, *configs: PortVlan | None) -> list[Port]:
    made = []
    for i, config in enumerate(configs):
        port = Port(f"p{i}")
        switch.attach(port)
        if config is not None:
            switch.set_vlan(port, config)
        made.append(port)
    return made


def test_vid_range_is_1_to_4094() -> None:
    assert parse_vid("1") == 1 and parse_vid(4094) == 4094
    for bad in ("0", "4095", "-1", "x", "", 5000):
        with pytest.raises(VlanConfigError, match="VLAN id"):
            parse_vid(bad)
    assert parse_trunk("10:20") == {10, 20}
    for bad in ("", "10:10", "10:4095", "0"):
        with pytest.raises(VlanConfigError):
            parse_trunk(bad)
    with pytest.raises(VlanConfigError):
        PortVlan(access=10, trunk=frozenset({20}))
    with pytest.raises(VlanConfigError):
        PortVlan(access=0)


def test_tag_helpers_round_trip() -> None:
    plain = frame(BROADCAST, mac(1))
    t = tagged(plain, 100, pcp=5)
    assert len(t) == len(plain) + 4
    assert tag_of(t) == (5 << 13) | 100
    assert untag(t) == plain and tag_of(plain) is None
    with pytest.raises(ValueError):
        tag_of(plain[:12] + b"\x81\x00\x00")


def test_access_ports_flood_only_within_their_vlan(switch: LearningSwitch) -> None:
    a10, b10, c20 = ports(switch, PortVlan(access=10), PortVlan(access=10), PortVlan(access=20))
    switch.forward(a10, frame(BROADCAST, mac(1)))
    assert b10.take() == [frame(BROADCAST, mac(1))]  # untagged at the access edge
    assert c20.take() == []
    switch.forward(c20, frame(BROADCAST, mac(3)))
    assert a10.take() == [] and b10.take() == []


def test_trunk_gets_tags_and_access_gets_them_removed(switch: LearningSwitch) -> None:
    a10, a20, trunk = ports(switch, PortVlan(access=10), PortVlan(access=20), PortVlan(trunk=frozenset({10, 20})))
    switch.forward(a10, frame(BROADCAST, mac(1)))
    assert trunk.take() == [frame(BROADCAST, mac(1), vid=10)]
    switch.forward(trunk, frame(BROADCAST, mac(9), vid=20, pcp=3))
    assert a20.take() == [frame(BROADCAST, mac(9))] and a10.take() == []
    # The priority survives trunk to trunk.
    trunk2 = ports(switch, PortVlan(trunk=frozenset({20})))[0]
    switch.forward(trunk, frame(BROADCAST, mac(9), vid=20, pcp=3))
    assert trunk2.take() == [frame(BROADCAST, mac(9), vid=20, pcp=3)]


def test_trunk_drops_and_counts_vlans_it_does_not_carry(switch: LearningSwitch) -> None:
    a10, trunk = ports(switch, PortVlan(access=10), PortVlan(trunk=frozenset({10})))
    assert switch.forward(trunk, frame(BROADCAST, mac(9), vid=30)) == 0
    assert switch.forward(trunk, frame(BROADCAST, mac(9))) == 0  # untagged on a trunk
    assert switch.vlan_dropped == 2 and a10.take() == []
    # A tagged frame on an access port is dropped too; a priority tag (VID 0) is not.
    assert switch.forward(a10, frame(BROADCAST, mac(1), vid=10)) == 0
    assert switch.vlan_dropped == 3
    assert switch.forward(a10, frame(BROADCAST, mac(1), vid=0, pcp=6)) == 1
    assert trunk.take() == [frame(BROADCAST, mac(1), vid=10, pcp=6)]


def test_learning_is_per_vlan(switch: LearningSwitch) -> None:
    """The same MAC in two VLANs is two entries; a unicast goes to the port learned in the frame's VLAN."""
    a10, b10, a20, b20 = ports(switch, *(PortVlan(access=v) for v in (10, 10, 20, 20)))
    shared = mac(7)
    switch.forward(a10, frame(BROADCAST, shared))
    switch.forward(b20, frame(BROADCAST, shared))
    assert switch.lookup(shared, 10) is a10 and switch.lookup(shared, 20) is b20
    assert switch.lookup(shared) is None
    for p in (a10, b10, a20, b20):
        p.take()
    switch.forward(b10, frame(shared, mac(2)))
    assert a10.take() == [frame(shared, mac(2))] and b20.take() == [] and a20.take() == []
    switch.forward(a20, frame(shared, mac(4)))
    assert b20.take() == [frame(shared, mac(4))] and a10.take() == []
    assert switch.forwarded == 2


def test_vlan_unaware_port_is_a_trunk_of_every_vlan(switch: LearningSwitch) -> None:
    a10, plain, other = ports(switch, PortVlan(access=10), None, None)
    switch.forward(a10, frame(BROADCAST, mac(1)))
    assert plain.take() == [frame(BROADCAST, mac(1), vid=10)] == other.take()
    switch.forward(plain, frame(BROADCAST, mac(2)))  # untagged: VLAN 0, not the access port's
    assert a10.take() == [] and other.take() == [frame(BROADCAST, mac(2))]
    switch.forward(plain, frame(mac(1), mac(2), vid=10))
    assert a10.take() == [frame(mac(1), mac(2))]


def test_pending_checksum_moves_with_the_tag(switch: LearningSwitch) -> None:
    a10, trunk = ports(switch, PortVlan(access=10), PortVlan(trunk=frozenset({10})))
    switch.forward(a10, frame(BROADCAST, mac(1)), (34, 6))
    assert trunk.frames[-1][1] == (38, 6)
    switch.forward(trunk, frame(BROADCAST, mac(9), vid=10), (38, 6))
    assert a10.frames[-1][1] == (34, 6)


def test_malformed_8021q_frames_are_dropped_and_counted(switch: LearningSwitch) -> None:
    a10, plain = ports(switch, PortVlan(access=10), None)
    short = mac(1) + mac(2) + b"\x81\x00\x00"  # 15 bytes: the TCI is cut
    assert switch.forward(plain, short) == 0
    assert switch.forward(plain, frame(BROADCAST, mac(2), vid=4095)) == 0  # the reserved VID
    just_tag = mac(1) + mac(2) + b"\x81\x00\x00\x0a"  # tag, no inner EtherType
    assert switch.forward(plain, just_tag) == 0
    # A pending checksum that began inside the tag cannot be moved.
    assert switch.forward(plain, frame(BROADCAST, mac(2), vid=10), (14, 2)) == 0
    assert switch.malformed == 4 and a10.take() == []


def test_batches_take_the_vlan_path(switch: LearningSwitch) -> None:
    a10, b10, c20 = ports(switch, PortVlan(access=10), PortVlan(access=10), PortVlan(access=20))
    frames = datapath.Frames()
    for i in range(5):
        frames.append(frame(BROADCAST, mac(1)))
    assert switch.forward_batch(a10, frames) == 5
    assert len(b10.take()) == 5 and c20.take() == []


def test_no_vlan_config_keeps_the_transparent_path(switch: LearningSwitch) -> None:
    """Without VLAN ports tagged frames pass untouched, as before VLANs existed."""
    a, b = ports(switch, None, None)
    switch.forward(a, frame(BROADCAST, mac(1), vid=10))
    assert b.take() == [frame(BROADCAST, mac(1), vid=10)]
    assert switch.lookup(mac(1)) is a


def test_set_vlan_forgets_the_port_and_detach_drops_its_config(switch: LearningSwitch) -> None:
    a, b = ports(switch, None, None)
    switch.forward(a, frame(BROADCAST, mac(1)))
    switch.set_vlan(a, PortVlan(access=10))
    assert switch.lookup(mac(1)) is None and switch.vlan_of(a) == PortVlan(access=10)
    switch.detach(a)
    assert switch.vlan_of(a) is None
