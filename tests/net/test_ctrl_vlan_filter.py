"""Issue 19: the VLAN filter a driver sets through the control queue (virtio 1.2 5.1.6.5.3), in-process.

A device made with ``ctrl_vq=True`` offers CTRL_VQ and CTRL_VLAN; the
control queue follows the pairs.  With CTRL_VLAN negotiated the table starts
empty: tagged frames are dropped (and counted) until their VID is added,
untagged ones always pass; malformed commands are answered VIRTIO_NET_ERR.
"""

from __future__ import annotations

import pytest

from iovirt.platform import VirtioNetDriver
from iovirt.platform.testing import RecordingPort, fake_clock_platform
from iovirt.virtio import device as device_mod
from iovirt.virtio.net.ctrl import VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_ERR, VIRTIO_NET_OK
from iovirt.virtio.net.defs import VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.net.vlan import tagged

MAC = bytes.fromhex("525400000001")
PEER = bytes.fromhex("020000000002")
CTRL_QUEUE = 2  # one pair: receiveq1, transmitq1, controlq


@pytest.fixture
def nic(queue_cls, monkeypatch):
    monkeypatch.setattr(device_mod, "SplitQueue", queue_cls)
    switch = LearningSwitch()
    peer = RecordingPort()
    switch.attach(peer)
    net = VirtioNet(MAC, switch, ctrl_vq=True)
    platform = fake_clock_platform([net])
    driver = platform.driver(platform.functions[0])
    driver.bring_up(queue_size=64)
    nic = VirtioNetDriver(driver)
    nic.post_rx(16)
    yield net, driver, nic, switch, peer
    platform.close()


def command(driver, data: bytes, ack_size: int = 1) -> bytes:
    queue = driver.queues[CTRL_QUEUE]
    queue.add_data(out=[data], in_sizes=[ack_size] if ack_size else [])
    driver.kick(CTRL_QUEUE)
    (used,) = queue.get_used()
    return used.data


def vlan_cmd(op: int, vid: int) -> bytes:
    return bytes([VIRTIO_NET_CTRL_VLAN, op]) + vid.to_bytes(2, "little")


def test_vlan_filter_table_from_the_control_queue(nic) -> None:
    net, driver, rx, switch, peer = nic
    assert driver.has_feature(VIRTIO_NET_F_CTRL_VQ) and driver.has_feature(VIRTIO_NET_F_CTRL_VLAN)
    plain = MAC + PEER + b"\x08\x00" + bytes(46)
    in10, in20 = tagged(plain, 10), tagged(plain, 20)
    for frame in (plain, in10, in20):
        switch.forward(peer, frame)
    assert [f for _, f in rx.receive()] == [plain]  # the table starts empty: tagged frames dropped
    assert net.stats["rx_dropped_vlan_filter"] == 2
    assert command(driver, vlan_cmd(0, 10)) == bytes([VIRTIO_NET_OK])
    for frame in (in10, in20):
        switch.forward(peer, frame)
    assert [f for _, f in rx.receive()] == [in10]
    assert command(driver, vlan_cmd(1, 10)) == bytes([VIRTIO_NET_OK])
    switch.forward(peer, in10)
    assert rx.receive() == []


@pytest.mark.parametrize("data", [
    bytes([VIRTIO_NET_CTRL_VLAN, 0]) + (4096).to_bytes(2, "little"),  # VID beyond 12 bits
    bytes([VIRTIO_NET_CTRL_VLAN, 0, 10]),  # data cut short
    bytes([VIRTIO_NET_CTRL_VLAN, 7, 10, 0]),  # no such command
    bytes([9, 0]),  # no such class
    bytes([VIRTIO_NET_CTRL_VLAN]),  # no command byte
])
def test_bad_control_commands_are_answered_err(nic, data: bytes) -> None:
    net, driver, *_ = nic
    assert command(driver, data) == bytes([VIRTIO_NET_ERR])
    assert net.ctrl.vlans == set() and not net.needs_reset


def test_command_without_room_for_the_ack_is_consumed(nic) -> None:
    net, driver, *_ = nic
    assert command(driver, vlan_cmd(0, 10), ack_size=0) == b""
    assert net.ctrl.vlans == set()


def test_reset_empties_the_table(nic) -> None:
    net, driver, *_ = nic
    command(driver, vlan_cmd(0, 5))
    assert net.ctrl.vlans == {5}
    driver.reset()
    assert net.ctrl.vlans == set()
