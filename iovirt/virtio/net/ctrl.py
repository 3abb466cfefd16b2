"""virtio-net's control virtqueue where iovirt serves it: the in-process transport (virtio 1.2 5.1.6.5).

Under vhost-user the front-end (QEMU, DPDK virtio-user) serves the control
queue itself and never passes the VLAN table on, so only a device made with
``VirtioNet(..., ctrl_vq=True)`` and driven in-process
(:mod:`iovirt.platform`) has one.  It is the last queue, after the receive
and transmit pairs (5.1.2).

A command is ``struct virtio_net_ctrl``: ``u8 class``, ``u8 command`` and
the command's data in device-readable buffers, then ``u8 ack`` in a
device-writable one (``VIRTIO_NET_OK`` or ``VIRTIO_NET_ERR``).  Served:

- ``VIRTIO_NET_CTRL_VLAN`` (5.1.6.5.3) ``_ADD`` / ``_DEL`` with a le16 VLAN
  id: the device's VLAN filter table.  While ``VIRTIO_NET_F_CTRL_VLAN`` is
  negotiated the table starts empty and a received frame tagged with a VID
  not in it is dropped (as QEMU's virtio-net does); untagged frames always
  pass.
- ``VIRTIO_NET_CTRL_MQ`` ``_VQ_PAIRS_SET`` (5.1.6.5.5): accepted within
  1..max_virtqueue_pairs (the device already spreads over the enabled pairs).

Anything else, or a command of the wrong size, is answered ``VIRTIO_NET_ERR``.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.net import vlan
from iovirt.virtio.queue import SplitQueue

if TYPE_CHECKING:
    from iovirt.virtio.net.device import VirtioNet

VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL = 0, 1
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
MAX_COMMAND = 64  # the longest command read: the ones served carry 2 bytes of data
VLAN_IDS = 4096  # 5.1.6.5.3: the table covers every 12-bit VLAN id

_LE16 = struct.Struct("<H")


class NetCtrl:
    """The control queue of one :class:`~iovirt.virtio.net.device.VirtioNet`; holds its VLAN filter table."""

    def __init__(self, device: "VirtioNet") -> None:
        self.device = device
        self.vlans: set[int] = set()

    def reset(self) -> None:
        """A device reset empties the table."""
        self.vlans.clear()

    def allows(self, frame: bytes) -> bool:
        """Whether the VLAN filter lets ``frame`` through (untagged, or tagged with a VID in the table)."""
        if frame[12:14] != vlan.TPID or len(frame) < vlan.TAGGED_HLEN:
            return True
        return int.from_bytes(frame[14:16], "big") & vlan.VID_MASK in self.vlans

    def process(self, index: int, queue: SplitQueue) -> None:
        """Serve every available command and signal the driver once."""
        served = 0
        while (chain := queue.pop()) is not None:
            ack = VIRTIO_NET_ERR
            if chain.writable_len >= 1 and 2 <= chain.readable_len <= MAX_COMMAND:
                ack = self._command(read_chain(queue.memory, chain, MAX_COMMAND))
            else:
                self.device.log.warning("%s: malformed control command (%d bytes in, %d out); answered ERR",
                                        self.device.label, chain.readable_len, chain.writable_len)
            written = write_chain(queue.memory, chain, bytes([ack])) if chain.writable_len else 0
            queue.push(chain.head, written)
            served += 1
        if served:
            self.device.signal(index)

    def _command(self, data: bytes) -> int:
        cls, command, payload = data[0], data[1], data[2:]
        if cls == VIRTIO_NET_CTRL_VLAN and command in (VIRTIO_NET_CTRL_VLAN_ADD, VIRTIO_NET_CTRL_VLAN_DEL):
            if len(payload) != _LE16.size:
                return VIRTIO_NET_ERR
            (vid,) = _LE16.unpack(payload)
            if vid >= VLAN_IDS:
                return VIRTIO_NET_ERR
            if command == VIRTIO_NET_CTRL_VLAN_ADD:
                self.vlans.add(vid)
            else:
                self.vlans.discard(vid)
            return VIRTIO_NET_OK
        if cls == VIRTIO_NET_CTRL_MQ and command == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and len(payload) == _LE16.size:
            (pairs,) = _LE16.unpack(payload)
            return VIRTIO_NET_OK if 1 <= pairs <= self.device.queue_pairs else VIRTIO_NET_ERR
        return VIRTIO_NET_ERR
