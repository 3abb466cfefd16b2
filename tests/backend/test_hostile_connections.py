"""Issue 12: what one hostile front-end's connection must not do to the process.

Against the real ``VhostUserServer`` (in this process, so ``/proc/self/fd``
counts its fds) over real UNIX sockets: failures 3 (fds held by a trickled
message; ``accept`` failing with EMFILE), 6 (fds of a message cut short by a
reset), 11 (a front-end that never reads its replies) and "Who may connect"
(``SO_PEERCRED``, socket mode).
"""

from __future__ import annotations

import os
import resource
import select
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from iovirt.vhost_user.bringup import negotiate
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.framing import Header, build_message, request_flags
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import FrontendRequest
from iovirt.vhost_user.peers import AccessPolicy
from iovirt.vhost_user.server import MAX_FDS_PER_MESSAGE, MAX_PENDING_REPLY_BYTES, VhostUserServer
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

from backend_helpers import log_line, wait_until

R = FrontendRequest
NOBODY = 65534
GET_FEATURES = build_message(R.VHOST_USER_GET_FEATURES, request_flags())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def memfds(n: int) -> list[int]:
    fds = []
    for i in range(n):
        fd = os.memfd_create(f"hostile{i}", os.MFD_CLOEXEC)
        os.ftruncate(fd, 0x10000)
        fds.append(fd)
    return fds


def raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def serves(path: str) -> None:
    """A new front-end on ``path`` gets its GET_FEATURES answered."""
    with VhostUserFrontend.connect(path, timeout=5.0) as front:
        assert front.get_features()


# -- failure 3: fds held by a trickled message -------------------------------------------
def test_fds_on_a_later_piece_of_a_message_are_closed_at_once(backend, logs):
    """One byte per sendmsg, 8 fds each: the fds of the second piece are closed with the connection."""
    before = open_fds()
    fds = memfds(MAX_FDS_PER_MESSAGE)
    header = Header(R.VHOST_USER_SET_MEM_TABLE, request_flags(), 8 + 32 * MAX_FDS_PER_MESSAGE).pack()
    sock = raw(backend.net_paths[0])
    sent = 0
    try:
        for byte in header:
            socket.send_fds(sock, [bytes([byte])], fds)
            sent += 1
            time.sleep(0.01)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert sent < len(header)  # cut off long before the header was whole
    assert "fds sent with byte 1 of a message" in log_line(logs, "net0: connection closed")
    sock.close()
    for fd in fds:
        os.close(fd)
    assert wait_until(lambda: open_fds() == before)
    serves(backend.net_paths[0])


def test_more_fds_than_a_message_may_carry_refuse_the_message(backend, logs):
    """Eight regions sent with nine fds: the kernel installs eight, the table is refused, its fds closed."""
    with VhostUserFrontend.connect(backend.net_paths[0], timeout=5.0) as front:
        negotiate(front, (1 << 64) - 1, (1 << 64) - 1)
        regions = [front.add_region(i << 20, 0x10000) for i in range(MAX_FDS_PER_MESSAGE)]
        body = struct.pack("=II", len(regions), 0) + b"".join(front.region_desc(r).pack() for r in regions)
        (extra,) = memfds(1)
        before = open_fds()
        with pytest.raises(NackError):
            front.call(R.VHOST_USER_SET_MEM_TABLE, body, [*(front.region_fd(r) for r in regions), extra],
                       need_reply=True)
        os.close(extra)
        assert "more than 8 fds" in log_line(logs, "net0: rejected VHOST_USER_SET_MEM_TABLE")
        assert wait_until(lambda: open_fds() == before - 1)
        assert front.get_queue_num() == 2  # the connection goes on
        assert not backend.server.endpoints[0].connection.session.table.memory.regions


def test_accept_failing_for_want_of_fds_keeps_serving(backend, logs):
    """EMFILE from accept(): logged once, accepting pauses, the loop lives and accepts once fds are back."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe = os.dup(0)
    os.close(probe)  # the lowest free fd: with the limit there, no new fd can be made
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))
    try:
        client.connect(backend.net_paths[0])
        client.sendall(GET_FEATURES)
        log_line(logs, "net0: cannot accept a front-end", "Too many open files")
        time.sleep(0.3)  # several back-off periods
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert backend.thread.is_alive()
    client.settimeout(5.0)
    assert len(client.recv(64)) == 20  # the pending connection is served once fds are back
    client.close()
    assert len([r for r in logs.records if "cannot accept" in r.getMessage()]) == 1
    log_line(logs, "accepting front-ends again")
    serves(backend.net_paths[1])


# -- failure 6: fds of a message cut short by a reset -------------------------------------
def test_reset_mid_message_closes_its_fds(backend, logs):
    """20 front-ends send half a SET_MEM_TABLE with a memfd, then vanish with ECONNRESET: no fd stays."""
    before = open_fds()
    for _ in range(20):
        (memfd,) = memfds(1)
        sock = raw(backend.net_paths[0])
        # An unread reply in our queue when we close makes the back-end's recv
        # fail with ECONNRESET instead of seeing EOF (unix(7) stream sockets).
        sock.sendall(GET_FEATURES)
        assert select.select([sock], [], [], 5.0)[0]
        header = Header(R.VHOST_USER_SET_MEM_TABLE, request_flags(), 8 + 32).pack()
        socket.send_fds(sock, [header + struct.pack("=II", 1, 0)], [memfd])
        os.close(memfd)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert wait_until(lambda: backend.server.endpoints[0].connection is None)
    assert "Connection reset by peer" in log_line(logs, "net0: connection closed", "socket error")
    assert wait_until(lambda: open_fds() == before), f"{open_fds() - before} fds leaked"
    serves(backend.net_paths[0])


# -- failure 11: a front-end that never reads its replies ---------------------------------
FLOOD = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
burst = bytes.fromhex(sys.argv[2]) * 1000
try:
    while True:
        sock.sendall(burst)  # and never a recv
except OSError:  # the back-end cut us off
    pass
"""


def test_a_front_end_that_never_reads_does_not_stall_the_others(backend, logs):
    """A front-end floods GET_FEATURES and reads nothing; another device's requests are answered meanwhile.

    The flooder is a process of its own, so that only the back-end's control
    loop stands between the two front-ends.  Before the fix every reply the
    flooder left unread blocked the loop for 5 s.  The bound allows a few
    scheduler hiccups of a loaded machine (2 cores shared), not one stall.
    """
    flooder = subprocess.Popen([sys.executable, "-c", FLOOD, backend.net_paths[0], GET_FEATURES.hex()])
    latencies = []
    try:
        with VhostUserFrontend.connect(backend.net_paths[1], timeout=10.0) as front:
            assert wait_until(lambda: backend.server.endpoints[0].connection is not None)
            deadline = time.monotonic() + 60
            while backend.server.endpoints[0].connection is not None or len(latencies) < 20:
                assert time.monotonic() < deadline, "the flooding front-end was never cut off"
                start = time.monotonic()
                assert front.get_features()
                latencies.append(time.monotonic() - start)
                time.sleep(0.01)
    finally:
        flooder.kill()
        flooder.wait(5)
    slow = sorted(t for t in latencies if t >= 0.1)
    assert len(slow) <= max(1, len(latencies) // 20) and max(latencies) < 1.0, (
        f"{len(slow)} of {len(latencies)} answers took 100 ms or more: {[round(t * 1000) for t in slow]} ms"
    )
    line = log_line(logs, "net0: connection closed", "does not read its replies")
    assert f"at most {MAX_PENDING_REPLY_BYTES}" in line
    serves(backend.net_paths[0])


def test_reply_fds_go_out_with_their_bytes(backend):
    """GET_INFLIGHT_FD through the reply queue: the fd arrives with the reply."""
    with VhostUserFrontend.connect(backend.blk_path, timeout=5.0) as front:
        negotiate(front, (1 << 64) - 1, (1 << 64) - 1)
        inflight, fd = front.get_inflight_fd(2, 128)
        try:
            assert os.fstat(fd).st_size >= inflight.mmap_size > 0
        finally:
            os.close(fd)


# -- who may connect ----------------------------------------------------------------------
def test_sockets_are_created_0600(backend):
    for path in (*backend.net_paths, backend.blk_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def connect_as(uid: int, path: str) -> str:
    """Connect to ``path`` from a child running as ``uid``; what it saw: "served", "closed" or an errno name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain system calls only, then _exit
        result = b"?"
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            sock.connect(path)
            sock.sendall(GET_FEATURES)
            result = b"served" if sock.recv(64) else b"closed"
        except (ConnectionResetError, BrokenPipeError):  # closed with our request unread, or before we sent it
            result = b"closed"
        except OSError as exc:
            result = (os.strerror(exc.errno) if exc.errno else str(exc)).encode()
        finally:
            os.write(w, result)
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            return pipe.read().decode()
    finally:
        os.waitpid(pid, 0)


@pytest.fixture
def open_server():
    """Serve one net device on a socket in a directory every user may enter, behind the given access policy."""
    started = []
    where = tempfile.TemporaryDirectory(prefix="iovirt-peers-")  # pytest's tmp_path is private to root
    os.chmod(where.name, 0o755)

    def start(access: AccessPolicy) -> str:
        path = os.path.join(where.name, f"net{len(started)}.sock")
        server = VhostUserServer(access=access)
        server.add_socket(path, VirtioNet(b"\x52\x54\x00\x00\x01\x01", LearningSwitch(), label="net"), name="net")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return path

    yield start
    for server, thread in started:
        server.stop()
        thread.join(10)
    where.cleanup()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
def test_a_peer_of_another_uid_is_refused_and_logged(open_server, logs):
    path = open_server(AccessPolicy.owner(socket_mode=0o777))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
    assert connect_as(NOBODY, path) == "closed"
    line = log_line(logs, "net: refused a front-end")
    assert f"uid {NOBODY}" in line and "pid " in line
    serves(path)  # the owner still may


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
def test_allowed_uid_and_gid_may_connect(open_server):
    assert connect_as(NOBODY, open_server(AccessPolicy(frozenset({NOBODY}), socket_mode=0o777))) == "served"
    assert connect_as(NOBODY, open_server(AccessPolicy(frozenset(), frozenset({NOBODY}), 0o777))) == "served"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer as another uid")
def test_mode_0600_keeps_other_users_out(open_server):
    path = open_server(AccessPolicy(frozenset({NOBODY})))  # allowed, but the file mode says no
    assert connect_as(NOBODY, path) == os.strerror(13)  # EACCES
