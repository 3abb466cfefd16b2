"""The control socket of a running back-end: commands, counters, runtime add/remove, bad requests."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time

from iovirt.cli import main
from iovirt.control.protocol import MAX_REQUEST_BYTES
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.defs import NetHdr

from backend_helpers import wait_until
from control_helpers import ALL, MAC_A, MAC_B, error, ok


def frame(dst: bytes, src: bytes) -> bytes:
    return dst + src + b"\x88\xb5" + bytes(50)


def driver(path: str) -> VhostUserDriver:
    drv = VhostUserDriver(path, features=ALL, memory_size=8 << 20)
    drv.start_queues([0, 1], size=64)
    return drv


def send(drv: VhostUserDriver, data: bytes, count: int = 1) -> None:
    for _ in range(count):
        drv.queues[1].add_data([NetHdr().pack() + data])
    drv.kick(1)
    done: list = []
    assert wait_until(lambda: done.extend(drv.queues[1].get_used()) or len(done) == count)
    drv.frontend.wait_call(1, timeout=0)  # drain the call eventfd


def connected(backend, name: str) -> bool:
    return next(d for d in ok(backend.control_path, "devices") if d["name"] == name)["connected"]


def test_socket_mode_is_0600(backend):
    assert stat.S_IMODE(os.stat(backend.control_path).st_mode) == 0o600


def test_devices_show_the_frontend_features_and_queues(backend):
    with driver(backend.net_paths[0]):
        devices = ok(backend.control_path, "devices")
        assert [d["name"] for d in devices] == ["net0", "net1", "blk0"]
        net0 = devices[0]
        assert net0["socket"] == backend.net_paths[0] and net0["type"] == "net" and net0["connected"]
        assert net0["frontend"]["pid"] == os.getpid()
        assert int(net0["features"], 16) >> 32 & 1  # VIRTIO_F_VERSION_1
        queues = {q["index"]: q for q in net0["queues"]}
        assert queues[1]["state"] == "started" and queues[1]["enabled"] and queues[1]["num"] == 64
        assert {"desc", "avail", "used"} <= set(queues[1]["addr"]) and queues[1]["used_idx"] == 0
        assert not devices[1]["connected"] and "frontend" not in devices[1]


def test_counters_move_per_device_and_queue(backend):
    with driver(backend.net_paths[0]) as a, driver(backend.net_paths[1]) as b:
        before = ok(backend.control_path, "stats", {"device": "net0"})
        b.queues[0].add_data([], [2048])
        b.queues[0].add_data([], [2048])
        b.kick(0)
        send(a, frame(MAC_B, MAC_A), 3)  # unknown destination: flooded to net1 (2 buffers posted)
        assert wait_until(lambda: ok(backend.control_path, "stats", {"device": "net1"})["counters"].get("rx_packets") == 2)
        after = ok(backend.control_path, "stats", {"device": "net0"})
        assert before["counters"].get("tx_packets", 0) == 0
        assert after["counters"]["tx_packets"] == 3 and after["counters"]["tx_bytes"] == 3 * 64
        tx = after["queues"][1]
        assert tx["frames"] == 3 and tx["bytes"] == 3 * 64 and tx["kicks"] >= 1 and tx["calls"] >= 1
        rx = ok(backend.control_path, "stats", {"device": b"".join([backend.net_paths[1].encode()]).decode()})
        assert rx["name"] == "net1" and rx["queues"][0]["frames"] == 2
        # The third frame found no receive buffer: held in the backlog, not dropped yet.
        everything = ok(backend.control_path, "stats")
        assert [d["name"] for d in everything["devices"]] == ["net0", "net1", "blk0"]
        assert everything["switch"]["flooded"] >= 1
        fdb = ok(backend.control_path, "fdb")
        assert {"mac": "02:00:00:00:00:0a", "port": "net0"} == {k: fdb[0][k] for k in ("mac", "port")}
        assert 0 <= fdb[0]["age"] < 60


def test_drops_by_reason_and_counting_switch(backend):
    with driver(backend.net_paths[0]) as a:
        ok(backend.control_path, "counting", {"device": "net0", "enabled": False})
        send(a, frame(MAC_B, MAC_A))
        assert ok(backend.control_path, "stats", {"device": "net0"})["counters"].get("tx_packets", 0) == 0
        ok(backend.control_path, "counting", {"device": "net0", "enabled": True})
        send(a, frame(MAC_B, MAC_A))
        assert ok(backend.control_path, "stats", {"device": "net0"})["counters"]["tx_packets"] == 1
    net1 = backend.net[1]
    net1.link_up = False
    try:
        backend.switch.forward(backend.net[0], frame(MAC_B, MAC_A))
    finally:
        net1.link_up = True
    counters = ok(backend.control_path, "stats", {"device": "net1"})["counters"]
    assert counters["rx_dropped_link_down"] == 1 and counters["rx_dropped"] == 1


def test_metrics_text(backend):
    with driver(backend.net_paths[0]) as a:
        send(a, frame(MAC_B, MAC_A))
        text = ok(backend.control_path, "metrics")
    assert 'iovirt_tx_packets_total{device="net0",type="net"} 1' in text.splitlines()
    assert "# TYPE iovirt_queue_kicks_total counter" in text


def test_bad_requests_get_errors_and_the_connection_stays_usable(backend):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(backend.control_path)
        stream = sock.makefile("rb")
        for line in (b"garbage\n", b"[]\n", b'{"command": "nope"}\n', b'{"command": "stats", "args": {"device": "x"}}\n',
                     b'{"command": "log-level", "args": {"level": "loud"}}\n', b'{"command": "devices", "args": {"a": 1}}\n',
                     b'{"command": "limit", "args": {"device": "net0", "limits": {"rate": "fast"}}}\n',
                     b"\xff\xff\n"):
            sock.sendall(line)
            reply = json.loads(stream.readline())
            assert set(reply) == {"error"} and reply["error"]["class"] in (
                "BadRequest", "CommandNotFound", "DeviceNotFound", "GenericError"), reply
        sock.sendall(b'{"command": "commands"}\n')
        assert "stats" in json.loads(stream.readline())["return"]


def test_oversized_request_closes_the_connection_only(backend):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(backend.control_path)
        try:
            sock.sendall(b"{" + b" " * (MAX_REQUEST_BYTES + 10))
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        assert b"BadRequest" in data
    assert ok(backend.control_path, "commands")


def test_no_fd_leak_after_1000_connections(backend):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    ok(backend.control_path, "stats")
    before = fds()
    for i in range(1000):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(backend.control_path)
            if i % 3 == 0:
                sock.sendall(b'{"command": "stats"}\n')
                sock.settimeout(10)
                sock.recv(1 << 16)
            elif i % 3 == 1:
                sock.sendall(b"junk")  # half a request, then gone
    assert wait_until(lambda: not backend.control.clients, timeout=10)
    assert fds() <= before


def test_log_level(backend):
    import logging

    root = logging.getLogger()
    old = root.level
    try:
        assert ok(backend.control_path, "log-level", {"level": "debug"}) == {"level": "debug"}
        assert root.level == logging.DEBUG
    finally:
        root.setLevel(old)


def test_add_net_then_remove_in_the_middle_of_io(backend):
    path = str(backend.tmp / "net-added.sock")
    added = ok(backend.control_path, "add-net", {"socket": path})
    assert added == {"name": "net2", "socket": path}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with driver(backend.net_paths[0]) as a, driver(path) as c:
        for _ in range(8):
            c.queues[0].add_data([], [2048])
        c.kick(0)
        send(a, frame(MAC_B, MAC_A))
        assert wait_until(lambda: ok(backend.control_path, "stats", {"device": "net2"})["counters"].get("rx_packets") == 1)
        # Traffic keeps flowing from net0 while net2 goes away.
        stop = threading.Event()

        def blast() -> None:
            while not stop.is_set():
                for _ in range(16):
                    a.queues[1].add_data([NetHdr().pack() + frame(MAC_B, MAC_A)])
                a.kick(1)
                a.frontend.wait_call(1, timeout=1)
                a.queues[1].get_used()

        sender = threading.Thread(target=blast)
        sender.start()
        try:
            time.sleep(0.2)
            assert ok(backend.control_path, "remove", {"device": "net2"}) == {"name": "net2"}
            time.sleep(0.2)
        finally:
            stop.set()
            sender.join(10)
        # net2's front-end sees its connection closed; the socket file is gone.
        c.frontend.sock.settimeout(5)
        assert c.frontend.sock.recv(1) == b""
        assert not os.path.exists(path)
    assert [d["name"] for d in ok(backend.control_path, "devices")] == ["net0", "net1", "blk0"]
    assert all(p.label != "net2" for p in backend.switch.ports if isinstance(p, VirtioNet))
    with driver(backend.net_paths[0]) as a:
        send(a, frame(MAC_B, MAC_A))  # the others keep working
    # A removed name is gone; the next add gets a new name.
    assert error(backend.control_path, "remove", {"device": "net2"})["class"] == "DeviceNotFound"
    assert ok(backend.control_path, "add-net", {"socket": str(backend.tmp / "n3.sock")})["name"] == "net3"


def test_add_blk_and_bad_adds(backend):
    image = backend.tmp / "second.img"
    image.write_bytes(bytes(1 << 20))
    path = str(backend.tmp / "blk-added.sock")
    assert ok(backend.control_path, "add-blk", {"socket": path, "image": str(image), "read_only": True})["name"] == "blk1"
    assert error(backend.control_path, "add-blk", {"socket": "relative.sock", "image": str(image)})["class"] == "BadRequest"
    assert "cannot add" in error(backend.control_path, "add-blk",
                                 {"socket": str(backend.tmp / "x.sock"), "image": str(backend.tmp / "none" / "x")})["desc"]
    regular = backend.tmp / "regular"
    regular.write_text("")
    assert "not a socket" in error(backend.control_path, "add-net", {"socket": str(regular)})["desc"]
    assert ok(backend.control_path, "remove", {"device": path}) == {"name": "blk1"}


class LimitedPort(VirtioNet):
    """A stand-in for a port with QoS: records what it is given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits: dict[str, float] = {}

    def set_limits(self, limits: dict[str, float]) -> None:
        for key in limits:
            if key not in ("tx_pps", "tx_bps"):
                raise KeyError(f"unknown limit {key}")
        self.limits.update(limits)


def test_limit_calls_set_limits(tmp_path, controlled_backend):
    b = controlled_backend(tmp_path)
    try:
        port = LimitedPort(bytes.fromhex("525400100009"), b.switch, label="qos0")
        b.server.add_socket(str(tmp_path / "qos.sock"), port)
        assert ok(b.control_path, "limit", {"device": "qos0", "limits": {"tx_pps": 1000, "tx_bps": 1.5e6}}) == {
            "name": "qos0", "limits": {"tx_pps": 1000.0, "tx_bps": 1.5e6}}
        assert port.limits == {"tx_pps": 1000.0, "tx_bps": 1.5e6}
        assert "unknown limit" in error(b.control_path, "limit", {"device": "qos0", "limits": {"iops": 1}})["desc"]
        assert error(b.control_path, "limit", {"device": "qos0", "limits": {"tx_pps": -1}})["class"] == "BadRequest"
        assert error(b.control_path, "limit", {"device": "qos0", "limits": {}})["class"] == "BadRequest"
    finally:
        b.stop()


def test_blk_requests_by_type(backend):
    from blk_client import blk_request
    from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT

    with VhostUserDriver(backend.blk_path, features=ALL, memory_size=8 << 20) as drv:
        drv.start_queues([0], size=64)
        assert blk_request(drv, VIRTIO_BLK_T_OUT, 0, out=bytes(4096))[1] == VIRTIO_BLK_S_OK
        assert blk_request(drv, VIRTIO_BLK_T_IN, 0, in_len=4096)[1] == VIRTIO_BLK_S_OK
        assert blk_request(drv, VIRTIO_BLK_T_IN, 8, in_len=512)[1] == VIRTIO_BLK_S_OK
        blk_request(drv, VIRTIO_BLK_T_GET_ID, 0, in_len=20)
        stats = ok(backend.control_path, "stats", {"device": "blk0"})
    counters = stats["counters"]
    assert (counters["read"], counters["write"], counters["get_id"]) == (2, 1, 1)
    assert counters["read_bytes"] == 4096 + 512 and counters["write_bytes"] == 4096
    assert stats["queues"][0]["requests"] == 4 and stats["queues"][0]["bytes"] == 2 * 4096 + 512


def test_ctl_command_line(backend, capsys):
    assert main(["ctl", backend.control_path, "stats", "net0"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "net0"
    assert main(["ctl", backend.control_path, "metrics"]) == 0
    assert capsys.readouterr().out.startswith("# HELP")
    assert main(["ctl", backend.control_path, "remove", "nosuch"]) == 1
    assert "DeviceNotFound" in capsys.readouterr().err
    assert main(["ctl", str(backend.tmp / "absent.sock"), "stats"]) == 2


def test_limit_reaches_the_real_devices(backend):
    """``limit`` on served net and blk devices: their QoS limits change at once, bad keys are refused."""
    assert ok(backend.control_path, "limit", {"device": "net0", "limits": {"pps": 1000, "bps": 2e6}})["limits"] == {
        "pps": 1000.0, "bps": 2e6}
    assert backend.net[0].limits() == {"pps": 1000.0, "bps": 2e6}
    ok(backend.control_path, "limit", {"device": "blk0", "limits": {"iops": 50}})
    assert backend.blk.limits()["iops"] == 50.0
    ok(backend.control_path, "limit", {"device": "net0", "limits": {"pps": 0}})  # 0 lifts a limit
    assert backend.net[0].limits()["pps"] == 0.0
    assert error(backend.control_path, "limit", {"device": "net0", "limits": {"iops": 1}})["class"] == "BadRequest"
    assert error(backend.control_path, "limit", {"device": "blk0", "limits": {"bps": -5}})["class"] == "BadRequest"
