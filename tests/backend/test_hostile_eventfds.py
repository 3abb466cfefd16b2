"""Issue 12, failure 4: a front-end's blocking eventfds must never stall the data plane.

A front-end chooses the file status flags of the kick/call/err eventfds it
passes (the back-end shares its file description).  A blocking eventfd whose
counter is at its maximum, 0xfffffffffffffffe, makes a write of 1 block
(eventfd(2)); a kick eventfd the front-end drains itself makes the
back-end's read block.  The data plane serves every device of the process
while holding the data-path lock, so one such fd used to freeze every
device and every control request.  Each test keeps a canary device on
another connection served with low latency, and checks that a control
request on the hostile connection is still answered.
"""

from __future__ import annotations

import os
import struct
import time

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.messages import FrontendRequest as R
from iovirt.vhost_user.messages import VringFile
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.net.defs import NetHdr

from backend_helpers import log_line, wait_until

MEMORY = 4 << 20
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE  # eventfd(2): the largest counter; adding 1 blocks
CANARY_TIMEOUT_S = 1.0
FRAME = b"\xff" * 6 + b"\x02\0\0\0\0\x07" + b"\x08\x00" + bytes(46)


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)


def vring(backend, path: str, index: int):
    conn = endpoint(backend, path).connection
    assert conn is not None
    return conn.session.vrings.rings[index]


def driver(backend, path: str, queues: list[int]) -> VhostUserDriver:
    assert wait_until(lambda: endpoint(backend, path).connection is None)
    drv = VhostUserDriver(path, memory_size=MEMORY)
    drv.start_queues(queues, size=16)
    return drv


def blocking_eventfd(value: int = 0) -> int:
    """An eventfd as a hostile front-end passes it: blocking, counter at ``value``."""
    fd = os.eventfd(0, os.EFD_CLOEXEC)
    if value:
        os.eventfd_write(fd, value)
    return fd


def hand_over(drv: VhostUserDriver, request: R, table: dict[int, int], index: int, fd: int) -> None:
    """Send ``fd`` as vring ``index``'s kick/call/err eventfd (the front-end keeps its copy)."""
    drv.frontend.call(request, VringFile(index), [fd])
    old = table.pop(index, None)
    if old is not None:
        os.close(old)
    table[index] = fd


def blk_round_trip(drv: VhostUserDriver, rtype: int, sector: int, out: bytes = b"", in_len: int = 0):
    queue = drv.queues[0]
    queue.add_data([struct.pack("<IIQ", rtype, 0, sector)] + ([out] if out else []), ([in_len] if in_len else []) + [1])
    drv.kick(0)
    assert drv.frontend.wait_call(0, timeout=CANARY_TIMEOUT_S), "the canary device was not served in time"
    (used,) = queue.get_used()
    return used.data[:-1], used.data[-1]


def canary_serves(backend, rounds: int = 20) -> None:
    """The blk device, on its own connection, answers every request within CANARY_TIMEOUT_S."""
    with driver(backend, backend.blk_path, [0]) as drv:
        for sector in range(rounds):
            data = os.urandom(512)
            assert blk_round_trip(drv, VIRTIO_BLK_T_OUT, sector, out=data) == (b"", VIRTIO_BLK_S_OK)
            assert blk_round_trip(drv, VIRTIO_BLK_T_IN, sector, in_len=512) == (data, VIRTIO_BLK_S_OK)


def control_answered(drv: VhostUserDriver) -> None:
    """GET_FEATURES on the hostile connection is answered (the control thread is not stuck)."""
    assert drv.frontend.call(R.VHOST_USER_GET_FEATURES, timeout=CANARY_TIMEOUT_S) is not None


def transmit(drv: VhostUserDriver, count: int) -> None:
    queue = drv.queues[1]
    for _ in range(count):
        queue.add_data([NetHdr().pack() + FRAME])
    drv.kick(1)


def test_full_call_eventfd_does_not_block(backend, logs):
    with driver(backend, backend.net_paths[0], [0, 1]) as bad:
        call = blocking_eventfd(EVENTFD_MAX)
        hand_over(bad, R.VHOST_USER_SET_VRING_CALL, bad.frontend.call_fds, 1, call)
        try:
            transmit(bad, 1)
            # The frame was transmitted (its buffer used); only the notification was refused.
            assert wait_until(lambda: bad.queues[1].used_idx() == 1)
            assert len(bad.queues[1].get_used()) == 1  # the driver asks for the next notification
            canary_serves(backend)
            control_answered(bad)
            transmit(bad, 1)
            assert wait_until(lambda: bad.queues[1].used_idx() == 2)
            assert len(bad.queues[1].get_used()) == 1
            assert vring(backend, backend.net_paths[0], 1).call_unread >= 2
            line = log_line(logs, "net0", "vring 1", "call eventfd")
            assert "not reading" in line
            # Logged once per vring, not once per notification.
            assert sum("call eventfd" in r.getMessage() for r in logs.records) == 1
            # Once the front-end reads its eventfd, notifications arrive again.
            assert os.eventfd_read(call) == EVENTFD_MAX
            transmit(bad, 1)
            assert bad.frontend.wait_call(1, timeout=CANARY_TIMEOUT_S)
        finally:
            _unblock_write(call)
    canary_serves(backend)


def test_full_err_eventfd_does_not_block(backend, logs):
    with driver(backend, backend.net_paths[0], [0, 1]) as bad:
        err = blocking_eventfd(EVENTFD_MAX)
        hand_over(bad, R.VHOST_USER_SET_VRING_ERR, bad.frontend.err_fds, 1, err)
        try:
            # A head beyond the ring size: the device fails and signals the err eventfd.
            bad.queues[1].post_head(bad.queues[1].size + 3)
            bad.queues[1].publish()
            bad.frontend.kick(1)
            assert wait_until(lambda: backend.net[0].needs_reset)
            canary_serves(backend)
            control_answered(bad)
            assert wait_until(lambda: vring(backend, backend.net_paths[0], 1).err_unread == 1)
            assert "not reading" in log_line(logs, "net0", "vring 1", "err eventfd")
        finally:
            _unblock_write(err)
    canary_serves(backend)


def test_kick_eventfd_drained_by_the_front_end_does_not_block(backend, logs):
    with driver(backend, backend.net_paths[0], [0, 1]) as bad:
        kick = blocking_eventfd()
        hand_over(bad, R.VHOST_USER_SET_VRING_KICK, bad.frontend.kick_fds, 1, kick)
        # The back-end's epoll sees a kick, and the front-end takes it back before the
        # back-end reads it.  Holding the data-path lock (as the control thread does while it
        # serves a request) keeps the data plane between its epoll and its read meanwhile.
        with backend.server.dataplane.lock:
            os.eventfd_write(kick, 1)
            time.sleep(0.05)
            assert os.eventfd_read(kick) == 1
        try:
            canary_serves(backend)
            control_answered(bad)
        finally:
            os.eventfd_write(kick, 1)  # frees a back-end read blocked on it (before the fix)
        # The ring is still served: a frame sent now is transmitted.
        transmit(bad, 1)
        assert bad.frontend.wait_call(1, timeout=CANARY_TIMEOUT_S)
    canary_serves(backend)


def _unblock_write(fd: int) -> None:
    """Free a back-end write blocked on ``fd`` (before the fix), so the fixture can stop."""
    try:
        os.set_blocking(fd, False)
        os.eventfd_read(fd)
    except OSError:
        pass
