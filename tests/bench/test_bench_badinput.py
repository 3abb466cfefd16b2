"""A back-end that answers nonsense, closes, hangs or writes garbage into used rings: clear errors, bounded waits."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from scapy.layers.l2 import Ether
from scapy.packet import Raw

from iovirt.bench.errors import BenchTimeout, TargetError, UsedRingError
from iovirt.bench.pair import NetPair, ServedNet
from iovirt.bench.port import RX_QUEUE, TX_QUEUE
from iovirt.bench.target import VhostUserTarget
from iovirt.virtio.defs import VIRTIO_F_VERSION_1

FRAME = Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b", type=0x88B5) / Raw(b"z" * 50)


class FakeBackend:
    """A UNIX socket that accepts one front-end and then misbehaves as told."""

    def __init__(self, path: str, behaviour: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.behaviour = behaviour
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if self.behaviour == "close":
                return
            conn.recv(4096)
            if self.behaviour == "garbage":
                conn.sendall(b"\xde\xad\xbe\xef" * 8)
            self.done.wait(5)  # "hang": never answer

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)
        self.listener.close()


@pytest.mark.parametrize(
    "behaviour, message", [("close", "closed"), ("hang", "no reply"), ("garbage", "")], ids=["close", "hang", "garbage"]
)
def test_backend_misbehaving_during_bring_up(tmp_path, behaviour, message):
    path = str(tmp_path / "bad.sock")
    fake = FakeBackend(path, behaviour)
    start = time.monotonic()
    try:
        with pytest.raises(TargetError, match="bring-up failed") as info:
            VhostUserTarget(path, 1 << VIRTIO_F_VERSION_1, timeout=0.3)
    finally:
        fake.stop()
    assert time.monotonic() - start < 2
    assert path in str(info.value)


def test_no_backend_listening(tmp_path):
    start = time.monotonic()
    with pytest.raises(TargetError, match="bring-up failed"):
        VhostUserTarget(str(tmp_path / "nobody.sock"), 0, timeout=0.2)
    assert time.monotonic() - start < 2


def test_backend_closing_mid_run(make_pair):
    if make_pair.target != "vhost-user":
        pytest.skip("only a socket can close")
    pair = make_pair(b={"timeout": 1.0})
    pair.b.target.driver.frontend.sock.shutdown(socket.SHUT_RD)  # as if the back-end hung up on us
    with pytest.raises(TargetError, match="closed the connection"):
        pair.recv(1)


def test_backend_hanging_in_the_data_path(tmp_path):
    """The served back-end's data plane is stuck (its lock held): waits end at the timeout."""
    with ServedNet(tmp_path) as served:
        with served.pair(a={"timeout": 0.3}) as pair:
            with served.lock:
                pair.send(FRAME)
                start = time.monotonic()
                with pytest.raises(BenchTimeout, match="transmitted frames completed: 0 of 1"):
                    pair.a.flush()
                assert time.monotonic() - start < 1.5
            pair.a.flush(timeout=2.0)  # unstuck: it completes


def _forge_used(port, queue_index, head, length, advance=1):
    """Write a used entry into ``port``'s ring as a broken device would."""
    queue = port.rxq if queue_index == RX_QUEUE else port.txq
    slot = queue.used_addr + 4 + 8 * (queue.last_used_idx % queue.size)
    port.memory.write_u32(slot, head)
    port.memory.write_u32(slot + 4, length)
    port.memory.write_u16(queue.used_addr + 2, (queue.last_used_idx + advance) & 0xFFFF)


def _rx_head(port):
    return next(iter(port._rx_by_head))


@pytest.mark.parametrize(
    "forge, match",
    [
        (lambda p: _forge_used(p, RX_QUEUE, _rx_head(p), 64, advance=300), "only 256 descriptors are in flight"),
        (lambda p: _forge_used(p, RX_QUEUE, 999, 64), "used id 999 is not an in-flight head"),
        (lambda p: _forge_used(p, RX_QUEUE, _rx_head(p), 5000), "exceeds its 2048-byte buffer"),
        (lambda p: _forge_used(p, RX_QUEUE, _rx_head(p), 7), "shorter than the 12-byte header"),
    ],
    ids=["idx-jump", "unknown-id", "len-too-big", "too-short"],
)
def test_garbage_in_rx_used_ring(make_pair, forge, match):
    pair = make_pair()
    forge(pair.b)
    with pytest.raises(UsedRingError, match=match):
        pair.recv(1)


def test_num_buffers_zero(make_pair):
    pair = make_pair()
    head = _rx_head(pair.b)
    pair.b.memory.write(pair.b._rx_by_head[head], bytes(12) + bytes(FRAME))  # a header with num_buffers 0
    _forge_used(pair.b, RX_QUEUE, head, 12 + len(FRAME))
    with pytest.raises(UsedRingError, match="num_buffers is 0"):
        pair.recv(1)


def test_num_buffers_promising_more_than_arrives(make_pair):
    pair = make_pair(b={"timeout": 0.2})
    head = _rx_head(pair.b)
    pair.b.memory.write(pair.b._rx_by_head[head], bytes(10) + (3).to_bytes(2, "little") + bytes(FRAME))
    _forge_used(pair.b, RX_QUEUE, head, 12 + len(FRAME))
    with pytest.raises(UsedRingError, match="num_buffers 3 but only 1 buffers were used"):
        pair.recv(1)


def test_garbage_in_tx_used_ring(make_pair):
    pair = make_pair()
    pair.send(FRAME)
    pair.a.flush()
    _forge_used(pair.a, TX_QUEUE, 3, 0, advance=2)
    with pytest.raises(UsedRingError, match="queue 1: used idx 3 is 2 entries past .* only 0 descriptors are in flight"):
        pair.a.flush()


def test_in_process_device_needing_reset():
    with NetPair.in_process() as pair:
        pair.a.txq.add_chain([(0xFFFF_0000_0000, 64)])  # a buffer outside guest memory
        pair.a.target.kick(TX_QUEUE)
        with pytest.raises(TargetError, match="DEVICE_NEEDS_RESET"):
            pair.send(FRAME)
