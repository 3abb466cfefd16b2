"""The input device (virtio 1.2 section 5.8): a keyboard, mouse or tablet whose events come from Python.

Configuration (5.8.4): the driver writes ``select`` and ``subsel`` and reads
``size`` and the union; the answers come from the device's :class:`Profile`.
A select/subsel pair the device does not know reads ``size`` 0 (5.8.5.2: "The
device MUST set the size field to zero if it doesn't support a given select
and subsel combination").  Only ``select`` and ``subsel`` are writable; a
front-end may write the whole structure (QEMU's vhost-user-input does), the
other bytes are ignored; a write beyond the structure is refused and logged.

Events (5.8.6): :meth:`VirtioInput.press`, :meth:`move`, :meth:`touch`,
:meth:`key` and :meth:`inject` queue one update (events ending with
``EV_SYN``/``SYN_REPORT``) from any thread and wake the transport through
:attr:`wake_fd`; the event queue's buffers take one ``virtio_input_event``
each.  While the driver has posted too few buffers the events wait, at most
:data:`MAX_PENDING`; an update that does not fit whole is dropped whole
(5.8.6.2: the device "SHOULD NOT drop individual input events if they are
part of a sequence") and counted in ``dropped``.  Pending events belong to
one driver: a reset drops them.

Status (5.8.6.1): the driver's events on the status queue (LEDs, repeat
rate) are appended to :attr:`status_events` and passed to
:attr:`on_status`.  One of a type the profile does not offer, or not
exactly one ``virtio_input_event`` long, is logged and dropped; a buffer
the device cannot use (a device-writable event buffer, a short one) is
completed with length 0 and logged.  Each kind of bad input is logged the
first time and counted in :attr:`bad_input` after that.
"""

from __future__ import annotations

import collections
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable

from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.input.defs import (
    ABS_X,
    ABS_Y,
    ABSINFO,
    BTN_LEFT,
    BTN_MIDDLE,
    BTN_RIGHT,
    BTN_TOUCH,
    BUS_VIRTUAL,
    CONFIG_HDR,
    CONFIG_SIZE,
    CONFIG_UNION_SIZE,
    DEVIDS,
    EV_ABS,
    EV_KEY,
    EV_LED,
    EV_REL,
    EV_REP,
    EV_SYN,
    EVENT,
    EVENTQ,
    KEY_MAX_KEYBOARD,
    KEYS,
    LED_CAPSL,
    LED_NUML,
    LED_SCROLLL,
    REL_WHEEL,
    REL_X,
    REL_Y,
    REP_DELAY,
    REP_PERIOD,
    SELECT_OFFSET,
    STATUS_TYPES,
    STATUSQ,
    SUBSEL_OFFSET,
    SYN_REPORT,
    VIRTIO_ID_INPUT,
    VIRTIO_INPUT_CFG_ABS_INFO,
    VIRTIO_INPUT_CFG_EV_BITS,
    VIRTIO_INPUT_CFG_ID_DEVIDS,
    VIRTIO_INPUT_CFG_ID_NAME,
    VIRTIO_INPUT_CFG_ID_SERIAL,
    VIRTIO_INPUT_CFG_PROP_BITS,
)
from iovirt.virtio.queue import SplitQueue

MAX_PENDING = 256
"""Events queued at most while the driver has no buffers posted."""

TABLET_MAX = 0x7FFF  # QEMU's virtio-tablet range too, so guests scale both alike
VENDOR_ID = 0x0627  # the vendor ID QEMU's virtio-input devices report (guest tooling knows it)

Event = tuple[int, int, int]
"""(type, code, value) of one ``virtio_input_event``."""


@dataclass(frozen=True)
class Profile:
    """What a kind of input device answers in its config space (5.8.4)."""

    kind: str
    name: str
    product: int
    ev_bits: dict[int, frozenset[int]]
    """Event type → the codes it carries (EV_BITS subsel = type)."""
    abs_info: dict[int, tuple[int, int, int, int, int]] = field(default_factory=dict)
    """ABS code → (min, max, fuzz, flat, res)."""
    props: frozenset[int] = frozenset()


PROFILES: dict[str, Profile] = {
    "keyboard": Profile(
        "keyboard", "iovirt virtio keyboard", 1,
        {EV_KEY: frozenset(range(1, KEY_MAX_KEYBOARD + 1)), EV_REP: frozenset({REP_DELAY, REP_PERIOD}),
         EV_LED: frozenset({LED_NUML, LED_CAPSL, LED_SCROLLL})},
    ),
    "mouse": Profile(
        "mouse", "iovirt virtio mouse", 2,
        {EV_KEY: frozenset({BTN_LEFT, BTN_RIGHT, BTN_MIDDLE}), EV_REL: frozenset({REL_X, REL_Y, REL_WHEEL})},
    ),
    "tablet": Profile(
        "tablet", "iovirt virtio tablet", 3,
        {EV_KEY: frozenset({BTN_LEFT, BTN_RIGHT, BTN_MIDDLE, BTN_TOUCH}), EV_ABS: frozenset({ABS_X, ABS_Y})},
        {ABS_X: (0, TABLET_MAX, 0, 0, 0), ABS_Y: (0, TABLET_MAX, 0, 0, 0)},
    ),
}
"""The device kinds ``iovirt serve --input SOCKET,kind=...`` offers."""


def _bitmap(bits: Iterable[int]) -> bytes:
    """A little-endian bitmap just long enough for the highest bit (5.8.4: size = bytes used)."""
    out = bytearray()
    for bit in bits:
        if bit // 8 >= len(out):
            out.extend(bytes(bit // 8 + 1 - len(out)))
        out[bit // 8] |= 1 << bit % 8
    return bytes(out)


class VirtioInput(VirtioDevice):
    """A virtio-input device of one :data:`PROFILES` kind."""

    device_id = VIRTIO_ID_INPUT
    name = "virtio-input"

    def __init__(self, kind: str = "keyboard", label: str = "input0", serial: str | None = None,
                 on_status: Callable[[int, int, int], None] | None = None, queue_max_size: int = 256) -> None:
        if kind not in PROFILES:
            raise ValueError(f"input kind must be one of {', '.join(PROFILES)}, got {kind!r}")
        super().__init__(num_queues=2, queue_max_size=queue_max_size, label=label)
        self.profile = PROFILES[kind]
        self.serial = serial if serial is not None else f"iovirt-{label}"
        self.select = 0
        self.subsel = 0
        self.on_status = on_status
        """Called with (type, code, value) of every valid status event, on the data-plane thread."""
        self.status_events: list[Event] = []
        self.dropped = 0
        self.delivered = 0
        self.bad_input: collections.Counter[str] = collections.Counter()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.wake_fd = self._wake_fd
        self._pending: collections.deque[Event] = collections.deque()
        self._lock = threading.Lock()

    # -- config space (5.8.4) --------------------------------------------------------------
    def device_features(self) -> int:
        """5.8.3: no device-specific feature bits."""
        return COMMON_FEATURES

    def answer(self, select: int, subsel: int) -> bytes:
        """The union's bytes for ``select``/``subsel`` (their length is ``size``); ``b""`` if unsupported."""
        p = self.profile
        if select == VIRTIO_INPUT_CFG_ID_NAME and subsel == 0:
            return p.name.encode()[:CONFIG_UNION_SIZE]
        if select == VIRTIO_INPUT_CFG_ID_SERIAL and subsel == 0:
            return self.serial.encode()[:CONFIG_UNION_SIZE]
        if select == VIRTIO_INPUT_CFG_ID_DEVIDS and subsel == 0:
            return DEVIDS.pack(BUS_VIRTUAL, VENDOR_ID, p.product, 1)
        if select == VIRTIO_INPUT_CFG_PROP_BITS and subsel == 0:
            return _bitmap(p.props)
        if select == VIRTIO_INPUT_CFG_EV_BITS:
            return _bitmap(p.ev_bits.get(subsel, ()))
        if select == VIRTIO_INPUT_CFG_ABS_INFO and subsel in p.abs_info:
            return ABSINFO.pack(*p.abs_info[subsel])
        return b""

    def config_space(self) -> bytes:
        """select, subsel, size and the union as selected (5.8.4)."""
        data = self.answer(self.select, self.subsel)
        return CONFIG_HDR.pack(self.select, self.subsel, len(data)) + data.ljust(CONFIG_UNION_SIZE, b"\0")

    def write_config(self, offset: int, data: bytes) -> bool:
        """Take ``select``/``subsel`` from a write; other bytes are read-only and ignored."""
        if offset < 0 or offset + len(data) > CONFIG_SIZE:
            self._bad("config", f"config write of {len(data)} bytes at {offset:#x} goes beyond the "
                                f"{CONFIG_SIZE}-byte virtio_input_config: refused")
            return False
        for field_offset, name in ((SELECT_OFFSET, "select"), (SUBSEL_OFFSET, "subsel")):
            if offset <= field_offset < offset + len(data):
                setattr(self, name, data[field_offset - offset])
        return True

    # -- injecting events (5.8.6) -------------------------------------------------------------
    def inject(self, events: Iterable[Event]) -> bool:
        """Queue one update: ``events`` and then SYN_REPORT; False (and counted) if it was dropped.

        Callable from any thread; codes the profile does not offer raise ``ValueError``.
        """
        update = list(events)
        for type_, code, _value in update:
            if code not in self.profile.ev_bits.get(type_, ()):
                raise ValueError(f"{self.profile.kind}: event type {type_:#x} code {code:#x} is not offered")
        update.append((EV_SYN, SYN_REPORT, 0))
        with self._lock:
            if len(self._pending) + len(update) > MAX_PENDING:
                self.dropped += len(update)
                if self.dropped == len(update):
                    self.log.warning("%s: %d events already wait for event buffers: update dropped (counted)",
                                     self.label, len(self._pending))
                return False
            self._pending.extend(update)
        os.eventfd_write(self._wake_fd, 1)
        return True

    def key(self, code: int, value: int) -> bool:
        """One EV_KEY event (1 down, 0 up, 2 autorepeat) and SYN_REPORT."""
        return self.inject([(EV_KEY, code, value)])

    def press(self, key: str | int) -> bool:
        """Press and release ``key`` (a :data:`~iovirt.virtio.input.defs.KEYS` name or a key code)."""
        code = KEYS[key.lower()] if isinstance(key, str) else key
        return self.key(code, 1) and self.key(code, 0)

    def move(self, dx: int, dy: int) -> bool:
        """A relative move (REL_X, REL_Y; a zero axis is left out)."""
        return self.inject([(EV_REL, axis, d) for axis, d in ((REL_X, dx), (REL_Y, dy)) if d])

    def touch(self, x: int, y: int) -> bool:
        """Touch (and click) the tablet at absolute ``x``, ``y``, then lift."""
        for code, value in ((ABS_X, x), (ABS_Y, y)):
            low, high = self.profile.abs_info.get(code, (0, -1))[:2]
            if not low <= value <= high:
                raise ValueError(f"{self.profile.kind}: {value} is outside the axis range {low}..{high}")
        down = self.inject([(EV_ABS, ABS_X, x), (EV_ABS, ABS_Y, y), (EV_KEY, BTN_TOUCH, 1), (EV_KEY, BTN_LEFT, 1)])
        return down and self.inject([(EV_KEY, BTN_TOUCH, 0), (EV_KEY, BTN_LEFT, 0)])

    @property
    def pending(self) -> int:
        """Events waiting for event buffers."""
        return len(self._pending)

    # -- queues ------------------------------------------------------------------------------------
    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Deliver pending events (eventq), or take the driver's status events (statusq)."""
        if not self.enabled[index]:
            return  # vhost-user "Ring states": a disabled ring has no side effects
        if index == EVENTQ:
            self._deliver(queue)
        elif index == STATUSQ:
            self._take_status(queue)

    def _deliver(self, queue: SplitQueue) -> None:
        used = 0
        with self._lock:
            while self._pending and (chain := queue.pop()) is not None:
                used += 1
                if chain.readable or chain.writable_len < EVENT.size:
                    self._bad("event-buffer", f"event buffer {chain.head} holds {chain.writable_len} device-writable "
                                              f"and {chain.readable_len} device-readable bytes (want "
                                              f"{EVENT.size} writable): completed with length 0")
                    queue.push(chain.head, 0)
                    continue
                queue.push(chain.head, write_chain(queue.memory, chain, EVENT.pack(*self._pending.popleft())))
                self.delivered += 1
        if used:
            self.signal(EVENTQ)

    def _take_status(self, queue: SplitQueue) -> None:
        used = 0
        while (chain := queue.pop()) is not None:
            used += 1
            data = read_chain(queue.memory, chain, EVENT.size + 1)
            queue.push(chain.head, 0)  # 5.8.6.1: status buffers are device-readable; nothing written
            if len(data) != EVENT.size or chain.writable:
                self._bad("status-size", f"status buffer {chain.head} holds {chain.readable_len} readable and "
                                         f"{chain.writable_len} writable bytes, not one {EVENT.size}-byte event: "
                                         "ignored")
                continue
            event = EVENT.unpack(data)
            type_, code, value = event
            if type_ not in STATUS_TYPES or code not in self.profile.ev_bits.get(type_, ()):
                self._bad("status-type", f"status event type {type_:#x} code {code:#x} is not one this "
                                         f"{self.profile.kind} offers: ignored")
                continue
            self.status_events.append(event)
            if self.on_status is not None:
                self.on_status(type_, code, value)
        if used:
            self.signal(STATUSQ)

    def _bad(self, kind: str, text: str) -> None:
        if not self.bad_input[kind]:
            self.log.warning("%s: %s", self.label, text)
        self.bad_input[kind] += 1

    def _reset(self) -> None:
        with self._lock:
            self._pending.clear()
        self.select = self.subsel = 0
