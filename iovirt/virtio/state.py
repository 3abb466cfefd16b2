"""Saved state of a virtqueue (split or packed): plain data, untrusted on restore."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class QueueState:
    """Everything needed to resume a split virtqueue where it stopped.

    The only format shared by the reference and the accelerated queue. It is
    re-validated by ``SplitQueue.from_state`` (it may come from a file or a
    migration stream).
    """

    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int = 0
    used_idx: int = 0
    event_idx: bool = False
    index: int = 0
    in_order: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QueueState":
        """Build from a plain dict; unknown or missing keys raise ``TypeError``."""
        return cls(**data)
