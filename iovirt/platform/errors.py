"""Errors of the in-process platform and its drivers (raising APIs, like a guest driver's probe)."""

from __future__ import annotations

from iovirt.errors import IovirtError


class PlatformError(IovirtError):
    """The platform cannot do what was asked (out of vectors, no such device)."""


class VirtioDriverError(IovirtError):
    """A device refused a bring-up step; ``step`` names it, ``status`` is ``device_status`` then."""

    def __init__(self, step: str, detail: str, status: int) -> None:
        super().__init__(f"virtio-pci driver {step}: {detail} (device_status {status:#x})")
        self.step = step
        self.detail = detail
        self.status = status
