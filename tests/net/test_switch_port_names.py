"""The switch's log names virtio-net ports by their label, so a migration's MAC move says which ports.

Issue 13 (live migration): every virtio-net port's ``name`` is its device
type, so the move of a migrated guest's MAC from the source's port to the
destination's was logged as "moved from virtio-net to virtio-net".
"""

from __future__ import annotations

import logging

from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

GUEST = bytes.fromhex("525400123456")


def test_mac_move_names_both_ports(caplog):
    switch = LearningSwitch()
    a = VirtioNet(bytes.fromhex("020000000001"), switch, label="net0")
    b = VirtioNet(bytes.fromhex("020000000002"), switch, label="net1")
    rarp = b"\xff" * 6 + GUEST + b"\x80\x35" + bytes(46)
    with caplog.at_level(logging.INFO, logger="iovirt.switch"):
        switch.forward(a, rarp)
        switch.forward(b, rarp)
    assert f"MAC {GUEST.hex()} moved from net0 to net1" in caplog.text
    assert switch.lookup(GUEST) is b
