"""Device state over SET_DEVICE_STATE_FD: iovirt's stream format and the transfer on the channel.

vhost-user.rst "Migrating back-end state" leaves the bytes to the back-end:
the source back-end writes its state into the channel and closes it, the
destination reads to end of file, deserializes, and says in
CHECK_DEVICE_STATE whether that worked.  The stream is untrusted on load
(it went through two front-ends and maybe a file), so it says what it is:

======  =====  ==========================================================
offset  size   field (little-endian)
======  =====  ==========================================================
0       8      magic ``b"IOVIRTDS"``
8       2      format version (:data:`FORMAT_VERSION`)
10      2      virtio device ID of the device saved (virtio 1.2 section 5)
12      4      reserved, 0
16      4      payload length
20      4      CRC-32 (zlib) of the payload
24      ...    payload: a UTF-8 JSON object, the device's plain-data state
======  =====  ==========================================================

:func:`decode` refuses a stream that is truncated, corrupt (magic, CRC,
JSON), from another device type or from a newer format version, with a
:class:`DeviceStateError` naming which.  Whether the fields make sense for
the destination device is the device's to check (``restore`` on the virtio
device, reached through its adapter's ``load_state``).

:class:`Transfer` moves the bytes without blocking the control loop: a save
that fits the channel (a pipe holds 64 KiB) is written at once, the rest of
a save and every load go through a helper thread that gives up after
:data:`TRANSFER_TIMEOUT_S`, so a front-end that never reads or never closes
costs a thread for that long, never the loop.
"""

from __future__ import annotations

import enum
import fcntl
import json
import os
import select
import struct
import threading
import time
import zlib
from typing import Any

from iovirt.errors import IovirtError
from iovirt.vhost_user.messages import TransferDirection

MAGIC = b"IOVIRTDS"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHIII")
MAX_STATE_BYTES = 1 << 20
"""The largest payload accepted on load (a net port's state is a few hundred bytes)."""

TRANSFER_TIMEOUT_S = 10.0
"""How long a transfer's helper thread waits for the front-end before it gives up."""
_POLL_S = 0.1  # how often the helper thread looks for a cancel
_CHUNK = 1 << 16


class Problem(enum.Enum):
    """Why a device-state stream was refused."""

    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    DEVICE_TYPE = "from another device type"
    VERSION = "from a newer format version"
    VALUE = "out of range"
    TRANSFER = "transfer failed"


class DeviceStateError(IovirtError):
    """A device-state stream or transfer refused; ``problem`` says which kind of wrong."""

    def __init__(self, problem: Problem, detail: str) -> None:
        super().__init__(f"device state {problem.value}: {detail}")
        self.problem = problem
        self.detail = detail


# -- the format -------------------------------------------------------------------------


def encode(device_id: int, state: dict[str, Any]) -> bytes:
    """The stream for ``state`` (JSON-serializable plain data) of a virtio ``device_id`` device."""
    payload = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, FORMAT_VERSION, device_id, 0, len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes, device_id: int) -> dict[str, Any]:
    """The state in ``data`` for a virtio ``device_id`` device; raises :class:`DeviceStateError`."""
    if len(data) < HEADER.size:
        raise DeviceStateError(Problem.TRUNCATED, f"{len(data)} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, saved_id, reserved, length, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DeviceStateError(Problem.CORRUPT, f"magic {magic!r}, expected {MAGIC!r}")
    if version > FORMAT_VERSION:
        raise DeviceStateError(
            Problem.VERSION, f"format version {version}; this back-end reads versions up to {FORMAT_VERSION}"
        )
    if version == 0 or reserved:
        raise DeviceStateError(Problem.CORRUPT, f"format version {version}, reserved field {reserved:#x}")
    if saved_id != device_id:
        raise DeviceStateError(
            Problem.DEVICE_TYPE, f"saved from a device of virtio ID {saved_id}, loaded into virtio ID {device_id}"
        )
    if length > MAX_STATE_BYTES:
        raise DeviceStateError(Problem.CORRUPT, f"payload length {length} above the {MAX_STATE_BYTES}-byte limit")
    payload = data[HEADER.size:]
    if len(payload) < length:
        raise DeviceStateError(Problem.TRUNCATED, f"payload of {len(payload)} bytes, the header says {length}")
    if len(payload) > length:
        raise DeviceStateError(Problem.CORRUPT, f"{len(payload) - length} bytes after the {length}-byte payload")
    if zlib.crc32(payload) != crc:
        raise DeviceStateError(Problem.CORRUPT, f"payload CRC-32 {zlib.crc32(payload):#010x}, header says {crc:#010x}")
    try:
        state = json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DeviceStateError(Problem.CORRUPT, f"payload is not UTF-8 JSON: {exc}") from exc
    if not isinstance(state, dict):
        raise DeviceStateError(Problem.CORRUPT, f"payload is a JSON {type(state).__name__}, not an object")
    return state


# -- the transfer -----------------------------------------------------------------------------


def check_channel(fd: int, direction: TransferDirection) -> None:
    """Refuse an fd that cannot be written (save) or read (load) before it is taken over."""
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise DeviceStateError(Problem.TRANSFER, f"fd {fd}: {exc}") from exc
    wanted = os.O_WRONLY if direction is TransferDirection.SAVE else os.O_RDONLY
    if mode not in (wanted, os.O_RDWR):
        end = "writable" if direction is TransferDirection.SAVE else "readable"
        raise DeviceStateError(Problem.TRANSFER, f"fd {fd} is not {end} (the channel's wrong end?)")


class Transfer:
    """One SET_DEVICE_STATE_FD transfer on the front-end's channel ``fd``, which it owns and closes.

    Save writes ``data`` then closes the channel (the end of the state);
    load reads until end of file into :attr:`received`.  :meth:`wait` says
    whether it finished; then :attr:`error` is ``None`` or what went wrong.
    """

    def __init__(self, fd: int, direction: TransferDirection, data: bytes = b"", label: str = "",
                 timeout: float = TRANSFER_TIMEOUT_S) -> None:
        self.fd = fd
        self.direction = direction
        self.received = bytearray()
        self.error: str | None = None
        self._data = memoryview(data)
        self._sent = 0
        self._timeout = timeout
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._label = label

    def start(self) -> None:
        """Begin: a save that fits the channel finishes here, anything else goes on a helper thread."""
        try:
            os.set_blocking(self.fd, False)
            if self.direction is TransferDirection.SAVE and self._step():
                self._finish()
                return
        except (OSError, DeviceStateError) as exc:
            self._finish(str(exc))
            return
        threading.Thread(target=self._run, name=f"device-state {self._label}", daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """Whether the transfer finished (successfully or not) within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Stop the helper thread at its next look (it closes the channel)."""
        self._cancel.set()

    def _run(self) -> None:
        error: str | None = None
        deadline = time.monotonic() + self._timeout
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT if self.direction is TransferDirection.SAVE else select.POLLIN)
        try:
            while True:
                if self._cancel.is_set():
                    raise DeviceStateError(Problem.TRANSFER, "cancelled (the session ended or a new transfer began)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeviceStateError(
                        Problem.TRANSFER, f"the front-end did not {self._peer_job()} within {self._timeout} s"
                    )
                if poller.poll(min(left, _POLL_S) * 1000) and self._step():
                    break
        except (OSError, DeviceStateError) as exc:
            error = str(exc)
        self._finish(error)

    def _step(self) -> bool:
        """One non-blocking write or read; True once the transfer is complete."""
        try:
            if self.direction is TransferDirection.SAVE:
                self._sent += os.write(self.fd, self._data[self._sent:self._sent + _CHUNK])
                return self._sent == len(self._data)
            chunk = os.read(self.fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except BrokenPipeError as exc:
            raise DeviceStateError(
                Problem.TRANSFER, f"the front-end closed the channel after {self._sent} of {len(self._data)} bytes"
            ) from exc
        if not chunk:
            return True
        self.received += chunk
        if len(self.received) > MAX_STATE_BYTES + HEADER.size:
            raise DeviceStateError(Problem.CORRUPT, f"more than {MAX_STATE_BYTES + HEADER.size} bytes of state")
        return False

    def _peer_job(self) -> str:
        return "read the state" if self.direction is TransferDirection.SAVE else "close its end after the state"

    def _finish(self, error: str | None = None) -> None:
        self.error = error
        try:
            # Closing our end is the end of the state for the reader (spec: "signalling the end of data").
            os.close(self.fd)
        except OSError as exc:
            self.error = self.error or f"closing the channel: {exc}"
        self._done.set()
