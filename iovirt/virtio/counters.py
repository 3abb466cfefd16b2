"""A device's counters as saved state: plain data, untrusted on restore."""

from __future__ import annotations

import collections
from typing import Any

MAX_COUNTERS = 64
MAX_NAME = 64
MAX_VALUE = (1 << 64) - 1


def restore_counters(data: Any) -> collections.Counter[str]:
    """The counters in ``data`` (a name → count mapping); ``ValueError`` if they are not counters."""
    if not isinstance(data, dict) or len(data) > MAX_COUNTERS:
        raise ValueError(f"counters must be an object of at most {MAX_COUNTERS} names")
    counters: collections.Counter[str] = collections.Counter()
    for name, value in data.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"counter name {name!r} is not 1..{MAX_NAME} characters")
        if type(value) is not int or not 0 <= value <= MAX_VALUE:
            raise ValueError(f"counter {name} = {value!r} is not an integer in [0, 2**64)")
        counters[name] = value
    return counters
