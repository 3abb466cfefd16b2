"""Test utilities shipped with the package (used by tests, the bench and conformance)."""

from __future__ import annotations


class RecordingMsiSink:
    """An :class:`~iovirt.pci.msi.MsiSink` that records every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, int, int]] = []

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        """Record ``(source_id, address, data)``."""
        self.messages.append((source_id, address, data))
