"""A used-buffer notification sent to a call eventfd the front-end then replaces is not lost.

QEMU starts a vhost-user-scsi (and -blk) device's rings with the call
eventfd they had before, one nothing reads (the masked notifier, or the
guest notifier of the previous start, which QEMU tore down at the reset
between firmware and kernel), and sends the guest notifiers with
SET_VRING_CALL only after every ring started (``vhost_scsi_common_start``:
"just unmask everything here"), without waiting for a reply.  The back-end's data plane runs
besides its control thread: a guest request served before the control
thread applied that SET_VRING_CALL is notified on the masked notifier and
lost.  With VIRTIO_F_EVENT_IDX (split 2.7.10, packed 2.8.10) the device
then notifies only when a *later* used entry crosses the driver's event
position, which never moves while the driver waits: the guest's first
command completes in the ring and the guest never hears of it.  Seen once
with a real packed=on scsi guest on a loaded machine (the request ring
stopped at avail and used index 1, the control ring at 0); delaying the
back-end's SET_VRING_CALL by 0.3 s reproduces it every time.

The back-end signals a started ring's new call eventfd once
(libvhost-user's ``vu_set_vring_call_exec`` does the same, "in case of I/O
hang after reconnecting"); a spurious notification is harmless (2.7.10,
2.8.10: the driver finds no new used buffer and goes back to sleep).
"""

from __future__ import annotations

import os
import struct

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX

from backend_helpers import wait_until


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_a_notification_sent_to_a_replaced_call_fd_is_not_lost(backend, packed):
    assert wait_until(lambda: endpoint(backend, backend.blk_path).connection is None)
    with VhostUserDriver(backend.blk_path, memory_size=8 << 20, packed=packed) as drv:
        (queue,) = drv.start_queues([0], size=16).values()
        assert drv.features >> VIRTIO_F_EVENT_IDX & 1
        front = drv.frontend
        masked = front.call_fds[0]  # QEMU's masked notifier: nobody reads it
        # A write the driver waits for: it asked for an interrupt at its next used slot.
        queue.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1), os.urandom(512)], [1])
        drv.kick(0)
        assert wait_until(lambda: _readable(masked)), "the device never notified the first call fd"
        os.eventfd_read(masked)  # the notification QEMU drops with the masked notifier
        # The "unmask": the guest notifier arrives after the request was served.
        front.set_vring_call(0)
        assert front.wait_call(0, timeout=5), "the completed request was never notified on the new call fd"
        (used,) = queue.get_used()
        assert used.data == bytes([VIRTIO_BLK_S_OK])


def test_a_call_fd_set_before_the_ring_starts_is_not_signalled(backend):
    """Bring-up (CALL before KICK) costs no spurious notification."""
    assert wait_until(lambda: endpoint(backend, backend.blk_path).connection is None)
    with VhostUserDriver(backend.blk_path, memory_size=8 << 20, packed=True) as drv:
        drv.start_queues([0], size=16)
        assert not drv.frontend.wait_call(0, timeout=0.2)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])
