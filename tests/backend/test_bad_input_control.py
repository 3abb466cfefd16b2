"""Bad front-end messages against the real ``VhostUserServer`` over real UNIX sockets.

Issue 3, "Bad input": each malformed or unacceptable request gets a NACK
(REPLY_ACK negotiated, so the front-end's :class:`NackError`) or a closed
connection, one log line that names the problem, and leaves the process
serving its other devices and new front-ends on the same socket; no fd is
leaked.  The server runs in this process, so ``/proc/self/fd`` counts its
fds too.  Framing rules are unit-tested against the sans-I/O protocol in
``tests/vhost_user``; these tests go end to end.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import threading

import pytest

from iovirt.vhost_user.bringup import negotiate, start_vring
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.framing import Header
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import (
    VHOST_USER_VERSION,
    FrontendRequest,
    Inflight,
    MemoryTable,
    MemRegion,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

from backend_helpers import wait_until, log_line

R = FrontendRequest
ALL = (1 << 64) - 1
NET_QUEUES = 4  # two queue pairs (conftest)


# -- helpers -----------------------------------------------------------------------






def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def endpoint(backend, path: str):
    return next(e for e in backend.server.endpoints if e.path == path)


def frontend(path: str) -> VhostUserFrontend:
    """A front-end with everything negotiated, REPLY_ACK included."""
    front = VhostUserFrontend.connect(path, timeout=5.0)
    try:
        negotiate(front, ALL, ALL)
    except BaseException:
        front.close()
        raise
    assert front.reply_ack
    return front


def nacked(front: VhostUserFrontend, request: int, payload=None, fds=()) -> None:
    with pytest.raises(NackError) as info:
        front.call(request, payload, fds, need_reply=True)
    assert info.value.request == request


def blk_serves(backend) -> None:
    """A blk write and read-back through a fresh driver on the blk socket."""
    assert wait_until(lambda: endpoint(backend, backend.blk_path).connection is None)
    with VhostUserDriver(backend.blk_path) as drv:
        drv.start_queues([0], size=16)
        queue = drv.queues[0]
        data = os.urandom(512)
        for rtype, out, in_len in ((VIRTIO_BLK_T_OUT, [data], []), (VIRTIO_BLK_T_IN, [], [512])):
            queue.add_data([struct.pack("<IIQ", rtype, 0, 3)] + out, in_len + [1])
            drv.kick(0)
            assert drv.frontend.wait_call(0, timeout=5)
            (used,) = queue.get_used()
            assert used.data[-1] == VIRTIO_BLK_S_OK
        assert used.data[:-1] == data


def socket_serves(backend, path: str) -> None:
    """Once the previous front-end is gone, a fresh one on ``path`` negotiates and starts a ring."""
    assert wait_until(lambda: endpoint(backend, path).connection is None)
    with VhostUserDriver(path) as drv:
        drv.start_queues([0], size=8)
        assert drv.frontend.get_queue_num() == 2


def still_serving(backend, front: VhostUserFrontend | None, path: str) -> None:
    """The NACKed connection goes on, the other device works, and ``path`` takes a new front-end."""
    if front is not None:
        assert front.get_queue_num() == 2
    if path == backend.blk_path:
        socket_serves(backend, backend.net_paths[1])
    else:
        blk_serves(backend)
    if front is not None:
        front.close()
    socket_serves(backend, path)


def closed(front: VhostUserFrontend) -> None:
    assert front.wait_closed(timeout=5.0)
    front.close()


TARGETS = pytest.mark.parametrize("target", ["net", "blk"])


def target_path(backend, target: str) -> str:
    return backend.net_paths[0] if target == "net" else backend.blk_path


# -- wire format -------------------------------------------------------------------


@TARGETS
def test_unknown_request_is_nacked(backend, logs, target):
    path = target_path(backend, target)
    front = frontend(path)
    nacked(front, 77, b"\0" * 8)
    assert "unknown request code" in log_line(logs, "rejected request 77")
    still_serving(backend, front, path)


def test_unknown_request_without_need_reply_is_dropped_silently(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    front.send(99, b"")
    assert front.get_queue_num() == 2  # the next reply is GET_QUEUE_NUM's: nothing came for 99
    log_line(logs, "rejected request 99")
    still_serving(backend, front, path)


def test_wrong_payload_size_is_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    nacked(front, R.VHOST_USER_SET_VRING_NUM, b"\0" * 4)
    assert "payload is 4 bytes, expected 8 bytes" in log_line(logs, "VHOST_USER_SET_VRING_NUM")
    nacked(front, R.VHOST_USER_SET_OWNER, b"\0" * 8)
    log_line(logs, "VHOST_USER_SET_OWNER", "payload is 8 bytes")
    still_serving(backend, front, path)


def test_wrong_payload_size_on_a_get_closes(backend, logs):
    # GET_FEATURES's reply is a bare u64 with no way to say "failed": closing is the only answer.
    path = backend.net_paths[0]
    front = frontend(path)
    front.send(R.VHOST_USER_GET_FEATURES, b"\0" * 8)
    closed(front)
    log_line(logs, "VHOST_USER_GET_FEATURES", "payload is 8 bytes")
    log_line(logs, "connection closed", "cannot report an error")
    still_serving(backend, None, path)


@TARGETS
def test_truncated_header_then_disconnect_closes(backend, logs, target):
    path = target_path(backend, target)
    front = frontend(path)
    front.send_raw(Header(R.VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, 0).pack()[:7])
    front.sock.shutdown(socket.SHUT_WR)
    closed(front)
    assert "7 of 12 bytes" in log_line(logs, "disconnected mid-message")
    still_serving(backend, None, path)


@TARGETS
def test_bad_version_closes(backend, logs, target):
    path = target_path(backend, target)
    front = frontend(path)
    front.send(R.VHOST_USER_GET_QUEUE_NUM, flags=0x2)
    closed(front)
    assert "header version 2" in log_line(logs, "protocol error")
    still_serving(backend, None, path)


def test_absurd_payload_size_closes(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    front.send_raw(Header(R.VHOST_USER_SET_FEATURES, VHOST_USER_VERSION, 1 << 30).pack())
    closed(front)
    assert "exceeds the 4096-byte limit" in log_line(logs, "protocol error")
    still_serving(backend, None, path)


@TARGETS
def test_disconnect_mid_message_with_fds(backend, logs, target):
    path = target_path(backend, target)
    before = open_fds()
    front = frontend(path)
    region = front.add_region(0, 0x10000)
    message = Header(R.VHOST_USER_SET_MEM_TABLE, VHOST_USER_VERSION, 40).pack()
    message += MemoryTable((front.region_desc(region),)).pack()[:10]
    front.send_raw(message, [front.region_fd(region)])
    front.close()
    assert "closed after 22 of 52 bytes" in log_line(logs, "disconnected mid-message", "VHOST_USER_SET_MEM_TABLE")
    # The server's end of the socket and the memfd it received are closed too.
    assert wait_until(lambda: open_fds() == before), (open_fds(), before)
    still_serving(backend, None, path)


# -- file descriptors ------------------------------------------------------------


def test_fd_on_a_message_that_carries_none_is_nacked_and_closed(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    fd = os.eventfd(0)
    before = open_fds()
    nacked(front, R.VHOST_USER_SET_OWNER, None, [fd])
    assert "1 file descriptor(s) attached, expected 0" in log_line(logs, "VHOST_USER_SET_OWNER")
    assert wait_until(lambda: open_fds() == before)  # the server's copy is closed
    os.close(fd)
    still_serving(backend, front, path)


def test_missing_kick_fd_is_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    nacked(front, R.VHOST_USER_SET_VRING_KICK, VringFile(0))
    assert "0 file descriptor(s) attached, expected 1" in log_line(logs, "VHOST_USER_SET_VRING_KICK")
    still_serving(backend, front, path)


def test_mem_table_with_fewer_fds_than_regions_is_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    a, b = front.add_region(0, 0x10000), front.add_region(0x100000, 0x10000)
    table = MemoryTable((front.region_desc(a), front.region_desc(b)))
    before = open_fds()
    nacked(front, R.VHOST_USER_SET_MEM_TABLE, table, [front.region_fd(a)])
    assert "1 file descriptor(s) attached, expected 2" in log_line(logs, "VHOST_USER_SET_MEM_TABLE")
    assert wait_until(lambda: open_fds() == before)
    still_serving(backend, front, path)


# -- memory table --------------------------------------------------------------------


def test_nine_regions_without_mem_slots_are_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    regions = [front.add_region(i << 20, 0x10000) for i in range(9)]
    body = struct.pack("=II", 9, 0) + b"".join(front.region_desc(r).pack() for r in regions)
    before = open_fds()
    nacked(front, R.VHOST_USER_SET_MEM_TABLE, body, [front.region_fd(r) for r in regions])
    assert "num regions is 0x9, expected at most 8" in log_line(logs, "VHOST_USER_SET_MEM_TABLE")
    assert wait_until(lambda: open_fds() == before)  # 8 received and closed, the 9th never installed
    still_serving(backend, front, path)


def test_eight_regions_are_accepted(backend, logs):
    front = frontend(backend.net_paths[0])
    regions = [front.add_region(i << 20, 0x10000) for i in range(8)]
    front.set_mem_table(regions)
    log_line(logs, "net0: memory table of 8 regions")
    front.close()


@pytest.mark.parametrize(
    "second",
    [(0x8000, 0x10000), (0x0, 0x1000), (0xF000, 0x100000)],
    ids=["tail", "same-start", "straddle"],
)
def test_overlapping_regions_are_nacked(backend, logs, second):
    path = backend.net_paths[0]
    front = frontend(path)
    a = front.add_region(0, 0x10000)
    gpa, size = second
    descs = (front.region_desc(a), MemRegion(gpa, size, 0x7E00_0000_0000, 0))
    fd_b = os.memfd_create("other", os.MFD_CLOEXEC)
    os.ftruncate(fd_b, size)
    before = open_fds()
    nacked(front, R.VHOST_USER_SET_MEM_TABLE, MemoryTable(descs), [front.region_fd(a), fd_b])
    assert "overlap" in log_line(logs, "VHOST_USER_SET_MEM_TABLE")
    assert wait_until(lambda: open_fds() == before)  # fds closed, mappings unmapped
    os.close(fd_b)
    still_serving(backend, front, path)


def test_zero_size_region_is_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    a = front.add_region(0, 0x10000)
    desc = MemRegion(0x100000, 0, 0x7E00_0000_0000, 0)
    nacked(front, R.VHOST_USER_SET_MEM_TABLE, MemoryTable((front.region_desc(a), desc)), [front.region_fd(a)] * 2)
    assert "has size 0" in log_line(logs, "VHOST_USER_SET_MEM_TABLE")
    nacked(front, R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(desc), [front.region_fd(a)])
    assert "has size 0" in log_line(logs, "VHOST_USER_ADD_MEM_REG")
    still_serving(backend, front, path)


def unmappable_fd(kind: str) -> tuple[int, int, list[int]]:
    """(fd to send, mmap offset, fds to close) for a region the server cannot map."""
    if kind == "pipe":
        r, w = os.pipe()
        return r, 0, [r, w]
    if kind == "eventfd":
        fd = os.eventfd(0)
        return fd, 0, [fd]
    fd = os.memfd_create("small", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x10000)
    if kind == "offset-beyond-file":
        return fd, 0x100000, [fd]
    return fd, 0x8000, [fd]  # "length-beyond-file": 0x10000 bytes from 0x8000


@pytest.mark.parametrize("kind", ["pipe", "eventfd", "offset-beyond-file", "length-beyond-file"])
def test_unmappable_fd_is_nacked(backend, logs, kind):
    path = backend.net_paths[0]
    front = frontend(path)
    fd, offset, to_close = unmappable_fd(kind)
    desc = MemRegion(0, 0x10000, 0x7E00_0000_0000, offset)
    before = open_fds()
    nacked(front, R.VHOST_USER_SET_MEM_TABLE, MemoryTable((desc,)), [fd])
    assert "cannot mmap" in log_line(logs, "VHOST_USER_SET_MEM_TABLE")
    nacked(front, R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(desc), [fd])
    log_line(logs, "VHOST_USER_ADD_MEM_REG", "cannot mmap")
    assert wait_until(lambda: open_fds() == before)
    for extra in to_close:
        os.close(extra)
    still_serving(backend, front, path)


# -- vrings ---------------------------------------------------------------------------


def ring_ready(front: VhostUserFrontend, index: int = 0, num: int = 8) -> int:
    """A memory table and NUM/BASE for vring ``index``; returns the region's user address."""
    region = front.add_region(0, 0x10000)
    front.set_mem_table([region])
    front.set_vring_num(index, num)
    front.set_vring_base(index, 0)
    return front.user_addr(region.gpa)


@pytest.mark.parametrize(
    "where",
    ["desc-unmapped", "used-unmapped", "avail-unmapped", "desc-straddles-end", "used-straddles-end"],
)
def test_ring_outside_the_memory_table_is_nacked(backend, logs, where):
    path = backend.net_paths[0]
    front = frontend(path)
    base = ring_ready(front, num=8)  # desc 128 bytes, avail 22, used 70
    addrs = {"desc": base, "avail": base + 0x1000, "used": base + 0x2000}
    part, how = where.split("-", 1)
    size = {"desc": 16 * 8, "used": 6 + 8 * 8}[part] if how == "straddles-end" else 0
    addrs[part] = base + 0x10000 - size // 2 if size else 0x1000  # half in, half out / nowhere
    front.call(
        R.VHOST_USER_SET_VRING_ADDR,
        VringAddr(0, 0, addrs["desc"], addrs["used"], addrs["avail"]),
        need_reply=True,
    )
    kick = os.eventfd(0)
    before = open_fds()
    nacked(front, R.VHOST_USER_SET_VRING_KICK, VringFile(0), [kick])
    assert "cannot start" in log_line(logs, "VHOST_USER_SET_VRING_KICK", "vring 0")
    assert wait_until(lambda: open_fds() == before)
    os.close(kick)
    still_serving(backend, front, path)


@pytest.mark.parametrize(
    "request_, payload",
    [
        (R.VHOST_USER_SET_VRING_NUM, VringState(NET_QUEUES, 8)),
        (R.VHOST_USER_SET_VRING_BASE, VringState(255, 0)),
        (R.VHOST_USER_SET_VRING_ADDR, VringAddr(NET_QUEUES, 0, 0, 0, 0)),
        (R.VHOST_USER_SET_VRING_ENABLE, VringState(1 << 31, 1)),
        (R.VHOST_USER_SET_VRING_KICK, VringFile(NET_QUEUES, invalid_fd=True)),
        (R.VHOST_USER_SET_VRING_CALL, VringFile(200)),
        (R.VHOST_USER_SET_VRING_ERR, VringFile(NET_QUEUES)),
    ],
    ids=lambda v: v.name.removeprefix("VHOST_USER_") if isinstance(v, FrontendRequest) else "",
)
def test_vring_index_beyond_the_device_is_nacked(backend, logs, request_, payload):
    path = backend.net_paths[0]
    front = frontend(path)
    fds = [] if not isinstance(payload, VringFile) or payload.invalid_fd else [os.eventfd(0)]
    before = open_fds()
    nacked(front, request_, payload, fds)
    assert "beyond the device's 4 queues" in log_line(logs, request_.name)
    assert wait_until(lambda: open_fds() == before)
    for fd in fds:
        os.close(fd)
    still_serving(backend, front, path)


@pytest.mark.parametrize("num", [0, 3, 100, 1023, 2048, 1 << 16, (1 << 32) - 1])
def test_bad_ring_size_is_nacked(backend, logs, num):
    path = backend.net_paths[0]
    front = frontend(path)
    nacked(front, R.VHOST_USER_SET_VRING_NUM, VringState(0, num))
    assert f"ring size {num} is not a power of 2 in [1, 1024]" in log_line(logs, "VHOST_USER_SET_VRING_NUM")
    front.set_vring_num(0, 1024)  # the maximum is fine
    still_serving(backend, front, path)


@pytest.mark.parametrize("missing", ["num", "addr", "both"])
def test_kick_before_num_or_addr_is_nacked(backend, logs, missing):
    path = backend.net_paths[0]
    front = frontend(path)
    region = front.add_region(0, 0x10000)
    front.set_mem_table([region])
    if missing != "num" and missing != "both":
        front.set_vring_num(1, 8)
    if missing == "num":
        front.set_vring_addr(1, 0x0, 0x1000, 0x2000)
    kick = os.eventfd(0)
    nacked(front, R.VHOST_USER_SET_VRING_KICK, VringFile(1), [kick])
    assert "has no size or no addresses yet" in log_line(logs, "VHOST_USER_SET_VRING_KICK", "vring 1")
    os.close(kick)
    still_serving(backend, front, path)


def test_refused_kick_fd_is_not_closed_twice(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    kick = os.eventfd(0)
    nacked(front, R.VHOST_USER_SET_VRING_KICK, VringFile(0), [kick])
    os.close(kick)
    # The server closed its copy of the kick fd; new fds now reuse the lowest free numbers.
    bystanders = [os.eventfd(0) for _ in range(8)]
    try:
        front.close()  # the session's close stops every ring
        assert wait_until(lambda: endpoint(backend, path).connection is None)
        log_line(logs, "net0: connection closed")
        alive = []
        for fd in bystanders:
            try:
                os.fstat(fd)
                alive.append(fd)
            except OSError:
                pass
        assert alive == bystanders, "the server closed an fd it did not own"
    finally:
        for fd in bystanders:
            try:
                os.close(fd)
            except OSError:
                pass


# -- net requests ---------------------------------------------------------------------


def test_net_request_on_blk_is_nacked(backend, logs):
    path = backend.blk_path
    front = frontend(path)
    nacked(front, R.VHOST_USER_NET_SET_MTU, U64(1500))
    assert "not a net device" in log_line(logs, "VHOST_USER_NET_SET_MTU")
    still_serving(backend, front, path)


# -- fd leaks over many bad connections -----------------------------------------------


def bad_connection(backend, i: int) -> None:
    """One front-end that misbehaves in one of ten ways, on one of the three sockets."""
    paths = backend.net_paths + [backend.blk_path]
    path = paths[i % 3]
    front = VhostUserFrontend.connect(path, timeout=5.0)
    try:
        kind = i % 10
        if kind >= 3:
            negotiate(front, ALL, ALL)
        fd = os.eventfd(0)
        try:
            if kind == 0:  # bad version
                front.send(R.VHOST_USER_GET_FEATURES, flags=0)
            elif kind == 1:  # truncated payload with an fd, then hang up
                front.send_raw(Header(R.VHOST_USER_SET_VRING_CALL, VHOST_USER_VERSION, 8).pack() + b"\0" * 3, [fd])
            elif kind == 2:  # unknown request with an fd
                front.send(4242, b"x", [fd])
            elif kind == 3:  # stray fd
                front.send(R.VHOST_USER_SET_OWNER, None, [fd], need_reply=True)
            elif kind == 4:  # unmappable region
                front.send(R.VHOST_USER_SET_MEM_TABLE, MemoryTable((MemRegion(0, 0x1000, 0, 0),)), [fd])
            elif kind == 5:  # the no-fd bit, and an fd all the same
                # (Not "kick before NUM/ADDR": its fd is closed again at disconnect, maybe
                # someone else's by then; test_refused_kick_fd_is_not_closed_twice covers it.)
                front.send(R.VHOST_USER_SET_VRING_KICK, VringFile(0, invalid_fd=True), [fd], need_reply=True)
            elif kind == 6:  # mem table, a started ring, then hang up with it running
                region = front.add_region(0, 0x10000)
                front.set_mem_table([region])
                start_vring(front, 0, 8, 0x0, 0x1000, 0x2000)
            elif kind == 7:  # an inflight fd, an index beyond the device
                front.send(R.VHOST_USER_SET_VRING_CALL, VringFile(99), [fd], need_reply=True)
            elif kind == 8:  # zero-size region
                front.send(R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(MemRegion(0, 0, 0, 0)), [fd])
            else:  # wrong payload size on a GET: closed
                front.send(R.VHOST_USER_GET_QUEUE_NUM, b"\0" * 8)
        finally:
            os.close(fd)
        if kind in (0, 9):
            assert front.wait_closed(timeout=5.0)
    finally:
        front.close()
    assert wait_until(lambda: endpoint(backend, path).connection is None)


def settle(backend, caplog) -> None:
    """Wait until every connection the server accepted has been closed and its session released.

    ``Endpoint.connection`` is cleared before the session closes its fds; the
    "connection closed" line is logged after.
    """
    served = sum(e.connections_served for e in backend.server.endpoints)
    assert wait_until(
        lambda: sum("connection closed" in r.getMessage() for r in list(caplog.records)) == served
    ), "connections still open"


def test_no_fd_leak_over_100_bad_connections(backend, logs):
    for i in range(10):  # warm up: lazily opened fds (logging, dataplane, caches)
        bad_connection(backend, i)
    blk_serves(backend)
    settle(backend, logs)
    before = open_fds()
    for i in range(100):
        bad_connection(backend, i)
    settle(backend, logs)
    assert open_fds() == before
    assert sum(e.connections_served for e in backend.server.endpoints) == 10 + 1 + 100
    blk_serves(backend)
    socket_serves(backend, backend.net_paths[0])


# -- fd ownership of refused requests ---------------------------------------------------------


@pytest.fixture
def server_closes(monkeypatch):
    """Every ``os.close`` made off the test thread: (fd, errno or 0), real closes all the same.

    A second close of one fd number shows up as EBADF here when nobody reused
    the number in between, and as someone else's fd closed when somebody did.
    """
    calls: list[tuple[int, int]] = []
    real_close = os.close
    main = threading.main_thread()

    def close(fd: int) -> None:
        try:
            real_close(fd)
        except OSError as exc:
            if threading.current_thread() is not main:
                calls.append((fd, exc.errno or -1))
            raise
        if threading.current_thread() is not main:
            calls.append((fd, 0))

    monkeypatch.setattr(os, "close", close)
    return calls


def refuse_overlapping_mem_table(front: VhostUserFrontend) -> None:
    a = front.add_region(0, 0x10000)
    descs = (front.region_desc(a), MemRegion(0x8000, 0x1000, 0x7E00_0000_0000, 0))
    nacked(front, R.VHOST_USER_SET_MEM_TABLE, MemoryTable(descs), [front.region_fd(a)] * 2)


def refuse_zero_size_add_mem_reg(front: VhostUserFrontend) -> None:
    a = front.add_region(0, 0x10000)
    nacked(front, R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(MemRegion(0, 0, 0, 0)), [front.region_fd(a)])


def refuse_kick_before_num(front: VhostUserFrontend) -> None:
    kick = os.eventfd(0)
    nacked(front, R.VHOST_USER_SET_VRING_KICK, VringFile(0), [kick])
    os.close(kick)


def refuse_small_inflight(front: VhostUserFrontend) -> None:
    fd = os.memfd_create("inflight")
    nacked(front, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(16, 0, 2, 64), [fd])
    os.close(fd)


def refuse_unmappable_inflight(front: VhostUserFrontend) -> None:
    r, w = os.pipe()
    nacked(front, R.VHOST_USER_SET_INFLIGHT_FD, Inflight(1 << 20, 0, 1, 64), [r])
    os.close(r)
    os.close(w)


def refuse_stray_fd(front: VhostUserFrontend) -> None:
    fd = os.eventfd(0)
    nacked(front, R.VHOST_USER_SET_OWNER, None, [fd])
    os.close(fd)


def accept_a_running_ring(front: VhostUserFrontend) -> None:
    front.set_mem_table([front.add_region(0, 0x10000)])
    start_vring(front, 0, 8, 0x0, 0x1000, 0x2000)
    front.set_vring_err(0)


CONTROLS = {
    "stray-fd": (refuse_stray_fd, False),
    "accepted-ring": (accept_a_running_ring, False),
}
REFUSALS = {
    "overlapping-mem-table": (refuse_overlapping_mem_table, False),
    "zero-size-add-mem-reg": (refuse_zero_size_add_mem_reg, False),
    "kick-before-num": (refuse_kick_before_num, True),
    "small-inflight": (refuse_small_inflight, True),
    "unmappable-inflight": (refuse_unmappable_inflight, True),
}


@pytest.mark.parametrize(
    "refusal",
    list(CONTROLS)
    + [
        name
        for name in REFUSALS
    ],
)
def test_refused_request_fds_are_closed_once(backend, logs, server_closes, refusal):
    action, on_blk = {**CONTROLS, **REFUSALS}[refusal]
    path = backend.blk_path if on_blk else backend.net_paths[0]
    front = frontend(path)
    action(front)
    front.close()
    assert wait_until(lambda: endpoint(backend, path).connection is None)
    log_line(logs, "connection closed: front-end disconnected")
    double = [fd for fd, err in server_closes if err == errno.EBADF]
    assert not double, f"fds closed twice by the server: {double}"


# -- kick/call fds that are not eventfds -------------------------------------------------------
#
# The kernel's vhost takes only eventfds here (eventfd_ctx_fdget, EINVAL otherwise);
# anything else must be refused before the data plane waits on it or writes to it.


@pytest.mark.parametrize("kind", ["memfd", "pipe"])
def test_kick_fd_that_is_not_an_eventfd_is_nacked(backend, logs, kind):
    path = backend.net_paths[0]
    front = frontend(path)
    ring_ready(front, 0)
    front.set_vring_addr(0, 0x0, 0x1000, 0x2000)
    if kind == "memfd":
        fd, other = os.memfd_create("not-an-eventfd"), None
    else:
        fd, other = os.pipe()
    try:
        nacked(front, R.VHOST_USER_SET_VRING_KICK, VringFile(0), [fd])
        assert "eventfd" in log_line(logs, "VHOST_USER_SET_VRING_KICK")
    finally:
        for extra in (fd, other):
            if extra is not None:
                os.close(extra)
    still_serving(backend, front, path)


def test_call_fd_that_never_drains_does_not_stall_the_process(backend, logs):
    path = backend.net_paths[0]
    drv = VhostUserDriver(path, features=ALL & ~(1 << VIRTIO_F_EVENT_IDX), memory_size=4 << 20)
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)  # 512 notifications fill it
    try:
        queue = drv.start_queues([1], size=16)[1]
        try:
            drv.frontend.call(R.VHOST_USER_SET_VRING_CALL, VringFile(1), [w], need_reply=True)
        except NackError:
            log_line(logs, "VHOST_USER_SET_VRING_CALL", "eventfd")
        else:
            frame = bytes(12) + b"\xff" * 6 + bytes(6) + b"\x88\xb5" + bytes(46)
            for i in range(600):
                queue.add_data([frame])
                drv.kick(1)
                if not wait_until(lambda: queue.used_idx() == i + 1, timeout=1.0):
                    break
                queue.get_used()
        # The other device must be served whatever this front-end did with its call fd.
        with VhostUserDriver(backend.blk_path, timeout=1.0) as blk:
            blk.start_queues([0], size=8)
        assert queue.used_idx() in (0, 600)  # refused, or every frame served
    finally:
        os.close(r)  # a blocked write now fails with EPIPE: the data plane goes on
        os.close(w)
        drv.close()


# -- more refused requests ---------------------------------------------------------------------


def test_get_vring_base_beyond_the_device_closes(backend, logs):
    # GET_VRING_BASE's reply is a vring state with no failure encoding: closing is the only answer.
    path = backend.net_paths[0]
    front = frontend(path)
    front.send(R.VHOST_USER_GET_VRING_BASE, VringState(NET_QUEUES, 0))
    closed(front)
    assert "beyond the device's 4 queues" in log_line(logs, "rejected VHOST_USER_GET_VRING_BASE")
    log_line(logs, "net0: connection closed", "cannot report an error")
    still_serving(backend, None, path)


def test_unoffered_features_are_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    nacked(front, R.VHOST_USER_SET_FEATURES, U64(front.features | 1 << 63))
    assert "were not offered" in log_line(logs, "VHOST_USER_SET_FEATURES")
    still_serving(backend, front, path)


def test_split_ring_base_beyond_16_bits_is_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    nacked(front, R.VHOST_USER_SET_VRING_BASE, VringState(0, 0x10000))
    assert "not a 16-bit index" in log_line(logs, "VHOST_USER_SET_VRING_BASE")
    still_serving(backend, front, path)


def test_add_mem_reg_overlapping_and_rem_mem_reg_unknown_are_nacked(backend, logs):
    path = backend.net_paths[0]
    front = frontend(path)
    a = front.add_region(0, 0x10000)
    front.add_mem_reg(a)
    fd = os.memfd_create("overlap")
    os.ftruncate(fd, 0x10000)
    before = open_fds()
    nacked(front, R.VHOST_USER_ADD_MEM_REG, SingleMemRegion(MemRegion(0x8000, 0x10000, 0x7E00_0000_0000, 0)), [fd])
    log_line(logs, "rejected VHOST_USER_ADD_MEM_REG")
    assert wait_until(lambda: open_fds() == before)
    os.close(fd)
    nacked(front, R.VHOST_USER_REM_MEM_REG, SingleMemRegion(MemRegion(0x100000, 0x1000, 0, 0)))
    assert "no region [0x100000, +0x1000) mapped" in log_line(logs, "VHOST_USER_REM_MEM_REG")
    # The region that was added is still there: a ring in it starts.
    start_vring(front, 0, 8, 0x0, 0x1000, 0x2000)
    still_serving(backend, front, path)


def test_mem_table_swapped_under_a_running_ring_fails_the_device(backend, logs):
    # The new table no longer holds the ring: the device stops the ring and
    # asks for a reset (virtio 2.1.2), signalled on the ring's error eventfd.
    path = backend.net_paths[0]
    with VhostUserDriver(path, memory_size=1 << 20) as drv:
        drv.start_queues([0, 1], size=8)
        drv.frontend.set_vring_err(1)
        elsewhere = drv.frontend.add_region(0x4000_0000, 0x10000)
        drv.frontend.set_mem_table([elsewhere])
        assert "device needs reset" in log_line(logs, "net0: queue")
        readable, _, _ = select.select([drv.frontend.err_fds[1]], [], [], 5.0)
        assert readable
        assert backend.net[0].needs_reset
        blk_serves(backend)
    socket_serves(backend, path)
    assert not backend.net[0].needs_reset
