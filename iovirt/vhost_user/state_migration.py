"""SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE for one session (vhost-user.rst "Migrating back-end state").

The stream format and the byte transfer are :mod:`iovirt.vhost_user.devstate`'s;
this module applies the two requests to one device: it refuses them while a
ring runs (the only phase is "stopped"), starts the save or load, and on
CHECK_DEVICE_STATE reports how the transfer ended and, for a load, applies
the state through the device's adapter.
"""

from __future__ import annotations

import logging

from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.devstate import DeviceStateError, Problem, Transfer, check_channel, decode, encode
from iovirt.vhost_user.device import VhostUserDevice
from iovirt.vhost_user.errors import RequestRefused
from iovirt.vhost_user.messages import FrontendRequest as R, TransferDirection
from iovirt.vhost_user.vrings import Vrings

log = logging.getLogger("iovirt.vhost_user")

CHECK_WAIT_S = 1.0
"""How long CHECK_DEVICE_STATE waits for a transfer's last bytes (the front-end has finished its side)."""


class StateMigration:
    """The device-state transfer of one session, if one is under way."""

    def __init__(self, label: str, device: VhostUserDevice, vrings: Vrings, dataplane: DataPlane) -> None:
        self.label = label
        self.device = device
        self.vrings = vrings
        self.dataplane = dataplane  # its lock is held while requests are handled
        self.transfer: Transfer | None = None

    def start(self, fd: int, direction: TransferDirection) -> None:
        """Save the device's state into the front-end's channel ``fd``, or start loading it from there.

        The bytes move in a :class:`~iovirt.vhost_user.devstate.Transfer`
        (on a helper thread when they do not fit the channel at once) while
        the control loop goes on; :meth:`check` reports how it ended.
        """
        code = R.VHOST_USER_SET_DEVICE_STATE_FD
        # Spec: the only phase is "stopped": the device is suspended, every ring stopped.
        if self.vrings.any_started:
            raise RequestRefused(code, "rings are started; device state moves only while every ring is stopped")
        try:
            check_channel(fd, direction)
            saving = direction is TransferDirection.SAVE
            data = encode(self.device.device_id, self.device.save_state()) if saving else b""
        except (DeviceStateError, TypeError, ValueError) as exc:
            raise RequestRefused(code, str(exc)) from exc
        self.drop()  # a new transfer replaces one the front-end gave up on
        self.transfer = Transfer(fd, direction, data, self.label)
        self.transfer.start()
        log.info("%s: device state %s started (%s)", self.label, direction.name.lower(),
                 f"{len(data)} bytes" if data else "reading to end of file")

    def check(self) -> None:
        """Return only when the transfer completed and, for a load, the state was valid and applied."""
        code = R.VHOST_USER_CHECK_DEVICE_STATE
        transfer, self.transfer = self.transfer, None
        if transfer is None:
            raise RequestRefused(code, "no device state transfer to check (SET_DEVICE_STATE_FD first)")
        direction = transfer.direction.name.lower()
        if not self._finished(transfer):
            transfer.cancel()
            raise RequestRefused(code, f"device state {direction} has not finished: the front-end must "
                                       f"{'read to end of file' if direction == 'save' else 'close its end'} first")
        if transfer.error is not None:
            raise RequestRefused(code, f"device state {direction} failed: {transfer.error}")
        if transfer.direction is TransferDirection.LOAD:
            if self.vrings.any_started:
                raise RequestRefused(code, "rings were started during the transfer; state not loaded")
            try:
                self.device.load_state(decode(bytes(transfer.received), self.device.device_id))
            except DeviceStateError as exc:
                raise RequestRefused(code, str(exc)) from exc
            except ValueError as exc:
                raise RequestRefused(code, str(DeviceStateError(Problem.VALUE, str(exc)))) from exc
            log.info("%s: device state loaded (%d bytes)", self.label, len(transfer.received))

    def _finished(self, transfer: Transfer) -> bool:
        """Whether ``transfer`` ends within CHECK_WAIT_S; the data plane is not held up meanwhile."""
        if transfer.wait(0):
            return True
        lock = self.dataplane.lock
        lock.release()
        try:
            return transfer.wait(CHECK_WAIT_S)
        finally:
            lock.acquire()

    def drop(self) -> None:
        """Cancel a transfer under way (the session ends, or a new one starts)."""
        if self.transfer is not None:
            self.transfer.cancel()
            self.transfer = None
