"""virtio-input (virtio 1.2 section 5.8) served over vhost-user to iovirt's own front-end."""

from __future__ import annotations

import logging
import os
import struct
import time

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.errors import VhostUserError
from iovirt.vhost_user.messages import ProtocolFeature as PF
from iovirt.virtio.input.defs import (
    ABS_X,
    ABS_Y,
    ABSINFO,
    BTN_LEFT,
    BTN_TOUCH,
    BUS_VIRTUAL,
    CONFIG_SIZE,
    DEVIDS,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_REL,
    EV_REP,
    EV_SYN,
    EVENT,
    KEYS,
    LED_CAPSL,
    REL_X,
    REL_Y,
    VIRTIO_INPUT_CFG_ABS_INFO,
    VIRTIO_INPUT_CFG_EV_BITS,
    VIRTIO_INPUT_CFG_ID_DEVIDS,
    VIRTIO_INPUT_CFG_ID_NAME,
    VIRTIO_INPUT_CFG_ID_SERIAL,
    VIRTIO_INPUT_CFG_PROP_BITS,
)
from iovirt.virtio.input.device import MAX_PENDING, TABLET_MAX, VirtioInput
from iovirt.virtio.queue import is_accelerated

EVENTQ, STATUSQ = 0, 1


def select(drv, sel: int, subsel: int = 0) -> tuple[int, bytes]:
    """Write select/subsel, read size and the union as Linux's virtinput_cfg_select does."""
    drv.frontend.set_config(0, bytes([sel, subsel]))
    cfg = drv.frontend.get_config(0, CONFIG_SIZE)
    assert cfg[0] == sel and cfg[1] == subsel
    return cfg[2], cfg[8:]


def bit(bitmap: bytes, n: int) -> bool:
    return n // 8 < len(bitmap) and bool(bitmap[n // 8] >> n % 8 & 1)


def events(drv, queue, n, timeout=5.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        drv.frontend.wait_call(EVENTQ, timeout=0.1)
        got += queue.get_used()
    return [EVENT.unpack(u.data) for u in got]


def post(drv, queue, n, size=EVENT.size):
    for _ in range(n):
        queue.add_data([], [size])
    drv.kick(EVENTQ)


def test_keyboard_config_answers(serve):
    with VhostUserDriver(serve(VirtioInput("keyboard", label="kbd"))) as drv:
        assert drv.protocol_features >> PF.VHOST_USER_PROTOCOL_F_CONFIG & 1  # QEMU's vhost-user-input needs it
        size, u = select(drv, VIRTIO_INPUT_CFG_ID_NAME)
        assert u[:size] == b"iovirt virtio keyboard"
        size, u = select(drv, VIRTIO_INPUT_CFG_ID_SERIAL)
        assert u[:size] == b"iovirt-kbd"
        size, u = select(drv, VIRTIO_INPUT_CFG_ID_DEVIDS)
        assert size == DEVIDS.size and DEVIDS.unpack(u[:size])[0] == BUS_VIRTUAL
        size, u = select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_KEY)
        assert all(bit(u[:size], KEYS[k]) for k in ("a", "enter", "esc", "f12")) and not bit(u[:size], 0)
        assert select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_REP)[0] > 0  # Linux turns autorepeat on when size != 0
        size, u = select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_LED)
        assert bit(u[:size], LED_CAPSL)
        assert select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_REL)[0] == 0
        assert select(drv, VIRTIO_INPUT_CFG_PROP_BITS)[0] == 0


def test_mouse_and_tablet_config_answers(serve):
    with VhostUserDriver(serve(VirtioInput("mouse"))) as drv:
        size, u = select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_REL)
        assert bit(u[:size], REL_X) and bit(u[:size], REL_Y)
        size, u = select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_KEY)
        assert bit(u[:size], BTN_LEFT) and not bit(u[:size], KEYS["a"])
        assert select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_ABS)[0] == 0
    with VhostUserDriver(serve(VirtioInput("tablet"))) as drv:
        size, u = select(drv, VIRTIO_INPUT_CFG_EV_BITS, EV_ABS)
        assert bit(u[:size], ABS_X) and bit(u[:size], ABS_Y)
        for axis in (ABS_X, ABS_Y):
            size, u = select(drv, VIRTIO_INPUT_CFG_ABS_INFO, axis)
            assert size == ABSINFO.size and ABSINFO.unpack(u[:size])[:2] == (0, TABLET_MAX)
        assert select(drv, VIRTIO_INPUT_CFG_ABS_INFO, 0x05)[0] == 0  # an axis it does not have


def test_unknown_select_reads_size_zero(serve):
    with VhostUserDriver(serve(VirtioInput())) as drv:
        for sel, subsel in ((0x00, 0), (0x04, 0), (0xFF, 0xFF), (VIRTIO_INPUT_CFG_ID_NAME, 1)):
            size, u = select(drv, sel, subsel)
            assert size == 0 and u == bytes(128)  # 5.8.5.2


def test_whole_structure_write_sets_select_as_qemu_does(serve):
    with VhostUserDriver(serve(VirtioInput())) as drv:
        drv.frontend.set_config(0, bytes([VIRTIO_INPUT_CFG_ID_NAME, 0, 99]) + bytes(CONFIG_SIZE - 3))
        cfg = drv.frontend.get_config(0, CONFIG_SIZE)
        assert cfg[2] == len(b"iovirt virtio keyboard")  # size is the device's, not the 99 written


def test_oversized_config_write_is_refused_with_one_log_line(serve, caplog):
    dev = VirtioInput()
    with VhostUserDriver(serve(dev)) as drv, caplog.at_level(logging.WARNING, logger="iovirt"):
        for _ in range(2):
            with pytest.raises(VhostUserError):
                drv.frontend.set_config(0, bytes([VIRTIO_INPUT_CFG_ID_NAME]) + bytes(CONFIG_SIZE + 8))
        assert dev.select == 0  # nothing taken from a refused write
        size, u = select(drv, VIRTIO_INPUT_CFG_ID_SERIAL)  # and the device still answers
        assert size > 0
    assert sum("beyond" in r.getMessage() and "virtio-input" in r.name for r in caplog.records) == 1
    assert not any(r.exc_info for r in caplog.records)


def test_press_and_move_reach_the_event_queue(serve):
    kbd, mouse = VirtioInput("keyboard"), VirtioInput("mouse")
    with VhostUserDriver(serve(kbd)) as drv:
        (queue, _status) = drv.start_queues([EVENTQ, STATUSQ], size=64).values()
        assert is_accelerated(kbd.queues[0]) == (os.environ.get("IOVIRT_NO_EXTENSIONS") != "1")
        post(drv, queue, 8)
        assert kbd.press("a")
        a = KEYS["a"]
        assert events(drv, queue, 4) == [(EV_KEY, a, 1), (EV_SYN, 0, 0), (EV_KEY, a, 0), (EV_SYN, 0, 0)]
    with VhostUserDriver(serve(mouse)) as drv:
        (queue, _status) = drv.start_queues([EVENTQ, STATUSQ], size=64).values()
        post(drv, queue, 8)
        mouse.move(10, -5)
        assert events(drv, queue, 3) == [(EV_REL, REL_X, 10), (EV_REL, REL_Y, -5), (EV_SYN, 0, 0)]
        with pytest.raises(ValueError):
            mouse.press("a")  # not a key this mouse has


def test_touch_on_the_tablet(serve):
    tablet = VirtioInput("tablet")
    with VhostUserDriver(serve(tablet)) as drv:
        (queue, _status) = drv.start_queues([EVENTQ, STATUSQ], size=64).values()
        post(drv, queue, 16)
        tablet.touch(100, 200)
        assert events(drv, queue, 8) == [
            (EV_ABS, ABS_X, 100), (EV_ABS, ABS_Y, 200), (EV_KEY, BTN_TOUCH, 1), (EV_KEY, BTN_LEFT, 1), (EV_SYN, 0, 0),
            (EV_KEY, BTN_TOUCH, 0), (EV_KEY, BTN_LEFT, 0), (EV_SYN, 0, 0),
        ]
        with pytest.raises(ValueError):
            tablet.touch(TABLET_MAX + 1, 0)


def test_events_wait_for_buffers_bounded_and_dropped_whole(serve):
    kbd = VirtioInput()
    with VhostUserDriver(serve(kbd)) as drv:
        (queue, _status) = drv.start_queues([EVENTQ, STATUSQ], size=256).values()
        kbd.press("b")  # no buffers yet: queued
        time.sleep(0.05)
        assert kbd.pending == 4
        post(drv, queue, 2)  # half of it now
        assert events(drv, queue, 2) == [(EV_KEY, KEYS["b"], 1), (EV_SYN, 0, 0)]
        post(drv, queue, 2)
        assert events(drv, queue, 2) == [(EV_KEY, KEYS["b"], 0), (EV_SYN, 0, 0)]
        ok = [kbd.key(KEYS["c"], 1) for _ in range(MAX_PENDING)]  # two events per update
        assert ok.count(True) == MAX_PENDING // 2 and kbd.dropped == 2 * ok.count(False)
        assert kbd.pending == MAX_PENDING


def test_status_events_reach_python(serve, caplog):
    seen = []
    kbd = VirtioInput(on_status=lambda *e: seen.append(e))
    with VhostUserDriver(serve(kbd)) as drv, caplog.at_level(logging.WARNING, logger="iovirt"):
        (_events, status) = drv.start_queues([EVENTQ, STATUSQ], size=64).values()
        bad = [status.add_data([EVENT.pack(0x42, 0, 1)]), status.add_data([EVENT.pack(EV_KEY, 30, 1)]),
               status.add_data([EVENT.pack(EV_LED, LED_CAPSL, 1)[:6]])]
        good = status.add_data([EVENT.pack(EV_LED, LED_CAPSL, 1)])
        drv.kick(STATUSQ)
        used = []
        deadline = time.monotonic() + 5
        while len(used) < 4 and time.monotonic() < deadline:
            drv.frontend.wait_call(STATUSQ, timeout=0.1)
            used += status.get_used()
        assert [(u.head, u.len) for u in used] == [(h, 0) for h in [*bad, good]]
        assert seen == [(EV_LED, LED_CAPSL, 1)] and kbd.status_events == seen
        assert kbd.bad_input["status-type"] == 2 and kbd.bad_input["status-size"] == 1
        assert not kbd.needs_reset
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("virtio-input")]
    assert len(lines) == 2, lines  # one per kind of bad input
    assert any("type 0x42" in line for line in lines)


def test_unusable_event_buffer_gets_length_zero(serve):
    kbd = VirtioInput()
    with VhostUserDriver(serve(kbd)) as drv:
        (queue, _status) = drv.start_queues([EVENTQ, STATUSQ], size=64).values()
        short = queue.add_data([], [4])
        drv.kick(EVENTQ)
        post(drv, queue, 2)
        kbd.key(KEYS["x"], 1)
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            drv.frontend.wait_call(EVENTQ, timeout=0.1)
            got += queue.get_used()
        assert (got[0].head, got[0].len) == (short, 0)
        assert [struct.unpack("<HHi", u.data) for u in got[1:]] == [(EV_KEY, KEYS["x"], 1), (EV_SYN, 0, 0)]
