"""virtio-net's device parts (virtio 1.4 5.1.8 "Device parts"): configuration done through the control queue.

VIRTIO_NET_DEV_PART_CVQ_CFG_PART (0x200) has one part per configuration,
selected by ``struct virtio_net_dev_part_cvq_selector`` (u8 class, u8
command, u8 reserved[6]); its value is the command's data.  iovirt's
control queue keeps one such configuration, the VLAN filter table
(:mod:`iovirt.virtio.net.ctrl`): selector VIRTIO_NET_CTRL_VLAN /
VIRTIO_NET_CTRL_VLAN_ADD, whose part "consists of a whole VLAN table" --
here a 4096-bit bitmap, bit ``vid % 8`` of byte ``vid // 8`` (512 bytes), as
QEMU keeps it.  A device without a control queue (an SR-IOV VF of
:mod:`iovirt.sriov.virtio_net`) has no net parts.
"""

from __future__ import annotations

import struct

from iovirt.virtio.admin.device_parts import DevicePart
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.net.ctrl import VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, VLAN_IDS
from iovirt.virtio.net.device import VirtioNet

VIRTIO_NET_DEV_PART_CVQ_CFG_PART = 0x200
CVQ_SELECTOR = struct.Struct("<BB6x")  # struct virtio_net_dev_part_cvq_selector
VLAN_TABLE_SELECTOR = CVQ_SELECTOR.pack(VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD)
VLAN_TABLE_LEN = VLAN_IDS // 8


def _ctrl_vlans(device: VirtioDevice) -> set[int] | None:
    """The VLAN table of a net device with a control queue (NetParts serves net devices only)."""
    assert isinstance(device, VirtioNet)
    return None if device.ctrl is None else device.ctrl.vlans


class NetParts:
    """The net parts of a :class:`~iovirt.virtio.net.device.VirtioNet` (the VLAN table, with a control queue)."""

    def capture(self, device: VirtioDevice) -> list[DevicePart]:
        """The VLAN table part, if the device has a control queue."""
        vlans = _ctrl_vlans(device)
        if vlans is None:
            return []
        bits = sum(1 << vid for vid in vlans)
        return [DevicePart(VIRTIO_NET_DEV_PART_CVQ_CFG_PART, bits.to_bytes(VLAN_TABLE_LEN, "little"),
                           VLAN_TABLE_SELECTOR)]

    def problem(self, device: VirtioDevice, part: DevicePart) -> str | None:
        """Only the VLAN table part of a device with a control queue, 512 bytes long."""
        if part.part_type != VIRTIO_NET_DEV_PART_CVQ_CFG_PART or part.selector != VLAN_TABLE_SELECTOR:
            return "not a net part this device has"
        if _ctrl_vlans(device) is None:
            return "the device has no control queue"
        if len(part.value) != VLAN_TABLE_LEN:
            return f"VLAN table of {len(part.value)} bytes, the device's is {VLAN_TABLE_LEN}"
        return None

    def apply(self, device: VirtioDevice, part: DevicePart) -> None:
        """Replace the VLAN table."""
        vlans = _ctrl_vlans(device)
        assert vlans is not None
        bits = int.from_bytes(part.value, "little")
        vlans.clear()
        vlans.update(vid for vid in range(VLAN_IDS) if bits >> vid & 1)

