"""The frontend against the sans-I/O protocol over a real socketpair, with real fds.

A small test backend (a thread reading with ``bytes_needed``-bounded
``recv_fds``, as the server will) answers through :class:`BackendConnection`
and maps the memfds it receives; the tests check the mapping shares memory
with the frontend, eventfds signal across, and no fd leaks on bad input.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time

import pytest

from iovirt.vhost_user.errors import (
    BackendClosedError,
    BadVersionError,
    FdCountError,
    NackError,
    PayloadSizeError,
    ReplyTimeoutError,
    TruncatedMessageError,
    UnknownRequestError,
)
from iovirt.vhost_user.bringup import negotiate, start_vring
from iovirt.vhost_user.frontend import USER_ADDR_BASE, VhostUserFrontend
from iovirt.vhost_user.framing import Header, build_message
from iovirt.vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    Config,
    FrontendRequest,
    Inflight,
    IotlbMsg,
    IotlbPerm,
    IotlbType,
    MemoryTable,
    ProtocolFeature,
    U64,
    VringState,
    feature_mask,
)
from iovirt.vhost_user.memtable import GuestMemoryTable
from iovirt.vhost_user.protocol import (
    payload_of,
    BackendConnection,
    ConnectionClosed,
    ConnectionState,
    ProtocolFailure,
    RejectedRequest,
    ReplyKind,
    Request,
)

R = FrontendRequest
PF = ProtocolFeature
VIRTIO_F_VERSION_1 = 32
OFFERED_FEATURES = 1 << VIRTIO_F_VERSION_1 | 1 << VHOST_USER_F_PROTOCOL_FEATURES
OFFERED_PROTOCOL = feature_mask(
    PF.VHOST_USER_PROTOCOL_F_MQ,
    PF.VHOST_USER_PROTOCOL_F_REPLY_ACK,
    PF.VHOST_USER_PROTOCOL_F_CONFIG,
    PF.VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    PF.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
    PF.VHOST_USER_PROTOCOL_F_STATUS,
)
CONFIG_SPACE = bytes(range(32))
NACKED = {R.VHOST_USER_NET_SET_MTU}


class MiniBackend:
    """Answers requests the way the spec says, keeps what the fds give it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = BackendConnection(supported_protocol_features=OFFERED_PROTOCOL)
        self.events: list = []
        self.table = GuestMemoryTable("mini", lambda: None)
        self.memory = self.table.memory
        self.vring_fds: dict[tuple[int, int], int] = {}
        self.status = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while self.conn.state is ConnectionState.OPEN:
                data, fds, _, _ = socket.recv_fds(self.sock, self.conn.bytes_needed, 16)
                events = self.conn.feed(data, fds) if data else [self.conn.feed_eof()]
                for event in events:
                    self.events.append(event)
                    if not self._answer(event):
                        return
        except ConnectionError:
            pass  # the frontend went away while we answered
        except BaseException as exc:
            self.error = exc
        finally:
            self.sock.close()

    def _answer(self, event) -> bool:
        if isinstance(event, (ProtocolFailure, ConnectionClosed)):
            for fd in event.fds:
                os.close(fd)
            return False
        if isinstance(event, RejectedRequest):
            for fd in event.fds:
                os.close(fd)
            out = self.conn.nack(event)
            if out is None:
                return False
            self.sock.sendall(out)
            return True
        reply, reply_fds = self._apply(event)
        if event.request in NACKED:
            out = self.conn.nack(event)
        elif event.reply is ReplyKind.BODY:
            out = self.conn.reply(event, reply)
        else:
            out = self.conn.ack(event)
        if out:
            socket.send_fds(self.sock, [out], reply_fds) if reply_fds else self.sock.sendall(out)
        for fd in reply_fds:
            os.close(fd)
        return True

    def _apply(self, event: Request):
        r, p = event.request, event  # typed requests carry their payload fields
        u64_replies = {
            R.VHOST_USER_GET_FEATURES: OFFERED_FEATURES,
            R.VHOST_USER_GET_PROTOCOL_FEATURES: OFFERED_PROTOCOL,
            R.VHOST_USER_GET_QUEUE_NUM: 2,
            R.VHOST_USER_GET_MAX_MEM_SLOTS: 509,
            R.VHOST_USER_GET_STATUS: self.status,
            R.VHOST_USER_IOTLB_MSG: 0,
        }
        if r in u64_replies:
            return U64(u64_replies[r]), []
        if r is R.VHOST_USER_SET_STATUS:
            self.status = p.status
        elif r is R.VHOST_USER_GET_VRING_BASE:
            return VringState(p.index, 42), []
        elif r is R.VHOST_USER_GET_CONFIG:
            return Config(p.offset, p.flags, CONFIG_SPACE[p.offset : p.offset + p.size]), []
        elif r is R.VHOST_USER_GET_INFLIGHT_FD:
            size = p.num_queues * (16 + 16 * p.queue_size)
            fd = os.memfd_create("inflight", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            os.pwrite(fd, b"inflight!", 0)
            return Inflight(size, 0, p.num_queues, p.queue_size), [fd]
        elif r is R.VHOST_USER_SET_MEM_TABLE:
            self.table.set_table(p.regions, event.fds)
            return None, []
        elif r is R.VHOST_USER_ADD_MEM_REG:
            self.table.add(p.region, event.fds)
            return None, []
        elif r is R.VHOST_USER_REM_MEM_REG:
            self.table.remove(p.region, event.fds)
        elif r in (R.VHOST_USER_SET_VRING_KICK, R.VHOST_USER_SET_VRING_CALL):
            old = self.vring_fds.pop((r, p.index), None)
            if old is not None:
                os.close(old)
            if event.fds:
                self.vring_fds[(r, p.index)] = event.fds[0]
            return None, []
        for fd in event.fds:
            os.close(fd)
        return None, []

    def stop(self) -> None:
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        for fd in self.vring_fds.values():
            os.close(fd)
        self.table.close()

    def requests(self):
        return [e for e in self.events if isinstance(e, Request)]

    def last(self):
        return self.events[-1]


@pytest.fixture
def pair():
    front_sock, back_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = MiniBackend(back_sock)
    frontend = VhostUserFrontend(front_sock, timeout=2.0)
    yield frontend, backend
    frontend.close()
    backend.stop()


def wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- bring-up ----------------------------------------------------------------------


def test_negotiate(pair):
    frontend, backend = pair
    negotiated = negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL | 1 << 63)
    features, protocol = negotiated.features, negotiated.protocol_features
    assert features == OFFERED_FEATURES
    assert protocol == OFFERED_PROTOCOL and frontend.reply_ack
    assert backend.conn.protocol_features == OFFERED_PROTOCOL
    assert [e.request for e in backend.requests()] == [
        R.VHOST_USER_GET_FEATURES,
        R.VHOST_USER_GET_PROTOCOL_FEATURES,
        R.VHOST_USER_SET_PROTOCOL_FEATURES,
        R.VHOST_USER_SET_OWNER,
        R.VHOST_USER_SET_FEATURES,
    ]
    # With REPLY_ACK negotiated every later request asks for (and got) an ack.
    assert backend.requests()[-1].reply is ReplyKind.ACK


def test_mem_table_fds_map_the_same_memory(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    frontend.add_region(0, 0x10000)
    frontend.add_region(0x100000, 0x20000)
    frontend.set_mem_table()
    table = backend.requests()[-1]
    assert table.request is R.VHOST_USER_SET_MEM_TABLE and len(table.fds) == 2
    assert table.regions[1].userspace_addr == USER_ADDR_BASE + 0x100000
    frontend.memory.write(0x100010, b"from the frontend")
    assert backend.memory.read(0x100010, 17) == b"from the frontend"
    backend.memory.write(0x20, b"from the backend")
    assert frontend.memory.read(0x20, 16) == b"from the backend"
    assert backend.table.user_to_guest(USER_ADDR_BASE + 0x100040) == 0x100040


def test_add_and_remove_a_region(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    assert frontend.get_max_mem_slots() == 509
    region = frontend.add_region(0x200000, 0x8000)
    frontend.add_mem_reg(region)
    frontend.memory.write(0x200100, b"slot")
    assert backend.memory.read(0x200100, 4) == b"slot"
    frontend.rem_mem_reg(region)
    assert backend.memory.find_region(0x200000) is None


def test_vrings_and_eventfds(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    frontend.add_region(0, 0x10000)
    frontend.set_mem_table()
    start_vring(frontend, 0, 256, desc=0x1000, avail=0x2000, used=0x3000)
    addr = [e for e in backend.requests() if e.request is R.VHOST_USER_SET_VRING_ADDR][0]
    assert (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr) == (
        USER_ADDR_BASE + 0x1000, USER_ADDR_BASE + 0x2000, USER_ADDR_BASE + 0x3000,
    )
    assert backend.requests()[-1].request is R.VHOST_USER_SET_VRING_ENABLE
    frontend.kick(0)
    assert os.eventfd_read(backend.vring_fds[(R.VHOST_USER_SET_VRING_KICK, 0)]) == 1
    assert not frontend.wait_call(0, timeout=0.01)
    os.eventfd_write(backend.vring_fds[(R.VHOST_USER_SET_VRING_CALL, 0)], 1)
    assert frontend.wait_call(0, timeout=1.0)
    assert frontend.get_vring_base(0) == 42
    assert frontend.set_vring_kick(1, poll=True) is None
    assert backend.requests()[-1].invalid_fd and backend.requests()[-1].fds == ()


def test_config_status_queues_iotlb(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    assert frontend.get_config(4, 8) == CONFIG_SPACE[4:12]
    assert frontend.get_queue_num() == 2
    frontend.set_status(0xF)
    assert frontend.get_status() == 0xF
    frontend.iotlb_msg(IotlbMsg(0, 0x1000, USER_ADDR_BASE, IotlbPerm.VHOST_ACCESS_RO, IotlbType.VHOST_IOTLB_UPDATE))
    frontend.set_config(0, b"\1\2")
    assert payload_of(backend.requests()[-1]) == Config(0, 0, b"\1\2")


def test_inflight_fd_is_passed_back(pair):
    frontend, _ = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    inflight, fd = frontend.get_inflight_fd(2, 8)
    try:
        assert inflight == Inflight(2 * (16 + 16 * 8), 0, 2, 8)
        with mmap.mmap(fd, inflight.mmap_size) as shared:
            assert shared[:9] == b"inflight!"
        frontend.set_inflight_fd(inflight, fd)
    finally:
        os.close(fd)


def test_nack_raises(pair):
    frontend, _ = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    with pytest.raises(NackError) as info:
        frontend.net_set_mtu(1500)
    assert info.value.status == 1 and info.value.request == R.VHOST_USER_NET_SET_MTU


def test_reply_timeout_is_bounded():
    front_sock, back_sock = socket.socketpair()
    with VhostUserFrontend(front_sock, timeout=0.1) as frontend:
        start = time.monotonic()
        with pytest.raises(ReplyTimeoutError):
            frontend.get_features()
        assert time.monotonic() - start < 1.0
    back_sock.close()


def test_backend_closing_is_reported():
    front_sock, back_sock = socket.socketpair()
    back_sock.close()
    with VhostUserFrontend(front_sock, timeout=1.0) as frontend:
        with pytest.raises((BackendClosedError, BrokenPipeError)):
            frontend.get_features()


def test_connect_to_a_listening_path(tmp_path):
    path = str(tmp_path / "vu.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(MiniBackend(listener.accept()[0])))
    thread.start()
    with VhostUserFrontend.connect(path, timeout=2.0) as frontend:
        assert frontend.get_features() == OFFERED_FEATURES
    thread.join(timeout=2)
    accepted[0].stop()
    listener.close()
    with pytest.raises(FileNotFoundError):
        VhostUserFrontend.connect(str(tmp_path / "nobody"), timeout=0.05)


# -- bad input, sent raw -------------------------------------------------------------


def test_unknown_request_is_nacked_and_connection_survives(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    frontend.send(77, b"\0" * 8, need_reply=True)
    reply = frontend.recv_reply(77)
    assert reply.payload == U64(1)
    assert isinstance(backend.last().error, UnknownRequestError)
    assert frontend.get_queue_num() == 2


def test_wrong_payload_size_is_nacked(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    frontend.send(R.VHOST_USER_SET_VRING_NUM, b"\0" * 4, need_reply=True)
    assert frontend.recv_reply(R.VHOST_USER_SET_VRING_NUM).payload == U64(1)
    assert isinstance(backend.last().error, PayloadSizeError)


def test_wrong_size_on_a_get_with_no_failure_encoding_closes(pair):
    frontend, backend = pair
    frontend.send(R.VHOST_USER_GET_FEATURES, b"\0" * 8)
    assert frontend.wait_closed(timeout=2.0)
    assert isinstance(backend.last(), RejectedRequest)


def test_stray_fds_are_closed_by_the_backend(pair):
    frontend, backend = pair
    before = open_fds()
    fd = os.eventfd(0)
    frontend.send(R.VHOST_USER_SET_OWNER, None, [fd])
    os.close(fd)
    assert frontend.get_features() == OFFERED_FEATURES  # in order: the rejection happened first
    rejected = [e for e in backend.events if isinstance(e, RejectedRequest)][0]
    assert isinstance(rejected.error, FdCountError)
    assert open_fds() == before


def test_missing_kick_fd(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    frontend.send(R.VHOST_USER_SET_VRING_KICK, U64(0), need_reply=True)
    assert frontend.recv_reply(R.VHOST_USER_SET_VRING_KICK).payload == U64(1)
    assert isinstance(backend.last().error, FdCountError)


def test_nine_regions_are_rejected_and_their_fds_closed(pair):
    frontend, backend = pair
    negotiate(frontend, 1 << VIRTIO_F_VERSION_1, OFFERED_PROTOCOL)
    regions = [frontend.add_region(i * 0x10000, 0x1000) for i in range(9)]
    before = open_fds()
    body = struct.pack("=II", 9, 0) + b"".join(frontend.region_desc(r).pack() for r in regions)
    # The kernel passes at most 253 fds; 9 fit, and the backend gets all of them.
    frontend.send(R.VHOST_USER_SET_MEM_TABLE, body, [frontend.region_fd(r) for r in regions], need_reply=True)
    assert frontend.recv_reply(R.VHOST_USER_SET_MEM_TABLE).payload == U64(1)
    assert len(backend.last().fds) == 9
    assert open_fds() == before


def test_bad_version_closes_the_connection(pair):
    frontend, backend = pair
    frontend.send(R.VHOST_USER_GET_FEATURES, flags=0x2)
    assert frontend.wait_closed(timeout=2.0)
    assert isinstance(backend.last().error, BadVersionError)


def test_truncated_header_then_disconnect(pair):
    frontend, backend = pair
    frontend.send_raw(build_message(R.VHOST_USER_GET_FEATURES, VHOST_USER_VERSION)[:7])
    frontend.sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: not backend.thread.is_alive())
    assert isinstance(backend.last().error, TruncatedMessageError)


def test_disconnect_mid_message_with_fds_leaks_nothing(pair):
    frontend, backend = pair
    region = frontend.add_region(0, 0x1000)
    before = open_fds()
    data = build_message(R.VHOST_USER_SET_MEM_TABLE, VHOST_USER_VERSION, MemoryTable((frontend.region_desc(region),)))
    frontend.send_raw(data[:30], [frontend.region_fd(region)])
    frontend.sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: not backend.thread.is_alive())
    failure = backend.last()
    assert isinstance(failure, ProtocolFailure) and len(failure.fds) == 1
    assert failure.error.request == R.VHOST_USER_SET_MEM_TABLE
    # The backend's socket is closed too (-1 fd); no received fd stays open.
    assert open_fds() == before - 1


def test_no_fd_leak_over_many_bad_connections():
    def one_bad_connection(i: int) -> None:
        front_sock, back_sock = socket.socketpair()
        backend = MiniBackend(back_sock)
        with VhostUserFrontend(front_sock, timeout=2.0) as frontend:
            fd = os.eventfd(0)
            kind = i % 4
            if kind == 0:  # stray fd, then a bad version
                frontend.send(R.VHOST_USER_SET_OWNER, None, [fd])
                frontend.send(R.VHOST_USER_SET_OWNER, flags=0)
            elif kind == 1:  # fd with a truncated body
                frontend.send_raw(Header(R.VHOST_USER_SET_LOG_BASE, 1, 16).pack() + b"\0" * 3, [fd])
            elif kind == 2:  # unknown request with an fd
                frontend.send(99, b"", [fd])
            else:  # a kick fd, then disconnect
                frontend.send(R.VHOST_USER_SET_VRING_KICK, U64(0), [fd])
            os.close(fd)
        backend.stop()

    one_bad_connection(0)  # warm up lazily opened fds
    before = open_fds()
    for i in range(100):
        one_bad_connection(i)
    assert open_fds() == before
