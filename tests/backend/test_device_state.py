"""DEVICE_STATE (vhost-user.rst "Migrating back-end state") through the real ``VhostUserServer``.

iovirt's own front-end plays the VMMs (QEMU 7.2 does not speak it): it
stops the rings, sends SET_DEVICE_STATE_FD with one end of a pipe, reads
(save) or writes (load) the state, closes its end and asks
CHECK_DEVICE_STATE.  State moves between two ports of one process, between
two blk devices on one disk, and between two ``iovirt serve`` processes.
Every bad stream is refused by CHECK_DEVICE_STATE with a log line naming
the problem, the destination keeps its own state, and it goes on serving.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import zlib

import pytest

from iovirt.vhost_user.devstate import FORMAT_VERSION, HEADER, MAGIC, decode, encode
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.errors import NackError
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import DeviceStateTransfer, MigrationPhase, ProtocolFeature, TransferDirection
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_ID_BLOCK
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.defs import VIRTIO_ID_NET, NetHdr
from blk_client import blk_request

from backend_helpers import log_line, wait_until

SAVE = DeviceStateTransfer(TransferDirection.SAVE, MigrationPhase.STOPPED)
LOAD = DeviceStateTransfer(TransferDirection.LOAD, MigrationPhase.STOPPED)
NO_DEVICE_STATE = ~(1 << ProtocolFeature.VHOST_USER_PROTOCOL_F_DEVICE_STATE) & ((1 << 64) - 1)


# -- the front-end's side ---------------------------------------------------------------


def save(frontend: VhostUserFrontend) -> bytes:
    """SET_DEVICE_STATE_FD(save) with a pipe, read to end of file, CHECK_DEVICE_STATE."""
    r, w = os.pipe()
    try:
        assert frontend.set_device_state_fd(SAVE, w) is None  # the back-end uses our pipe
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as reader:
        data = reader.read()
    frontend.check_device_state()
    return data


def load(frontend: VhostUserFrontend, data: bytes) -> None:
    """SET_DEVICE_STATE_FD(load) with a pipe, write ``data`` and close, CHECK_DEVICE_STATE."""
    r, w = os.pipe()
    try:
        assert frontend.set_device_state_fd(LOAD, r) is None
    finally:
        os.close(r)
    with os.fdopen(w, "wb") as writer:
        writer.write(data)
    frontend.check_device_state()


def stop_rings(drv: VhostUserDriver) -> None:
    """GET_VRING_BASE on every started ring: the device is suspended (the "stopped" phase)."""
    for index in list(drv.queues):
        drv.frontend.get_vring_base(index)
    drv.queues.clear()


def net_port(backend, i: int, **kwargs) -> VhostUserDriver:
    path = backend.net_paths[i]
    assert wait_until(lambda: next(e for e in backend.server.endpoints if e.path == path).connection is None)
    return VhostUserDriver(path, memory_size=8 << 20, **kwargs)


def frame_from(mac: bytes) -> bytes:
    return b"\xff" * 6 + mac + b"\x88\xb5" + bytes(range(50))


def traffic_flows(src: VhostUserDriver, dst: VhostUserDriver, mac: bytes) -> bool:
    """One broadcast frame from ``src``'s transmit queue arrives in ``dst``'s receive buffer."""
    for drv in (src, dst):
        if not drv.queues:
            drv.start_queues([0, 1], size=16)
    dst.queues[0].add_data([], [2048])
    dst.kick(0)
    frame = frame_from(mac)
    src.queues[1].add_data([NetHdr().pack() + frame])
    src.kick(1)
    assert src.frontend.wait_call(1, timeout=5) and dst.frontend.wait_call(0, timeout=5)
    src.queues[1].get_used()
    (used,) = dst.queues[0].get_used()
    return bytes(used.data[12:12 + len(frame)]) == frame


# -- net: two ports of one process ----------------------------------------------------------


def test_net_port_state_moves_to_another_port(backend, logs):
    source, dest = net_port(backend, 0), net_port(backend, 1)
    try:
        mac = backend.net[0].mac
        source.frontend.net_set_mtu(9000)
        assert traffic_flows(source, dest, mac)
        backend.net[0].link_up = False
        stop_rings(source)
        stop_rings(dest)
        expected = backend.net[0].state()
        assert expected["stats"]["tx_packets"] == 1 and expected["mtu"] == 9000

        data = save(source.frontend)
        assert decode(data, VIRTIO_ID_NET) == expected
        assert backend.net[0].state() == expected  # saving changes nothing: the source may resume
        load(dest.frontend, data)
        log_line(logs, "net1", "device state loaded")

        assert backend.net[1].state() == expected
        config = dest.frontend.get_config(0, 12)
        assert config[:6] == mac and struct.unpack_from("<HHH", config, 6) == (0, 2, 9000)
        backend.net[0].link_up = backend.net[1].link_up = True
        assert traffic_flows(source, dest, mac)  # both resume after the transfer
    finally:
        source.close()
        dest.close()


def test_device_state_is_refused_while_rings_are_started(backend, logs):
    with net_port(backend, 0) as drv:
        drv.start_queues([0, 1], size=16)
        r, w = os.pipe()
        with pytest.raises(NackError):
            drv.frontend.set_device_state_fd(SAVE, w)
        os.close(w)
        assert os.read(r, 1) == b""  # the back-end closed the fd it refused
        os.close(r)
        assert "rings are started" in log_line(logs, "rejected", "SET_DEVICE_STATE_FD")
        with pytest.raises(NackError):
            drv.frontend.check_device_state()  # nothing to check


def test_device_state_needs_the_protocol_feature(backend, logs):
    with net_port(backend, 0, protocol_features=NO_DEVICE_STATE) as drv:
        r, w = os.pipe()
        with pytest.raises(NackError):
            drv.frontend.set_device_state_fd(SAVE, w)
        os.close(r)
        os.close(w)
        assert "was not negotiated" in log_line(logs, "rejected", "SET_DEVICE_STATE_FD")


def test_the_wrong_end_of_the_pipe_is_refused(backend, logs):
    with net_port(backend, 0) as drv:
        r, w = os.pipe()
        with pytest.raises(NackError):
            drv.frontend.set_device_state_fd(SAVE, r)
        os.close(r)
        os.close(w)
        assert "is not writable" in log_line(logs, "rejected", "SET_DEVICE_STATE_FD")


def test_a_load_the_front_end_never_finishes_fails_the_check_and_the_session_goes_on(backend, logs):
    with net_port(backend, 0) as drv:
        before = backend.net[0].state()
        r, w = os.pipe()
        drv.frontend.set_device_state_fd(LOAD, r)
        os.close(r)
        os.write(w, encode(VIRTIO_ID_NET, before)[:10])  # and never closes
        started = time.monotonic()
        with pytest.raises(NackError):
            drv.frontend.check_device_state()
        assert time.monotonic() - started < 5
        assert "has not finished" in log_line(logs, "rejected", "CHECK_DEVICE_STATE")
        os.close(w)
        assert backend.net[0].state() == before
        with net_port(backend, 1) as other:
            assert traffic_flows(drv, other, backend.net[0].mac)


def test_the_data_plane_is_not_held_while_check_waits(backend):
    """While CHECK_DEVICE_STATE waits for a transfer's end, the data-path lock is free."""
    with net_port(backend, 0) as drv:
        r, w = os.pipe()
        drv.frontend.set_device_state_fd(LOAD, r)
        os.close(r)
        held: list[bool] = []

        def probe() -> None:
            time.sleep(0.3)  # CHECK is waiting by now
            got = backend.server.dataplane.lock.acquire(timeout=0.3)
            held.append(not got)
            if got:
                backend.server.dataplane.lock.release()

        thread = threading.Thread(target=probe)
        thread.start()
        with pytest.raises(NackError):
            drv.frontend.check_device_state()
        thread.join()
        os.close(w)
        assert held == [False]


# -- bad input: each refused by CHECK_DEVICE_STATE, the port keeps its state and serves ----------


def _good_net_state(backend) -> dict:
    state = backend.net[0].state()
    return dict(state, mac="02:00:00:00:00:99", mtu=4000, stats={"tx_packets": 7})


def _with_header(payload: bytes, version: int = FORMAT_VERSION, device_id: int = VIRTIO_ID_NET) -> bytes:
    return HEADER.pack(MAGIC, version, device_id, 0, len(payload), zlib.crc32(payload)) + payload


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x40]) + data[offset + 1:]


BAD_STREAMS = {
    "truncated": (lambda good: good[:-5], "truncated"),
    "truncated header": (lambda good: good[:HEADER.size - 1], "truncated"),
    "empty": (lambda good: b"", "truncated"),
    "corrupt payload (CRC)": (lambda good: _flip(good, HEADER.size + 3), "CRC-32"),
    "corrupt magic": (lambda good: _flip(good, 0), "magic"),
    "corrupt JSON": (lambda good: _with_header(b'{"mac": '), "JSON"),
    "another device type": (lambda good: encode(VIRTIO_ID_BLOCK, {"capacity": 2048}), "from another device type"),
    "a newer format version": (lambda good: _with_header(good[HEADER.size:], FORMAT_VERSION + 1), "newer format"),
    "MTU out of range": (lambda good: _restate(good, mtu=70000), "MTU 70000"),
    "bad MAC": (lambda good: _restate(good, mac="zz"), "MAC"),
    "negative counter": (lambda good: _restate(good, stats={"rx_packets": -1}), "rx_packets"),
    "other queue pairs": (lambda good: _restate(good, queue_pairs=3), "queue pairs"),
    "missing field": (lambda good: _restate(good, link_up=None, drop="link_up"), "link_up"),
}


def _restate(good: bytes, drop: str | None = None, **fields) -> bytes:
    state = dict(decode(good, VIRTIO_ID_NET), **fields)
    if drop:
        del state[drop]
    return encode(VIRTIO_ID_NET, state)


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_bad_state_is_refused_and_the_port_keeps_serving(backend, logs, case):
    make, words = BAD_STREAMS[case]
    good = encode(VIRTIO_ID_NET, _good_net_state(backend))
    with net_port(backend, 0) as drv:
        before = backend.net[0].state()
        with pytest.raises(NackError):
            load(drv.frontend, make(good))
        line = log_line(logs, "rejected", "CHECK_DEVICE_STATE")
        assert words in line, line
        assert "Traceback" not in logs.text
        assert backend.net[0].state() == before
        with net_port(backend, 1) as other:
            assert traffic_flows(drv, other, backend.net[0].mac)
        # The same session still takes a good state afterwards.
        stop_rings(drv)
        load(drv.frontend, good)
        assert backend.net[0].mtu == 4000


# -- blk: counters move, the disk's identity is checked --------------------------------------------


@pytest.fixture
def disks(tmp_path):
    server = VhostUserServer()
    image, other = tmp_path / "disk.img", tmp_path / "bigger.img"
    devices = {
        "a": VirtioBlk(str(image), size=1 << 20, label="blkA"),
        "b": VirtioBlk(str(image), label="blkB"),  # the same disk, as a migration destination
        "c": VirtioBlk(str(other), size=2 << 20, label="blkC"),
    }
    paths = {}
    for name, device in devices.items():
        paths[name] = str(tmp_path / f"{name}.sock")
        server.add_socket(paths[name], device, name=device.label)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield devices, paths
    server.stop()
    thread.join(timeout=10)
    for device in devices.values():
        device.close()


def test_blk_counters_move_to_a_device_on_the_same_disk(disks, logs):
    devices, paths = disks
    with VhostUserDriver(paths["a"]) as a, VhostUserDriver(paths["b"]) as b:
        a.start_queues([0], size=16)
        data = os.urandom(4096)
        assert blk_request(a, VIRTIO_BLK_T_OUT, 8, out=data) == (b"", VIRTIO_BLK_S_OK)
        stop_rings(a)
        state = save(a.frontend)
        assert decode(state, VIRTIO_ID_BLOCK)["stats"] == {"read_bytes": 0, "write_bytes": 4096, "flush": 0, "read": 0, "write": 1}
        load(b.frontend, state)
        assert devices["b"].stats == devices["a"].stats
        b.start_queues([0], size=16)
        assert blk_request(b, VIRTIO_BLK_T_IN, 8, in_len=4096) == (data, VIRTIO_BLK_S_OK)
        assert devices["b"].stats["read_bytes"] == 4096 and devices["b"].stats["write_bytes"] == 4096


def test_blk_state_of_another_capacity_is_refused(disks, logs):
    devices, paths = disks
    with VhostUserDriver(paths["a"]) as a, VhostUserDriver(paths["c"]) as c:
        state = save(a.frontend)
        with pytest.raises(NackError):
            load(c.frontend, state)
        assert "capacity 2048 saved, this device's is 4096" in log_line(logs, "rejected", "CHECK_DEVICE_STATE")
        c.start_queues([0], size=16)
        assert blk_request(c, VIRTIO_BLK_T_OUT, 0, out=bytes(512))[1] == VIRTIO_BLK_S_OK


def test_net_state_into_blk_is_refused(backend, logs):
    with net_port(backend, 0) as net:
        state = save(net.frontend)
    with VhostUserDriver(backend.blk_path) as blk:
        with pytest.raises(NackError):
            load(blk.frontend, state)
        assert "saved from a device of virtio ID 1, loaded into virtio ID 2" in log_line(logs, "CHECK_DEVICE_STATE")


# -- two iovirt processes ---------------------------------------------------------------------------


def _serve(sock: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "iovirt", "serve", "--net", f"{sock},config=on", "--queues", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "the socket never appeared"
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=15)
    return out.decode()


def test_round_trip_between_two_iovirt_processes(tmp_path):
    """Save from process A over a pipe, load into process B: B's port then has A's configuration and counters."""
    a_sock, b_sock = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    a, b = _serve(a_sock), _serve(b_sock)
    try:
        with VhostUserDriver(a_sock, memory_size=8 << 20) as src:
            src.frontend.net_set_mtu(4321)
            src.start_queues([0, 1], size=16)
            for _ in range(3):
                src.queues[1].add_data([NetHdr().pack() + frame_from(b"\x02\0\0\0\0\x01")])
                src.kick(1)
                assert src.frontend.wait_call(1, timeout=5)
                src.queues[1].get_used()
            stop_rings(src)
            state = save(src.frontend)
        saved = decode(state, VIRTIO_ID_NET)
        assert saved["mtu"] == 4321 and saved["stats"]["tx_packets"] == 3

        with VhostUserDriver(b_sock, memory_size=8 << 20) as dst:
            assert decode(save(dst.frontend), VIRTIO_ID_NET) != saved
            load(dst.frontend, state)
            assert struct.unpack_from("<H", dst.frontend.get_config(10, 2))[0] == 4321
            assert decode(save(dst.frontend), VIRTIO_ID_NET) == saved  # B now holds A's state
            # A bad stream is refused by B, which keeps A's state and goes on serving.
            with pytest.raises(NackError):
                load(dst.frontend, state[:-1])
            assert decode(save(dst.frontend), VIRTIO_ID_NET) == saved
        assert a.poll() is None and b.poll() is None
    finally:
        a_out, b_out = _stop(a), _stop(b)
    assert "device state loaded" in b_out
    assert "device state truncated" in b_out
    assert "Traceback" not in a_out + b_out
