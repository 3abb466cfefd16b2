"""The VT-d tests' guest memory layout and MSI sink (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass, field

MEM_SIZE = 0x1000000  # 16 MiB: data below 8 MiB, driver tables above
TABLES_BASE = 0x800000
TABLES_SIZE = 0x800000


@dataclass
class RecordingSink:
    """An MsiSink that keeps every MSI it is given."""

    msis: list[tuple[int, int, int]] = field(default_factory=list)

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        self.msis.append((source_id, address, data))
