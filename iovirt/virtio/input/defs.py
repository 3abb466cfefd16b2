"""virtio-input constants (virtio 1.2 section 5.8) and the Linux input event codes it carries.

The event types and codes are Linux's (``include/uapi/linux/input-event-codes.h``),
which 5.8.6 says virtio-input events use.
"""

from __future__ import annotations

import struct

VIRTIO_ID_INPUT = 18  # 5 Device Types
EVENTQ = 0  # 5.8.2
STATUSQ = 1

# 5.8.4 Device configuration layout: enum virtio_input_config_select
VIRTIO_INPUT_CFG_UNSET = 0x00
VIRTIO_INPUT_CFG_ID_NAME = 0x01
VIRTIO_INPUT_CFG_ID_SERIAL = 0x02
VIRTIO_INPUT_CFG_ID_DEVIDS = 0x03
VIRTIO_INPUT_CFG_PROP_BITS = 0x10
VIRTIO_INPUT_CFG_EV_BITS = 0x11
VIRTIO_INPUT_CFG_ABS_INFO = 0x12

CONFIG_HDR = struct.Struct("<BBB5x")  # select, subsel, size, reserved[5]
CONFIG_UNION_SIZE = 128  # the union u: string[128] / bitmap[128] / absinfo / devids
CONFIG_SIZE = CONFIG_HDR.size + CONFIG_UNION_SIZE  # 136
SELECT_OFFSET, SUBSEL_OFFSET = 0, 1
ABSINFO = struct.Struct("<iiiii")  # struct virtio_input_absinfo: min, max, fuzz, flat, res
DEVIDS = struct.Struct("<HHHH")  # struct virtio_input_devids: bustype, vendor, product, version
EVENT = struct.Struct("<HHi")  # 5.8.6 struct virtio_input_event: type, code, value

# Linux event types
EV_SYN = 0x00
EV_KEY = 0x01
EV_REL = 0x02
EV_ABS = 0x03
EV_MSC = 0x04
EV_LED = 0x11
EV_SND = 0x12
EV_REP = 0x14
EV_FF = 0x15
STATUS_TYPES = frozenset({EV_LED, EV_SND, EV_REP, EV_FF})
"""Types a driver sends on the status queue (5.8.6.1: LEDs, sounds, repeat rate, force feedback)."""

SYN_REPORT = 0
REL_X, REL_Y, REL_WHEEL = 0x00, 0x01, 0x08
ABS_X, ABS_Y = 0x00, 0x01
BTN_LEFT, BTN_RIGHT, BTN_MIDDLE = 0x110, 0x111, 0x112
BTN_TOUCH = 0x14A
LED_NUML, LED_CAPSL, LED_SCROLLL = 0x00, 0x01, 0x02
REP_DELAY, REP_PERIOD = 0x00, 0x01
INPUT_PROP_POINTER, INPUT_PROP_DIRECT = 0x00, 0x01
BUS_VIRTUAL = 0x06
KEY_MAX_KEYBOARD = 0xFF  # the keyboard profile reports keys 1..255 (KEY_ESC .. the last "normal" key)

KEYS: dict[str, int] = {
    "esc": 1, "1": 2, "2": 3, "3": 4, "4": 5, "5": 6, "6": 7, "7": 8, "8": 9, "9": 10, "0": 11,
    "minus": 12, "equal": 13, "backspace": 14, "tab": 15,
    "q": 16, "w": 17, "e": 18, "r": 19, "t": 20, "y": 21, "u": 22, "i": 23, "o": 24, "p": 25,
    "leftbrace": 26, "rightbrace": 27, "enter": 28, "leftctrl": 29,
    "a": 30, "s": 31, "d": 32, "f": 33, "g": 34, "h": 35, "j": 36, "k": 37, "l": 38,
    "semicolon": 39, "apostrophe": 40, "grave": 41, "leftshift": 42, "backslash": 43,
    "z": 44, "x": 45, "c": 46, "v": 47, "b": 48, "n": 49, "m": 50,
    "comma": 51, "dot": 52, "slash": 53, "rightshift": 54, "leftalt": 56, "space": 57, "capslock": 58,
    "f1": 59, "f2": 60, "f3": 61, "f4": 62, "f5": 63, "f6": 64, "f7": 65, "f8": 66, "f9": 67, "f10": 68,
    "numlock": 69, "scrolllock": 70, "f11": 87, "f12": 88, "rightctrl": 97, "rightalt": 100,
    "home": 102, "up": 103, "pageup": 104, "left": 105, "right": 106, "end": 107, "down": 108,
    "pagedown": 109, "insert": 110, "delete": 111,
}
"""Key names (Linux ``KEY_*`` without the prefix, lower case) to key codes, for ``press``."""
