"""One simple request per device type, for the checks that hold for any device."""

from __future__ import annotations

import os

from iovirt.conformance.devices import BlkPort, NetPort, marker_frame, new_tag
from iovirt.conformance.link import Link
from iovirt.conformance.registry import ANY_DEVICE, expect
from iovirt.conformance.target import Context
from iovirt.memory import BumpAllocator
from iovirt.virtio.blk.defs import SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from iovirt.virtio.driver import UsedElem
from iovirt.virtio.net.defs import NetHdr


class Workload:
    """The data queue of a device and a request that always succeeds on it.

    net: a frame on transmitq1 (receiveq1 is set up too: some back-ends wait
    for the first queue pair before they serve anything).  blk: a one-sector
    read of sector 0 on requestq1.  Other devices (fs) have none: a check that
    needs one must not apply to them (:func:`has_workload`).
    """

    def __init__(self, ctx: Context, link: Link, *, enable: bool = True, call: bool = True, kick: bool = True) -> None:
        if not has_workload(ctx):
            raise ValueError(f"no request the suite can drive on a {ctx.caps.device} device")
        self.ctx = ctx
        self.link = link
        self.net = ctx.caps.device == "net"
        if self.net:
            self.port: NetPort | BlkPort = NetPort(link, enable_rx=enable, enable_tx=enable, call=call, kick=kick)
            self.index = NetPort.TX
        else:
            self.port = BlkPort(link, 0, 64, enable=enable, call=call, kick=kick)
            self.index = 0

    @property
    def queue(self):
        """The data queue's driver side."""
        return self.link.queues[self.index]

    def post(self, *, indirect: bool = False, split: bool = False, alloc: BumpAllocator | None = None) -> int:
        """Make one request available (not published); buffers from ``alloc`` (default: the last region)."""
        alloc = alloc or self.link.alloc
        mem = self.link.memory
        if self.net:
            hdr = NetHdr().pack(self.link.net_hdr_len)
            frame = marker_frame(new_tag())
            pieces = [hdr, frame] if split else [hdr + frame]
            readable = []
            for piece in pieces:
                addr = alloc.alloc(len(piece))
                mem.write(addr, piece)
                readable.append((addr, len(piece)))
            return self.link.add_buffers(self.index, readable, [], indirect=indirect)
        assert isinstance(self.port, BlkPort)
        saved, self.link.alloc = self.link.alloc, alloc
        try:
            head, _data, _status = self.port.post(VIRTIO_BLK_T_IN, 0, in_len=SECTOR_SIZE, indirect=indirect, split=split)
        finally:
            self.link.alloc = saved
        return head

    def run(self, n: int = 1, **options) -> list[UsedElem]:
        """Post ``n`` requests, publish, kick, and wait for all of them."""
        for _ in range(n):
            self.post(**options)
        self.link.submit(self.index)
        return self.link.wait_used(self.index, n)


def has_workload(ctx: Context) -> bool:
    """Whether the device has a :class:`Workload` (net, blk); message-level checks of other devices skip their data part."""
    return ctx.caps.device in ANY_DEVICE


def still_serving(ctx: Context, link: Link, what: str) -> str:
    """After ``what`` on a device without a workload: the back-end must still answer (GET_FEATURES); a report note."""
    link.frontend.get_features()  # no reply or a closed connection fails the check
    acked = "acked" if link.frontend.reply_ack else "accepted (REPLY_ACK not negotiated)"
    return f"{what} {acked}; no data path checked on a {ctx.caps.device} device"


def blk_pattern(nbytes: int) -> bytes:
    """Random data for write/read-back checks."""
    return os.urandom(nbytes)


def expect_ok(status: int, what: str) -> None:
    """The request must have completed with VIRTIO_BLK_S_OK."""
    expect(status == VIRTIO_BLK_S_OK, f"{what}: status {status}, expected VIRTIO_BLK_S_OK (0)")
