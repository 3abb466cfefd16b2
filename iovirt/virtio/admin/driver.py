"""The driver side of an administration virtqueue (virtio 1.4 2.13): build commands, read their completions.

:class:`AdminClient` wraps a :class:`~iovirt.virtio.driver.DriverQueue` set
up at ``admin_queue_index`` and a callable that notifies it; the tests and
the conformance checks use it as Linux's ``virtio_pci_admin_*`` helpers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from iovirt.virtio.admin.defs import ADMIN_CMD_HDR, ADMIN_CMD_RESULT_HDR, ADMIN_CMD_RESULT_HDR_SIZE
from iovirt.virtio.driver import DriverQueue, DriverQueueError


@dataclass(frozen=True)
class AdminCompletion:
    """One completed command: ``status``, ``status_qualifier``, the result bytes and the used length."""

    status: int
    qualifier: int
    result: bytes
    used_len: int
    written: bytes
    """Every byte the device wrote (status header included), as reported by the used length."""


def admin_cmd(opcode: int, group_type: int, member: int = 0, data: bytes = b"") -> bytes:
    """The device-readable part of ``struct virtio_admin_cmd``."""
    return ADMIN_CMD_HDR.pack(opcode, group_type, member) + data


class AdminClient:
    """Send group administration commands on ``queue``; ``notify`` sends its available-buffer notification."""

    def __init__(self, queue: DriverQueue, notify: Callable[[], None]) -> None:
        self.queue = queue
        self.notify = notify

    def submit(self, requests: Sequence[tuple[bytes, int]]) -> list[AdminCompletion]:
        """Queue ``(readable bytes, writable size)`` chains in order, notify once, return completions in used order."""
        for readable, room in requests:
            self.queue.add_data([readable], [room])
        self.queue.publish()
        self.notify()
        used = self.queue.get_used()
        if len(used) != len(requests):
            raise DriverQueueError(f"administration queue: {len(used)} of {len(requests)} commands completed", self.queue.index)
        out = []
        for elem in used:
            header = elem.data[:ADMIN_CMD_RESULT_HDR_SIZE].ljust(ADMIN_CMD_RESULT_HDR_SIZE, b"\0")
            status, qualifier = ADMIN_CMD_RESULT_HDR.unpack(header)
            out.append(AdminCompletion(status, qualifier, elem.data[ADMIN_CMD_RESULT_HDR_SIZE:], elem.len, elem.data))
        return out

    def command(
        self, opcode: int, group_type: int, member: int = 0, data: bytes = b"", result_size: int = 0
    ) -> AdminCompletion:
        """Send one command with room for ``result_size`` bytes of ``command_specific_result``."""
        return self.submit([(admin_cmd(opcode, group_type, member, data), ADMIN_CMD_RESULT_HDR_SIZE + result_size)])[0]
