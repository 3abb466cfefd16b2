"""``iovirt serve --control PATH``: the control socket of a serving process, with runtime add-net/add-blk.

New devices are made as ``serve`` makes them at start: a net port on the
process's switch with the next label (``netN``) and the MAC ``serve``
gives port N; a blk device ``blkN`` on a raw image; both with the access
options and vIOMMU support of the devices given on the command line.
"""

from __future__ import annotations

import argparse

from iovirt.control.commands import ControlContext
from iovirt.control.server import ControlServer
from iovirt.vhost_user.server import Endpoint, VhostUserServer
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch


def port_mac(index: int) -> bytes:
    """The MAC of net port ``index`` (0-based): 52:54:00:10:hi:lo of index + 1, as ``serve`` numbers them."""
    number = index + 1
    return bytes([0x52, 0x54, 0x00, 0x10, number >> 8 & 0xFF, number & 0xFF])


def _next_index(server: VhostUserServer, prefix: str) -> int:
    """One past the highest ``<prefix>N`` label in use: labels are never reused while a device holds one."""
    used = [int(label[len(prefix):]) for label in (e.device.device.label for e in server.endpoints)
            if label.startswith(prefix) and label[len(prefix):].isdigit()]
    return max(used, default=-1) + 1


def serve_control(server: VhostUserServer, switch: LearningSwitch | None, args: argparse.Namespace) -> ControlServer:
    """Open the control socket ``args.control`` (mode ``args.control_mode``) on ``server``'s loop."""
    sealed, queues, mtu = args.require_sealed_memory, args.queues, args.mtu
    counter = {"net": _next_index(server, "net"), "blk": _next_index(server, "blk")}

    def new_net(path: str) -> Endpoint:
        index = max(counter["net"], _next_index(server, "net"))
        port = VirtioNet(port_mac(index), switch, queue_pairs=queues, mtu=mtu, label=f"net{index}")
        try:
            endpoint = server.add_socket(path, port, name=f"net{index} ({path})", iommu=True,
                                         require_sealed_memory=sealed)
        except BaseException:
            if switch is not None:
                switch.detach(port)
            raise
        counter["net"] = index + 1
        return endpoint

    def new_blk(path: str, image: str, read_only: bool) -> Endpoint:
        index = max(counter["blk"], _next_index(server, "blk"))
        disk = VirtioBlk(image, read_only=read_only, label=f"blk{index}")
        try:
            endpoint = server.add_socket(path, disk, name=f"blk{index} ({path})", iommu=True,
                                         require_sealed_memory=sealed)
        except BaseException:
            disk.close()
            raise
        counter["blk"] = index + 1
        return endpoint

    ctx = ControlContext(server, switch, new_net if switch is not None else None, new_blk)
    return ControlServer(ctx, args.control, args.control_mode)
