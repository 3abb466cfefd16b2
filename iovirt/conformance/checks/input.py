"""virtio-input device requirements of virtio 1.2 section 5.8 (configuration and the status queue).

The event queue's content depends on what happens at the device's end (keys
pressed); these checks read what the driver can always see: the
select/subsel answers and the status queue.
"""

from __future__ import annotations

from iovirt.conformance.link import Link
from iovirt.conformance.registry import NotApplicable, check, expect
from iovirt.conformance.target import Context, needs_protocol
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.input.defs import (
    ABSINFO,
    CONFIG_SIZE,
    CONFIG_UNION_SIZE,
    DEVIDS,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_REL,
    EVENT,
    EVENTQ,
    STATUSQ,
    VIRTIO_INPUT_CFG_ABS_INFO,
    VIRTIO_INPUT_CFG_EV_BITS,
    VIRTIO_INPUT_CFG_ID_DEVIDS,
    VIRTIO_INPUT_CFG_ID_NAME,
)

INPUT = {"input"}
_config = needs_protocol(PF.VHOST_USER_PROTOCOL_F_CONFIG)


def select(link: Link, sel: int, subsel: int = 0) -> bytes:
    """The union's first ``size`` bytes after writing ``sel``/``subsel``, as Linux's driver reads them."""
    link.frontend.set_config(0, bytes([sel, subsel]))
    cfg = link.frontend.get_config(0, CONFIG_SIZE)
    expect(cfg[0] == sel and cfg[1] == subsel, f"select/subsel read back {cfg[0]:#x}/{cfg[1]:#x}, "
                                               f"wrote {sel:#x}/{subsel:#x}")
    expect(cfg[2] <= CONFIG_UNION_SIZE, f"size {cfg[2]} is larger than the {CONFIG_UNION_SIZE}-byte union")
    return cfg[8 : 8 + cfg[2]]


@check("virtio-1.2:5.8.5.2#size-zero", "input: an unsupported select/subsel reads size 0", devices=INPUT,
       applies=_config)
def unknown_select(ctx: Context) -> None:
    link = ctx.open()
    for sel, subsel in ((0x00, 0x00), (0x04, 0x00), (0x7F, 0x00), (0xFF, 0xFF), (VIRTIO_INPUT_CFG_ID_NAME, 0x01)):
        got = select(link, sel, subsel)
        expect(got == b"", f"select {sel:#x} subsel {subsel:#x}: size {len(got)}, want 0")


@check("virtio-1.2:5.8.4#ids", "input: ID_NAME is a non-empty string; ID_DEVIDS, when given, holds all four ids",
       devices=INPUT, applies=_config)
def ids(ctx: Context) -> None:
    link = ctx.open()
    name = select(link, VIRTIO_INPUT_CFG_ID_NAME)
    expect(name != b"" and b"\0" not in name, f"ID_NAME {name!r}")
    devids = select(link, VIRTIO_INPUT_CFG_ID_DEVIDS)
    expect(devids == b"" or len(devids) >= DEVIDS.size, f"ID_DEVIDS size {len(devids)}, want 0 or {DEVIDS.size}")


@check("virtio-1.2:5.8.4#ev-bits", "input: EV_BITS reports at least one event type; every ABS axis has ABS_INFO",
       devices=INPUT, applies=_config)
def ev_bits(ctx: Context) -> None:
    link = ctx.open()
    bitmaps = {t: select(link, VIRTIO_INPUT_CFG_EV_BITS, t) for t in (EV_KEY, EV_REL, EV_ABS)}
    expect(any(any(b) for b in bitmaps.values()), "no EV_KEY, EV_REL or EV_ABS codes: not an input device")
    axes = [i * 8 + b for i, byte in enumerate(bitmaps[EV_ABS]) for b in range(8) if byte >> b & 1]
    for axis in axes:
        info = select(link, VIRTIO_INPUT_CFG_ABS_INFO, axis)
        expect(len(info) >= ABSINFO.size, f"ABS_INFO of axis {axis:#x}: size {len(info)}, want {ABSINFO.size}")
        low, high = ABSINFO.unpack_from(info)[:2]
        expect(low <= high, f"ABS_INFO of axis {axis:#x}: min {low} > max {high}")


@check("virtio-1.2:5.8.6.1#status", "input: the device uses the driver's status events (LEDs)", devices=INPUT,
       applies=_config)
def status(ctx: Context) -> None:
    link = ctx.open()
    leds = select(link, VIRTIO_INPUT_CFG_EV_BITS, EV_LED)
    if not any(leds):
        raise NotApplicable("no EV_LED codes offered: no status events to send")
    led = next(i * 8 + b for i, byte in enumerate(leds) for b in range(8) if byte >> b & 1)
    link.queue(EVENTQ, 64)
    link.queue(STATUSQ, 64)
    link.driver_ok()
    for value in (1, 0):
        link.add(STATUSQ, [EVENT.pack(EV_LED, led, value)])
    link.submit(STATUSQ)
    for got in link.wait_used(STATUSQ, 2):
        expect(got.len == 0, f"status buffer {got.head}: used len {got.len} for a device-readable buffer, want 0")
