"""Feature-bit rules a back-end's offer shows (virtio 1.4 section 2.2, cited as 1.2's) and the
vhost-user protocol features it SHOULD implement.
"""

from __future__ import annotations

from iovirt.conformance.checks.common import Workload
from iovirt.conformance.registry import PROTOCOL_DEVICES, check, expect
from iovirt.conformance.target import Context
from iovirt.vhost_user import bringup
from iovirt.vhost_user.messages import VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, ProtocolFeature as PF


def _bits(*ranges: tuple[int, int], single: tuple[int, ...] = ()) -> int:
    return sum(1 << b for lo, hi in ranges for b in range(lo, hi + 1)) | sum(1 << b for b in single)


# virtio 1.4 2.2: 24..40 and 43 are transport bits (those defined: 24, 27..29, 32..41, 43), 44..49
# reserved for future extensions; vhost-user.rst adds bit 30 (VHOST_USER_F_PROTOCOL_FEATURES) and
# bit 26 (VHOST_F_LOG_ALL, the dirty log for migration).
TRANSPORT_DEFINED = _bits((27, 29), (32, 41), single=(24, 43, VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES))
# 5.1.3 net and 5.2.3 blk, legacy bits included (net GSO 6, GUEST_RSC4/6 41/42; blk BARRIER 0, SCSI 7);
# 5.11.3 fs: VIRTIO_FS_F_NOTIFICATION (0).
DEVICE_DEFINED = {
    "net": _bits((0, 3), (5, 23), (41, 42), (50, 57), (59, 63)),
    "blk": _bits((0, 2), (4, 7), (9, 17)),
    "fs": _bits(single=(0,)),
}


@check(
    "virtio-1.2:2.2#reserved",
    "no feature bit offered that the spec does not define for the device type",
    devices=PROTOCOL_DEVICES,
)
def reserved_bits(ctx: Context) -> None:
    defined = TRANSPORT_DEFINED | DEVICE_DEFINED[ctx.caps.device]
    stray = ctx.caps.features & ~defined
    bits = [b for b in range(64) if stray >> b & 1]
    expect(not bits, f"offered feature bits {bits} that virtio 1.4 does not define for a {ctx.caps.device} device")


@check(
    "vhost-user:Multiple queue support",
    "the back-end offers VHOST_USER_PROTOCOL_F_MQ (SHOULD, even with a fixed number of queues)",
    devices=PROTOCOL_DEVICES,
)
def offers_mq(ctx: Context) -> None:
    expect(ctx.caps.has(VHOST_USER_F_PROTOCOL_FEATURES), "VHOST_USER_F_PROTOCOL_FEATURES not offered, so neither is MQ")
    expect(
        ctx.caps.has_protocol(PF.VHOST_USER_PROTOCOL_F_MQ),
        f"protocol features {ctx.caps.protocol_features:#x} lack VHOST_USER_PROTOCOL_F_MQ (bit 0)",
    )


@check(
    "virtio-1.2:2.2.2#renegotiate",
    "a feature set negotiated once is accepted again by a new front-end (reconnect), and the device works",
)
def renegotiate(ctx: Context) -> None:
    first = ctx.open()
    Workload(ctx, first).run(2)
    features = first.negotiated.features
    ctx.close_link(first)
    again = ctx.open()
    expect(
        again.negotiated.features == features,
        f"features {again.negotiated.features:#x} after reconnecting, {features:#x} before",
    )
    if again.has_status:
        status = again.frontend.get_status()
        expect(
            status & bringup.FEATURES_OK_STATUS == bringup.FEATURES_OK_STATUS,
            f"device status {status:#x} lacks FEATURES_OK after renegotiating the same features",
        )
    Workload(ctx, again).run(2)
