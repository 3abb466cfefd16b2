"""virtio-net's VLAN filter through the control virtqueue (virtio 1.2 5.1.6.5.3), where the device serves the
control queue itself: behind the in-process virtio-pci transport.  (Over vhost-user the front-end serves the
control queue and the back-end never sees the table.)

Frames come from the network the device is attached to (its switch), as they would from a peer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iovirt.conformance.checks.net_headers import tcp_frame
from iovirt.conformance.checks.pci import PCI
from iovirt.conformance.devices import new_tag
from iovirt.conformance.platform_target import PciContext
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.virtio.net.defs import NET_HDR_SIZE, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ

VIRTIO_NET_OK = 0
VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD = 2, 0
KEPT_VID, OTHER_VID = 42, 43
RX_BUFFERS, RX_BUFFER = 8, 2048


@dataclass(frozen=True)
class _Network:
    """The far side of the device's link: frames sent here arrive at the device."""

    name: str = "conformance-network"

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        return True  # what the device transmits is not looked at here


def _applies(caps) -> str | None:
    if not (caps.has(VIRTIO_NET_F_CTRL_VQ) and caps.has(VIRTIO_NET_F_CTRL_VLAN)):
        return "VIRTIO_NET_F_CTRL_VQ and VIRTIO_NET_F_CTRL_VLAN not offered"
    return None


def _tagged(vid: int, tag: bytes) -> bytes:
    inner = tcp_frame(tag * 20)
    return inner[:12] + b"\x81\x00" + struct.pack("!H", vid) + inner[12:]


@check(
    "virtio-1.2:5.1.6.5.3#ctrl-vlan",
    "net, CTRL_VLAN: after VIRTIO_NET_CTRL_VLAN_ADD a frame tagged with that VID is received; one tagged with a VID "
    "not in the table is dropped (SHOULD)",
    devices={"net"},
    transport=PCI,
    applies=_applies,
)
def ctrl_vlan(ctx: PciContext) -> None:
    switch = getattr(ctx.device, "switch", None)
    if switch is None:
        raise NotApplicable("the device under test has no network the check can send frames from")
    ctx.bring_up()
    d = ctx.driver
    ctrl = ctx.num_queues - 1  # the control queue comes after the queue pairs (5.1.2)
    q = d.queues[ctrl]
    q.add_data([struct.pack("<BBH", VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, KEPT_VID)], [1])
    ctx.kick(ctrl)
    used = q.get_used()
    expect(len(used) == 1 and used[0].data[:1] == bytes([VIRTIO_NET_OK]),
           f"VIRTIO_NET_CTRL_VLAN_ADD {KEPT_VID} was not acked VIRTIO_NET_OK ({used})")
    rx = d.queues[0]
    for _ in range(RX_BUFFERS):
        rx.add_data([], [RX_BUFFER])
    ctx.kick(0)
    network = _Network()
    kept, other = new_tag(), new_tag()
    switch.forward(network, _tagged(OTHER_VID, other))
    switch.forward(network, _tagged(KEPT_VID, kept))
    frames = [e.data[NET_HDR_SIZE:] for e in rx.get_used()]
    expect(any(kept in f for f in frames), f"a frame tagged VID {KEPT_VID} (in the filter table) was not received")
    expect(not any(other in f for f in frames), f"a frame tagged VID {OTHER_VID} (not in the filter table) was received")
