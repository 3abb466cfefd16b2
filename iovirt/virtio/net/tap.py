"""A TAP uplink: a switch port whose other side is the host's network stack.

The TAP device is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` so every
frame crosses with a 12-byte ``virtio_net_hdr`` in front (``TUNSETVNETHDRSZ``):
a frame a guest sent with ``NEEDS_CSUM`` reaches the kernel with its checksum
still partial, and the kernel's own partial checksums (``TUNSETOFFLOAD``
``TUN_F_CSUM``) reach the guests the same way.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from typing import TYPE_CHECKING

from iovirt.errors import IovirtError
from iovirt.virtio.net.defs import NET_HDR_SIZE, VIRTIO_NET_HDR_F_NEEDS_CSUM, NetHdr
from iovirt.virtio.net.switch import LearningSwitch

if TYPE_CHECKING:
    from iovirt.virtio.net.nat import Nat

log = logging.getLogger("iovirt.tap")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
READ_BATCH = 64


class TapError(IovirtError):
    """The TAP device could not be opened or configured."""


class TapPort:
    """A switch port backed by a Linux TAP device.

    Its "switch" is the learning switch (bridged uplink) or, in NAT mode, the
    router's outside interface (:class:`~iovirt.virtio.net.nat.Nat`).
    """

    def __init__(self, ifname: str, switch: "LearningSwitch | Nat") -> None:
        self.name = f"tap:{ifname}"
        self.ifname = ifname
        self.switch = switch
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise TapError(f"cannot open /dev/net/tun: {exc}") from exc
        try:
            ifr = struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", NET_HDR_SIZE))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM)
        except OSError as exc:
            os.close(self.fd)
            raise TapError(f"cannot set up TAP {ifname}: {exc}") from exc
        self.stats = {"rx": 0, "tx": 0, "dropped": 0}
        switch.attach(self)

    def close(self) -> None:
        """Leave the switch and close the TAP fd."""
        self.switch.detach(self)
        os.close(self.fd)

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """A frame from the switch goes to the host stack, its partial checksum with it."""
        hdr = NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=csum[0], csum_offset=csum[1]) if csum else NetHdr()
        try:
            os.write(self.fd, hdr.pack() + frame)
        except OSError as exc:
            self.stats["dropped"] += 1
            log.debug("%s: write failed: %s", self.name, exc)
            return False
        self.stats["tx"] += 1
        return True

    def on_readable(self) -> None:
        """Frames from the host stack go into the switch (called by the data plane)."""
        for _ in range(READ_BATCH):
            try:
                data = os.read(self.fd, 65536 + NET_HDR_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("%s: read failed: %s", self.name, exc)
                return
            if len(data) <= NET_HDR_SIZE:
                continue
            hdr = NetHdr.unpack(data[:NET_HDR_SIZE])
            csum = (hdr.csum_start, hdr.csum_offset) if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM else None
            self.stats["rx"] += 1
            self.switch.forward(self, data[NET_HDR_SIZE:], csum)
