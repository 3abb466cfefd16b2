"""virtio-vsock device requirements of virtio 1.2 section 5.10, checked from the guest driver's side.

Every check plays a guest's transport with :class:`~iovirt.virtio.vsock.driver.VsockDriver`
and needs nothing on the device's host side: a REQUEST goes to a random
port nobody listens on, so the answer is always an RST.
"""

from __future__ import annotations

import random

from iovirt.conformance.registry import check, expect
from iovirt.conformance.target import Context
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.vsock.defs import (
    CONFIG,
    HDR_SIZE,
    RESERVED_CIDS,
    VIRTIO_VSOCK_F_NO_IMPLIED_STREAM,
    VIRTIO_VSOCK_OP_REQUEST,
    VIRTIO_VSOCK_OP_RST,
    VIRTIO_VSOCK_TYPE_STREAM,
    VMADDR_CID_HOST,
    Header,
)
from iovirt.virtio.vsock.driver import VsockDriver

VSOCK = {"vsock"}
UNKNOWN_TYPE = 0x5A  # neither STREAM nor SEQPACKET (5.10.6)


def _guest_cid(drv: VhostUserDriver) -> int:
    return CONFIG.unpack(drv.frontend.get_config(0, CONFIG.size))[0]


def _rst_for(ctx: Context, mutate=None) -> tuple[Header, Header, int]:
    """Send one REQUEST (changed by ``mutate``) to an unused port; return (sent, reply, used length of the reply)."""
    drv = VhostUserDriver(ctx.target.socket, timeout=ctx.timeout)
    try:
        guest = VsockDriver(drv, _guest_cid(drv))
        src, dst = random.randrange(1 << 20, 1 << 21), random.randrange(1 << 29, 1 << 30)
        hdr = guest.header(src, dst, VIRTIO_VSOCK_OP_REQUEST)
        if mutate is not None:
            mutate(hdr)
        guest.send(hdr)
        try:
            reply, payload = guest.wait(lambda p: p[0].dst_port == src, timeout=ctx.timeout)
        except TimeoutError:
            expect(False, f"virtio-1.2 5.10.6: no answer within {ctx.timeout}s to {hdr}")
        return hdr, reply, HDR_SIZE + len(payload)
    finally:
        drv.close()


@check("virtio-1.2:5.10.4#guest-cid", "vsock: guest_cid is a valid guest CID (not 0, 1, 2 or 0xffffffff; upper 32 bits 0)",
       devices=VSOCK)
def guest_cid(ctx: Context) -> None:
    drv = VhostUserDriver(ctx.target.socket, timeout=ctx.timeout)
    try:
        cid = _guest_cid(drv)
    finally:
        drv.close()
    expect(cid >> 32 == 0, f"virtio-1.2 5.10.4: guest_cid {cid:#x} uses the upper 32 bits (reserved, zero)")
    expect(cid not in RESERVED_CIDS, f"virtio-1.2 5.10.4: guest_cid {cid} is reserved")


@check("virtio-1.2:5.10.6#rst-no-listener", "vsock: a connect to a port nobody listens on gets RST, correctly addressed",
       devices=VSOCK)
def rst_no_listener(ctx: Context) -> None:
    sent, reply, _ = _rst_for(ctx)
    expect(reply.op == VIRTIO_VSOCK_OP_RST, f"virtio-1.2 5.10.6.3: got {reply} instead of RST")
    expect(reply.src_cid == VMADDR_CID_HOST and reply.dst_cid == sent.src_cid,
           f"virtio-1.2 5.10.6: reply addressed {reply.src_cid} -> {reply.dst_cid}, "
           f"expected {VMADDR_CID_HOST} -> {sent.src_cid}")
    expect((reply.src_port, reply.dst_port) == (sent.dst_port, sent.src_port),
           f"virtio-1.2 5.10.6: reply ports {reply.src_port} -> {reply.dst_port} do not answer "
           f"{sent.src_port} -> {sent.dst_port}")
    expect(reply.type == VIRTIO_VSOCK_TYPE_STREAM, f"virtio-1.2 5.10.6: reply type {reply.type}, expected STREAM")


@check("virtio-1.2:5.10.6#len", "vsock: a packet's len equals the payload it carries (used length is header + len)",
       devices=VSOCK)
def len_matches_payload(ctx: Context) -> None:
    _, reply, used = _rst_for(ctx)
    expect(reply.len == 0, f"virtio-1.2 5.10.6: RST carries len {reply.len}, expected 0")
    expect(used == HDR_SIZE + reply.len, f"virtio-1.2 5.10.6: used length {used} for a packet of len {reply.len}")


@check("virtio-1.2:5.10.6#unknown-type", "vsock: a packet of an unknown type is answered with RST", devices=VSOCK)
def unknown_type(ctx: Context) -> None:
    def mutate(hdr: Header) -> None:
        hdr.type = UNKNOWN_TYPE

    _, reply, _ = _rst_for(ctx, mutate)
    expect(reply.op == VIRTIO_VSOCK_OP_RST, f"virtio-1.2 5.10.6.3: got {reply} for type {UNKNOWN_TYPE:#x}, expected RST")


@check("virtio-1.2:5.10.6#no-rst-for-rst", "vsock: an RST for no connection is not answered", devices=VSOCK)
def no_rst_for_rst(ctx: Context) -> None:
    drv = VhostUserDriver(ctx.target.socket, timeout=ctx.timeout)
    try:
        guest = VsockDriver(drv, _guest_cid(drv))
        guest.send(guest.header(4242, random.randrange(1 << 29, 1 << 30), VIRTIO_VSOCK_OP_RST))
        got = guest.quiet(ctx.quiet)
    finally:
        drv.close()
    expect(not got, f"virtio-1.2 5.10.6.3: the device answered an RST with {[str(h) for h, _ in got]}")


@check("virtio-1.2:5.10.3#no-implied-stream", "vsock: VIRTIO_VSOCK_F_NO_IMPLIED_STREAM is offered (SHOULD, virtio 1.3)",
       devices=VSOCK)
def offers_no_implied_stream(ctx: Context) -> None:
    expect(ctx.caps.has(VIRTIO_VSOCK_F_NO_IMPLIED_STREAM),
           f"features {ctx.caps.features:#x} lack VIRTIO_VSOCK_F_NO_IMPLIED_STREAM (bit 2): a driver cannot ask for "
           "no implied streams")
