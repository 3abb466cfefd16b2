"""Test utilities shipped with the package (used by tests, the bench and the conformance suite)."""

from __future__ import annotations

from typing import Any, Sequence

from iovirt.platform.machine import Platform
from iovirt.timer.testing import fake_multiplexer
from iovirt.virtio.device import VirtioDevice


class RecordingPort:
    """A :class:`~iovirt.virtio.net.switch.SwitchPort` that keeps every frame the switch gives it."""

    def __init__(self, name: str = "recorder") -> None:
        self.name = name
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes, csum: tuple[int, int] | None) -> bool:
        """Record ``frame``."""
        self.frames.append(bytes(frame))
        return True


def fake_clock_platform(devices: Sequence[VirtioDevice], **kwargs: Any) -> Platform:
    """A :class:`Platform` whose vLAPIC timers run on a fake clock (no host timer is opened)."""
    mux, _clock = fake_multiplexer()
    return Platform(devices, mux=mux, **kwargs)
