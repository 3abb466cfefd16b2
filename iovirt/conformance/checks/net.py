"""virtio-net device requirements of virtio 1.2 section 5.1."""

from __future__ import annotations

import struct

from iovirt.conformance.devices import Received, marker_frame, new_tag
from iovirt.conformance.link import Link
from iovirt.conformance.registry import CheckFailed, check, expect
from iovirt.conformance.target import Context, needs_feature, needs_frame_path, needs_protocol
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.net.defs import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_MAC_ADDR,
    VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_VLAN,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_HOST_USO,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU,
    VIRTIO_NET_F_RSC_EXT,
    VIRTIO_NET_F_RSS,
    VIRTIO_NET_HDR_GSO_NONE,
)

NET = {"net"}

# 5.1.3.1 Feature bit requirements: feature -> (alternatives it requires, its name)
REQUIRES: dict[int, tuple[tuple[int, ...], str]] = {
    VIRTIO_NET_F_GUEST_TSO4: ((VIRTIO_NET_F_GUEST_CSUM,), "GUEST_TSO4"),
    VIRTIO_NET_F_GUEST_TSO6: ((VIRTIO_NET_F_GUEST_CSUM,), "GUEST_TSO6"),
    VIRTIO_NET_F_GUEST_ECN: ((VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6), "GUEST_ECN"),
    VIRTIO_NET_F_GUEST_UFO: ((VIRTIO_NET_F_GUEST_CSUM,), "GUEST_UFO"),
    VIRTIO_NET_F_HOST_TSO4: ((VIRTIO_NET_F_CSUM,), "HOST_TSO4"),
    VIRTIO_NET_F_HOST_TSO6: ((VIRTIO_NET_F_CSUM,), "HOST_TSO6"),
    VIRTIO_NET_F_HOST_ECN: ((VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6), "HOST_ECN"),
    VIRTIO_NET_F_HOST_UFO: ((VIRTIO_NET_F_CSUM,), "HOST_UFO"),
    VIRTIO_NET_F_HOST_USO: ((VIRTIO_NET_F_CSUM,), "HOST_USO"),
    VIRTIO_NET_F_CTRL_RX: ((VIRTIO_NET_F_CTRL_VQ,), "CTRL_RX"),
    VIRTIO_NET_F_CTRL_VLAN: ((VIRTIO_NET_F_CTRL_VQ,), "CTRL_VLAN"),
    VIRTIO_NET_F_GUEST_ANNOUNCE: ((VIRTIO_NET_F_CTRL_VQ,), "GUEST_ANNOUNCE"),
    VIRTIO_NET_F_MQ: ((VIRTIO_NET_F_CTRL_VQ,), "MQ"),  # CTRL_VQ is bit 17
    VIRTIO_NET_F_CTRL_MAC_ADDR: ((VIRTIO_NET_F_CTRL_VQ,), "CTRL_MAC_ADDR"),
    VIRTIO_NET_F_RSC_EXT: ((VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6), "RSC_EXT"),
    VIRTIO_NET_F_RSS: ((VIRTIO_NET_F_CTRL_VQ,), "RSS"),
}


@check(
    "virtio-1.2:5.1.3.1",
    "net: no feature is offered without the features it requires (2.2.2: MUST NOT)",
    devices=NET,
)
def feature_dependencies(ctx: Context) -> None:
    caps = ctx.caps
    missing = [
        f"{name} (bit {bit}) without {' or '.join(f'bit {b}' for b in needs)}"
        for bit, (needs, name) in REQUIRES.items()
        if caps.has(bit) and not any(caps.has(b) for b in needs)
    ]
    expect(not missing, "offered " + "; ".join(missing) + f" (features {caps.features:#x})")


def _round_trip(
    ctx: Context, *, features: int = (1 << 64) - 1, size: int = 60, rx_buffer: int = 2048
) -> tuple[Link, bytes, Received]:
    """Open a link, post receive buffers of ``rx_buffer`` bytes and have a ``size``-byte frame delivered to them."""
    link = ctx.open(features=features)
    dut = ctx.net_port(link, rx_buffers=0)
    dut.post_rx(16, rx_buffer)
    injector, _sink = ctx.net_ends(dut)
    tag = new_tag()
    frame = marker_frame(tag, size)
    injector.send([frame])
    got = dut.receive(tag, ctx.timeout)
    if got is None:
        raise CheckFailed(f"the {size}-byte frame sent towards the device was not received")
    return link, frame, got


@check(
    "virtio-1.2:5.1.6.4.1#num_buffers",
    "net: without MRG_RXBUF and GUEST_CSUM, received headers carry num_buffers 1, flags 0, gso_type NONE",
    devices=NET,
    applies=needs_frame_path,
)
def rx_header(ctx: Context) -> None:
    mask = ~((1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4)
             | (1 << VIRTIO_NET_F_GUEST_TSO6) | (1 << VIRTIO_NET_F_GUEST_UFO))
    _link, _frame, got = _round_trip(ctx, features=mask)
    expect(got.hdr.num_buffers == 1, f"num_buffers {got.hdr.num_buffers}, expected 1 without MRG_RXBUF")
    expect(got.hdr.flags == 0, f"header flags {got.hdr.flags:#x}, expected 0 without GUEST_CSUM")
    expect(got.hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE, f"gso_type {got.hdr.gso_type}, expected NONE without GUEST_TSO")


@check(
    "virtio-1.2:5.1.6",
    "net: with VERSION_1 the header is 12 bytes and the frame follows it unchanged",
    devices=NET,
    applies=needs_frame_path,
)
def header_size(ctx: Context) -> None:
    link, frame, got = _round_trip(ctx, features=~(1 << VIRTIO_NET_F_MRG_RXBUF))
    expect(link.net_hdr_len == 12, "VERSION_1 not negotiated")
    expect(got.frame[: len(frame)] == frame, "the received frame differs from the one sent (header size confusion?)")
    expect(got.lens[0] >= 12 + len(frame), f"used len {got.lens[0]} < 12-byte header + {len(frame)}-byte frame")


@check(
    "virtio-1.2:5.1.6.4.1#mrg_rxbuf",
    "net: with MRG_RXBUF, num_buffers counts the buffers used and all but the last are full",
    devices=NET,
    applies=lambda caps: needs_feature(VIRTIO_NET_F_MRG_RXBUF, "VIRTIO_NET_F_MRG_RXBUF")(caps) or needs_frame_path(caps),
)
def mrg_rxbuf(ctx: Context) -> None:
    link, frame, got = _round_trip(ctx, size=300, rx_buffer=64)
    expect(link.negotiated.has(VIRTIO_NET_F_MRG_RXBUF), "MRG_RXBUF offered but not negotiated")
    expect(got.hdr.num_buffers == len(got.lens), f"num_buffers {got.hdr.num_buffers}, {len(got.lens)} buffers used")
    expect(len(got.lens) >= 5, f"a 312-byte packet in 64-byte buffers used {len(got.lens)} buffers, expected 5")
    expect(all(n == 64 for n in got.lens[:-1]), f"buffer lengths {got.lens}: all but the last must be full (64)")
    expect(got.frame[: len(frame)] == frame, "the merged frame differs from the one sent")


@check(
    "virtio-1.2:5.1.6.2",
    "net: transmitted frames leave the device unchanged",
    devices=NET,
    applies=needs_frame_path,
)
def transmit(ctx: Context) -> None:
    link = ctx.open()
    dut = ctx.net_port(link)
    _injector, sink = ctx.net_ends(dut)
    tag = new_tag()
    frame = marker_frame(tag, 1000)
    dut.send([frame], split=True)
    got = sink.receive(tag, ctx.timeout)
    if got is None:
        raise CheckFailed("a transmitted frame never left the device")
    expect(got.frame[: len(frame)] == frame, "the frame left the device modified")
    dut.tx_done(1)


@check(
    "virtio-1.2:5.1.4.1",
    "net: config max_virtqueue_pairs (MQ) and mtu (MTU) within the spec's ranges",
    devices=NET,
    applies=needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG),
)
def net_config(ctx: Context) -> None:
    config = ctx.open().frontend.get_config(0, 12)
    pairs, mtu = struct.unpack_from("<HH", config, 8)
    if ctx.caps.has(VIRTIO_NET_F_MQ):
        expect(1 <= pairs <= 0x8000, f"max_virtqueue_pairs {pairs}, expected 1..0x8000")
    if ctx.caps.has(VIRTIO_NET_F_MTU):
        expect(68 <= mtu <= 65535, f"mtu {mtu}, expected 68..65535")

