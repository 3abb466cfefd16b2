"""Issue 14, QoS over vhost-user: iovirt's own front-end against a served net port and blk device.

The limits hold within 10 % over 5 s, and a blk device at its limit serves
the requests it held back when tokens are back: the data plane's timer does
it, with no new kick from the guest.  Limits changed from another thread
(the control plane's) take effect at once.
"""

from __future__ import annotations

import threading
import time

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

from qos_helpers import MAC, Reader, Sender, eth, wait_until, within

RX, TX = 0, 1


class Served:
    """A net port (alone on its switch: the sink) and a blk device, served on UNIX sockets."""

    def __init__(self, tmp) -> None:
        self.server = VhostUserServer()
        self.net = VirtioNet(MAC, LearningSwitch(), label="net0")
        self.net_path = str(tmp / "net.sock")
        self.server.add_socket(self.net_path, self.net, name="net0")
        self.blk = VirtioBlk(str(tmp / "disk.img"), size=4 << 20, label="blk0")
        self.blk_path = str(tmp / "blk.sock")
        self.server.add_socket(self.blk_path, self.blk, name="blk0")
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.blk.close()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.stop()


def blk_guest(served: Served, depth: int, size: int) -> tuple[VhostUserDriver, Reader]:
    drv = VhostUserDriver(served.blk_path, memory_size=16 << 20)
    (queue,) = drv.start_queues([0], size=128).values()
    return drv, Reader(queue, depth, size, lambda: drv.kick(0))


def test_net_bps_limit_holds_over_5_s(served):
    """1000-byte frames as fast as the guest puts them on the ring, held to 4 MB/s."""
    served.net.set_limits({"bps": 4_000_000})
    with VhostUserDriver(served.net_path, memory_size=8 << 20) as drv:
        queue = drv.start_queues([RX, TX], size=256)[TX]
        sender = Sender(drv.memory, queue, eth(1000), lambda: drv.kick(TX))
        elapsed = sender.run(5.0, pause=lambda: drv.frontend.wait_call(TX, timeout=0.002))
        stats = served.net.stats
        assert wait_until(lambda: stats["tx_packets"] + stats["tx_drop_rate_limit"] == sender.sent)
    passed_bytes = stats["tx_bytes"]
    assert stats["tx_drop_rate_limit"] > 0
    assert within(passed_bytes / elapsed, 4_000_000), f"{passed_bytes} bytes in {elapsed:.2f} s"


def test_blk_bps_limit_holds_over_5_s(served):
    """64 KiB reads at queue depth 16, held to 8 MiB/s; the guest only kicks when it posts a request."""
    served.blk.set_limits({"bps": 8 << 20})
    drv, reader = blk_guest(served, depth=16, size=64 << 10)
    with drv:
        start = time.monotonic()
        while time.monotonic() - start < 5.0:
            reader.step()
            drv.frontend.wait_call(0, timeout=0.005)
        elapsed = time.monotonic() - start
        reader.step()
    assert reader.bad_status == 0
    assert within(reader.done * (64 << 10) / elapsed, 8 << 20), f"{reader.done} reads in {elapsed:.2f} s"


def test_blk_requests_held_back_are_served_without_a_new_kick(served):
    served.blk.set_limits({"iops": 40})  # a burst of 4, then 40 a second
    drv, reader = blk_guest(served, depth=30, size=4096)
    with drv:
        reader.step()  # 30 requests, one kick
        start = time.monotonic()
        while reader.done < 30 and time.monotonic() - start < 5:
            drv.frontend.wait_call(0, timeout=0.05)
            reader.collect()  # completions only: no request posted, no kick
        elapsed = time.monotonic() - start
    assert reader.done == 30 and reader.bad_status == 0
    assert 0.5 < elapsed < 1.5  # 26 requests beyond the burst at 40/s: 0.65 s


def test_blk_limit_lifted_from_another_thread_serves_the_waiting_requests(served):
    served.blk.set_limits({"iops": 1})  # one request, then one a second
    drv, reader = blk_guest(served, depth=20, size=4096)
    with drv:
        reader.step()
        time.sleep(0.2)
        reader.collect()
        assert reader.done == 1
        lifted = time.monotonic()
        changer = threading.Thread(target=served.blk.set_limits, args=({"iops": 0},))
        changer.start()
        changer.join()
        while reader.done < 20 and time.monotonic() - lifted < 5:
            drv.frontend.wait_call(0, timeout=0.05)
            reader.collect()
        assert reader.done == 20 and reader.bad_status == 0
        assert time.monotonic() - lifted < 0.5
