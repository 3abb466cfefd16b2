"""An owner device's administration virtqueue and the group administration command rules (virtio 1.4 2.12.1, 2.13).

:class:`AdminVirtqueue` serves one administration virtqueue for the groups an
owner device controls (:class:`AdminGroup`: the SR-IOV group of a PF is
:class:`~iovirt.sriov.admin.SriovAdminGroup`).  A transport drives it as it
drives a device's queue (start, enable, kick, stop, reset); it knows neither
the transport nor the devices it controls, only its groups.

What it enforces itself, for every group type (2.12.1.5):

- validation order: an unknown ``group_type`` fails with
  VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP, then an opcode the group does not
  support or the driver has not put in use (VIRTIO_ADMIN_CMD_LIST_USE) with
  VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE, then what the group says of the
  member (the group itself answers that);
- the commands in use start, after every reset, as VIRTIO_ADMIN_CMD_LIST_QUERY
  and VIRTIO_ADMIN_CMD_LIST_USE; LIST_USE replaces them (a list naming an
  unsupported opcode fails with INVALID_FIELD and changes nothing); group
  types keep separate lists;
- a failing command changes nothing.

And the buffer rules of 2.13.1: readable bytes missing from a short buffer
read as zero, extra ones are ignored; the result is cut to the writable
buffer and the used length says how much was written; every command gets
``status`` and ``status_qualifier``; commands run in queue order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from iovirt.errors import IovirtError
from iovirt.memory import GuestMemory
from iovirt.virtio.admin.defs import (
    ADMIN_CMD_HDR,
    ADMIN_CMD_HDR_SIZE,
    ADMIN_CMD_RESULT_HDR,
    VIRTIO_ADMIN_CMD_LIST_QUERY,
    VIRTIO_ADMIN_CMD_LIST_USE,
    VIRTIO_ADMIN_STATUS_EINVAL,
    VIRTIO_ADMIN_STATUS_OK,
    VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD,
    VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP,
    VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE,
    opcode_bitmap,
    opcodes_of,
)
from iovirt.virtio.chain import read_chain, write_chain
from iovirt.virtio.queue import SplitQueue
from iovirt.virtio.state import QueueState

log = logging.getLogger(__name__)

ADMIN_QUEUE_SIZE = 64
"""The administration virtqueue's maximum size."""
MAX_COMMAND_BYTES = 4096
"""Device-readable bytes read per command; no command of iovirt's groups needs more (2.13.1: the rest is ignored)."""

LIST_COMMANDS = frozenset({VIRTIO_ADMIN_CMD_LIST_QUERY, VIRTIO_ADMIN_CMD_LIST_USE})
"""The commands in use after a reset (2.12.1.5)."""


@dataclass(frozen=True)
class AdminResult:
    """What a command completes with: ``status``, ``status_qualifier`` and ``command_specific_result``."""

    status: int = VIRTIO_ADMIN_STATUS_OK
    qualifier: int = 0
    data: bytes = b""

    @property
    def ok(self) -> bool:
        """The command completed successfully."""
        return self.status == VIRTIO_ADMIN_STATUS_OK


def einval(qualifier: int) -> AdminResult:
    """A command failed as invalid (VIRTIO_ADMIN_STATUS_EINVAL) for the reason ``qualifier``."""
    return AdminResult(VIRTIO_ADMIN_STATUS_EINVAL, qualifier)


@dataclass(frozen=True)
class AdminCommand:
    """One decoded ``struct virtio_admin_cmd``: its device-readable part and the writable room for its result."""

    opcode: int
    group_type: int
    group_member_id: int
    data: bytes
    """``command_specific_data``: whatever the driver supplied after the header."""
    result_room: int
    """Bytes of ``command_specific_result`` the writable buffer has room for."""


class AdminGroup(Protocol):
    """A group an owner device controls: its type, its commands, its members."""

    group_type: int

    def supported(self) -> frozenset[int]:
        """The opcodes this group serves besides VIRTIO_ADMIN_CMD_LIST_QUERY and LIST_USE (never shrinks)."""
        ...

    def execute(self, command: AdminCommand) -> AdminResult:
        """Run a command the queue has validated (group type, opcode in use); the group checks the member."""
        ...

    def reset(self) -> None:
        """The owner device was reset."""
        ...


@dataclass
class _GroupState:
    group: AdminGroup
    in_use: frozenset[int] = field(default=LIST_COMMANDS)


class AdminVirtqueue:
    """The administration virtqueue of an owner device serving ``groups`` (one per group type).

    ``on_error`` is called with the problem when a chain is malformed (the
    owner device then needs a reset, 2.1.2).
    """

    def __init__(self, groups: Sequence[AdminGroup], label: str = "admin") -> None:
        self.groups = {g.group_type: _GroupState(g) for g in groups}
        self.label = label
        self.queue: SplitQueue | None = None
        self.notify: Callable[[], None] | None = None
        self.enabled = False
        self.on_error: Callable[[Exception], None] | None = None
        self.commands = 0

    # -- queue lifecycle, driven by the transport ------------------------------------
    def start_queue(self, memory: GuestMemory, state: QueueState, notify: Callable[[], None]) -> None:
        """Start serving the ring described by ``state``; ``notify`` sends its used-buffer notification."""
        self.queue = SplitQueue.from_state(memory, state)
        self.notify = notify

    def set_enabled(self, enabled: bool) -> None:
        """The driver may use the queue (DRIVER_OK with the queue enabled)."""
        self.enabled = enabled

    def stop_queue(self) -> None:
        """Stop serving the ring (queue reset or device reset)."""
        if self.queue is not None:
            self.queue.release()
        self.queue = None
        self.notify = None
        self.enabled = False

    def reset(self) -> None:
        """Owner device reset: the ring stops, every group's commands in use go back to LIST_QUERY/LIST_USE."""
        self.stop_queue()
        for state in self.groups.values():
            state.in_use = LIST_COMMANDS
            state.group.reset()

    def kick(self) -> None:
        """The driver notified the queue: run every available command, in order (2.13.1)."""
        queue = self.queue
        if queue is None or not self.enabled:
            return
        served = 0
        try:
            while (chain := queue.pop()) is not None:
                request = read_chain(queue.memory, chain, min(chain.readable_len, MAX_COMMAND_BYTES))
                room = chain.writable_len
                reply = self.reply(request, room)
                queue.push(chain.head, write_chain(queue.memory, chain, reply[:room]))
                served += 1
        except IovirtError as exc:
            log.error("%s: malformed administration queue chain: %s; device needs reset", self.label, exc)
            self.stop_queue()
            if self.on_error is not None:
                self.on_error(exc)
            return
        if served and self.notify is not None and queue.need_notify():
            self.notify()

    # -- commands ----------------------------------------------------------------------
    def reply(self, request: bytes, room: int) -> bytes:
        """The device-writable part for the device-readable ``request`` (zero-padded if short), ``room`` bytes of it wanted."""
        padded = request.ljust(ADMIN_CMD_HDR_SIZE, b"\0")
        opcode, group_type, member = ADMIN_CMD_HDR.unpack_from(padded)
        command = AdminCommand(opcode, group_type, member, request[ADMIN_CMD_HDR_SIZE:],
                               max(room - ADMIN_CMD_RESULT_HDR.size, 0))
        result = self.execute(command)
        self.commands += 1
        if not result.ok:
            log.info("%s: command %#x (group type %d, member %d) failed: status %d, qualifier %d",
                     self.label, opcode, group_type, member, result.status, result.qualifier)
        return ADMIN_CMD_RESULT_HDR.pack(result.status, result.qualifier) + result.data

    def execute(self, command: AdminCommand) -> AdminResult:
        """Validate ``command`` (2.12.1.5) and run it."""
        state = self.groups.get(command.group_type)
        if state is None:
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_GROUP)
        supported = LIST_COMMANDS | state.group.supported()
        if command.opcode not in supported or command.opcode not in state.in_use:
            return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_OPCODE)
        if command.opcode == VIRTIO_ADMIN_CMD_LIST_QUERY:
            return AdminResult(data=opcode_bitmap(supported))
        if command.opcode == VIRTIO_ADMIN_CMD_LIST_USE:
            wanted = opcodes_of(command.data)
            if wanted - supported:
                log.warning("%s: LIST_USE names unsupported opcodes %s; list unchanged",
                            self.label, sorted(wanted - supported))
                return einval(VIRTIO_ADMIN_STATUS_Q_INVALID_FIELD)
            state.in_use = wanted
            return AdminResult()
        return state.group.execute(command)
