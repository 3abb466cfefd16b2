"""Busy-poll mode (``iovirt serve --poll-us``): a kicked ring is polled with kicks suppressed, then kicks return.

While a ring is busy-polled the driver sees VIRTQ_USED_F_NO_NOTIFY (split,
virtio 1.2 2.7.10) or RING_EVENT_FLAGS_DISABLE (packed, 2.8.10) and does not
kick, and its chains are served all the same.  When the ring has been idle
for ``poll_us`` notifications are enabled again, after which the ring is
looked at once more, so a chain made available just before the enable is
not left waiting for a kick that never comes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from iovirt.errors import IovirtError
from iovirt.vhost_user.dataplane import DataPlane
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.defs import RING_EVENT_FLAGS_DISABLE, VIRTIO_F_EVENT_IDX, VIRTQ_USED_F_NO_NOTIFY
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

from backend_helpers import wait_until

POLL_US = 300_000  # long enough for the test's steps to fall inside one polling window
FRAME = NetHdr().pack() + b"\xff" * 12 + b"\x88\xb5" + bytes(46)


@pytest.fixture
def polling_port(tmp_path):
    """A net port served by a data plane that busy-polls for ``POLL_US``; yields (port, socket path)."""
    server = VhostUserServer(poll_us=POLL_US)
    port = VirtioNet(bytes([0x52, 0x54, 0, 0, 0, 1]), LearningSwitch(), label="net0")
    path = str(tmp_path / "net0.sock")
    server.add_socket(path, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield port, path
    server.stop()
    thread.join(10)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["no_event_idx", "event_idx"])
def test_a_polled_ring_is_served_without_kicks_and_kicks_come_back(polling_port, packed, event_idx):
    port, path = polling_port
    features = (1 << 64) - 1 if event_idx else ~(1 << VIRTIO_F_EVENT_IDX) & ((1 << 64) - 1)
    with VhostUserDriver(path, packed=packed, features=features) as drv:
        tx = drv.start_queues([0, 1], size=64)[1]
        tx.add_data([FRAME])
        drv.kick(1)
        assert wait_until(lambda: len(tx.get_used()) == 1)
        # The kick that starts the polling must reach a running ring (one sent while the ring was starting
        # may be taken by its start, the chain served and no polling begun): a second chain comes with a
        # kick, and the device is seen suppressing kicks before the chains that get none.
        tx.add_data([FRAME])
        tx.publish()
        drv.frontend.kick(1)
        assert wait_until(lambda: len(tx.get_used()) == 1)
        assert wait_until(lambda: _kicks_suppressed(tx, packed, event_idx), 2), "no polling after a kick"
        # The second kick may be counted after its chain was served by polling: let the count settle.
        wait_until(lambda: port.queue_stats[1]["kicks"] >= 2, 1)
        kicks = port.queue_stats[1]["kicks"]
        kicks_wanted = late = 0
        last_publish = time.monotonic()  # before the last publish: no earlier than the device served it
        for _ in range(20):
            tx.add_data([FRAME])
            before = time.monotonic()
            wanted = tx.publish()  # published, not kicked
            if wanted and time.monotonic() - last_publish >= POLL_US / 1e6:
                # This thread was held up for a whole polling window (a loaded machine), so the ring may
                # rightly have gone idle with notifications back on: this chain gets the kick a driver gives.
                drv.frontend.kick(1)
                late += 1
            else:
                kicks_wanted += wanted
            last_publish = before
            assert wait_until(lambda: len(tx.get_used()) == 1, 2), "a chain waited for a kick while polling"
        # With EVENT_IDX the avail_event published before the polling began asks for one more kick (split).
        assert kicks_wanted <= (1 if event_idx and not packed else 0)
        assert port.queue_stats[1]["kicks"] == kicks + late
        time.sleep(2 * POLL_US / 1e6)  # idle: notifications back on
        tx.add_data([FRAME])
        assert tx.publish(), "the driver was not asked to kick again after polling stopped"
        drv.frontend.kick(1)
        assert wait_until(lambda: len(tx.get_used()) == 1)
        assert port.queue_stats[1]["kicks"] == kicks + 1 + late
        assert port.stats["tx_packets"] == 23


def _kicks_suppressed(tx, packed: bool, event_idx: bool) -> bool:
    """Whether the ring shows the driver that the device polls it: the used flags' NO_NOTIFY (split, 2.7.10) or
    event suppression DISABLE (packed, 2.8.10).  A split ring with EVENT_IDX shows no such sign."""
    if packed:
        return tx.memory.read_u16(tx.device_addr + 2) & 0x3 == RING_EVENT_FLAGS_DISABLE
    return event_idx or bool(tx.memory.read_u16(tx.used_addr) & VIRTQ_USED_F_NO_NOTIFY)


def test_without_poll_us_every_publish_asks_for_a_kick(serve):
    port = VirtioNet(bytes([0x52, 0x54, 0, 0, 0, 2]), LearningSwitch(), label="net0")
    features = ~(1 << VIRTIO_F_EVENT_IDX) & ((1 << 64) - 1)
    with VhostUserDriver(serve(port), features=features) as drv:
        tx = drv.start_queues([0, 1], size=64)[1]
        for _ in range(5):
            tx.add_data([FRAME])
            assert tx.publish()
            drv.frontend.kick(1)
            assert wait_until(lambda: len(tx.get_used()) == 1)


class FakeQueue:
    """A ring whose driver makes a chain available in the gap between the last look and the enable."""

    def __init__(self) -> None:
        self.available = 0
        self.last_avail_idx = 0
        self.notify = True
        self.calls: list[str] = []
        self.arrive_on_enable = 1

    def pending(self) -> int:
        return self.available

    def disable_notification(self) -> None:
        self.notify = False
        self.calls.append("disable")

    def enable_notification(self) -> bool:
        self.notify = True
        self.calls.append("enable")
        if self.arrive_on_enable:  # the race: made available while notifications were off, no kick
            self.arrive_on_enable -= 1
            self.available += 1
        return self.available > 0

    def serve(self) -> None:
        self.calls.append(f"serve {self.available}")
        self.last_avail_idx += self.available
        self.available = 0


def test_the_ring_is_looked_at_once_more_after_notifications_come_back():
    plane = DataPlane(poll_us=20_000)
    queue = FakeQueue()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    plane.start()
    try:
        plane.add_ring(fd, queue.serve, lambda: queue)
        queue.available = 1
        os.eventfd_write(fd, 1)
        assert wait_until(lambda: not plane._busy and queue.notify and "enable" in queue.calls, 5)
        with plane.lock:
            calls = list(queue.calls)
        # kick -> served; polling (kicks off); idle -> enable, the chain that slipped in is served,
        # kicks off again; idle -> enable, nothing: polling ends with kicks on.
        assert calls[:2] == ["serve 1", "disable"]
        first_enable = calls.index("enable")
        assert calls[first_enable:] == ["enable", "serve 1", "disable", "enable"]
        assert queue.available == 0 and queue.last_avail_idx == 2
    finally:
        plane.remove(fd)
        plane.stop()
        os.close(fd)


def test_a_ring_whose_device_takes_nothing_is_not_kept_busy():
    """Chains available but the device leaves them (ring disabled, rate limit): polling ends, kicks on."""
    plane = DataPlane(poll_us=10_000)
    queue = FakeQueue()
    queue.arrive_on_enable = 0
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    plane.start()
    try:
        plane.add_ring(fd, lambda: queue.calls.append("kick"), lambda: queue)
        queue.available = 3
        os.eventfd_write(fd, 1)
        assert wait_until(lambda: "enable" in queue.calls and not plane._busy, 5)
        assert queue.notify and queue.available == 3
    finally:
        plane.remove(fd)
        plane.stop()
        os.close(fd)


def test_a_broken_ring_ends_polling_through_the_kick_path():
    plane = DataPlane(poll_us=1_000_000)
    queue = FakeQueue()
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    kicks = []

    def broken() -> int:
        raise IovirtError("released")

    plane.start()
    try:
        plane.add_ring(fd, lambda: kicks.append(1), lambda: queue)
        os.eventfd_write(fd, 1)
        assert wait_until(lambda: plane._busy or len(kicks) >= 1, 5)
        with plane.lock:
            queue.pending = broken  # type: ignore[method-assign]
        assert wait_until(lambda: not plane._busy, 5)
        assert len(kicks) == 2  # the eventfd's, and the one that lets the device report the ring
    finally:
        plane.remove(fd)
        plane.stop()
        os.close(fd)


def test_poll_us_in_serve_help_and_refused_when_negative():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for program in ("serve", "vhost-user-net", "vhost-user-blk"):
        out = subprocess.run([sys.executable, "-m", "iovirt", program, "--help"], capture_output=True, text=True,
                             env=env)
        assert "--poll-us US" in out.stdout and "busy-poll" in out.stdout, program
    bad = subprocess.run([sys.executable, "-m", "iovirt", "serve", "--poll-us", "-5"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "--poll-us wants 0 or more microseconds" in bad.stderr


def test_poll_us_with_isolate_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "iovirt", "serve", "--isolate", "--poll-us", "50", "--net",
                          str(tmp_path / "n.sock")], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and "--isolate does not take --poll-us yet" in out.stderr


def test_the_control_plane_is_served_while_a_ring_is_busy_polled(polling_port):
    """A ring kept busy (frames every 50 ms, inside the polling window) must not lock the control plane out."""
    port, path = polling_port
    with VhostUserDriver(path) as drv:
        tx = drv.start_queues([0, 1], size=64)[1]
        tx.add_data([FRAME])
        drv.kick(1)
        assert wait_until(lambda: len(tx.get_used()) == 1)
        stop = threading.Event()
        fed = [0]

        def feed() -> None:
            # A driver that kicks when the device asks: a scheduling gap longer than POLL_US (a loaded
            # machine) ends the polling, and a frame published without a kick would then wait for ever.
            while not stop.wait(0.05):
                tx.get_used()
                tx.add_data([FRAME])
                drv.kick(1)
                fed[0] += 1

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            time.sleep(0.2)
            started = time.monotonic()
            drv.frontend.get_vring_base(0)  # takes the data-path lock
            took = time.monotonic() - started
            wait_until(lambda: fed[0] >= 3)  # a loaded machine may have let the feeder run less
        finally:
            stop.set()
            feeder.join(5)
        assert took < 1.0, f"GET_VRING_BASE waited {took:.2f} s for the polling data plane"
        assert fed[0] >= 3
        # Every frame fed went through (the last may still be in flight when the feeder stops).
        assert wait_until(lambda: port.stats["tx_packets"] == 1 + fed[0]), (port.stats["tx_packets"], fed[0])
