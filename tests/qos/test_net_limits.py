"""Issue 14, QoS for net: per-port transmit limits in frames/s (pps) and bytes/s (bps).

Frames a guest transmits beyond a limit are dropped before the switch and
counted (``tx_drop_rate_limit``); the limits hold within 10 % over 5 s, on a
device driven directly (this file) and over vhost-user
(``test_limits_vhost_user.py``).  ``Frames.fit``/``truncate``, which the
policer cuts a batch with, are compared across the two data-path twins.
"""

from __future__ import annotations

import math
import random
import threading

import pytest

from iovirt import _accel
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net import _datapath_py
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

from qos_helpers import MAC, Sender, eth, within

TX = 1
MEM = 4 << 20
FRAMES = _accel.implementations("iovirt.virtio.net._datapath_c", _datapath_py, "Frames")


@pytest.fixture(params=["python", "cython"])
def frames_cls(request):
    if request.param not in FRAMES:
        if _accel.NO_EXTENSIONS:
            pytest.skip("IOVIRT_NO_EXTENSIONS set: pure Python run")
        pytest.fail("the Cython net data path did not load (build it: python3 setup.py build_ext --inplace)")
    return FRAMES[request.param]


def port(queue_size: int = 256) -> tuple[VirtioNet, Sender]:
    """A port alone on a switch (its frames go nowhere: the sink) with a guest keeping its transmit ring full."""
    memory = GuestMemory.from_ranges([(0, MEM)])
    queue = DriverQueue(memory, BumpAllocator(0x1000, MEM - 0x1000), queue_size, index=TX)
    dev = VirtioNet(MAC, LearningSwitch())
    dev.set_features(1 << VIRTIO_F_VERSION_1)
    dev.start_queue(TX, memory, queue.state(), notify=lambda: None)
    dev.set_queue_enabled(TX, True)

    def kick() -> None:
        queue.publish()
        dev.kick(TX)

    return dev, Sender(memory, queue, eth(100), kick)


# -- the batch cut, in both twins ---------------------------------------------------------


def test_fit_and_truncate_agree_across_twins():
    if len(FRAMES) < 2:
        pytest.skip("one data-path twin only")
    rng = random.Random(14)
    for _ in range(300):
        sizes = [rng.randint(14, 2000) for _ in range(rng.randint(0, 70))]
        twins = [cls() for cls in FRAMES.values()]
        for frames in twins:
            for size in sizes:
                frames.append(bytes(size))
        max_frames, max_bytes = rng.randint(-1, 80), rng.randint(0, 40_000)
        fits = [frames.fit(max_frames, max_bytes) for frames in twins]
        assert fits[0] == fits[1]
        count, nbytes = fits[0]
        assert nbytes == sum(sizes[:count]) <= max_bytes and count <= max(max_frames, 0)
        assert count == len(sizes) or count == max(max_frames, 0) or nbytes + sizes[count] > max_bytes
        for frames in twins:
            frames.truncate(count)
            assert len(frames) == count and frames.total_bytes() == nbytes
            frames.append(bytes(20))  # the buffer goes on where the kept frames end
            assert frames.frame(count) == bytes(20) and frames.total_bytes() == nbytes + 20


def test_truncate_refuses_a_negative_count(frames_cls):
    frames = frames_cls()
    frames.append(bytes(60))
    with pytest.raises(ValueError, match="cannot keep -1 frames"):
        frames.truncate(-1)
    frames.truncate(5)
    assert len(frames) == 1


# -- the API the CLI and the control socket call -------------------------------------------


def test_set_limits_and_read_them_back():
    dev = VirtioNet(MAC, label="port0")
    assert dev.limits() == {"pps": 0.0, "bps": 0.0}
    dev.set_limits({"pps": 1000})
    dev.set_limits({"bps": 12_500_000})
    assert dev.limits() == {"pps": 1000.0, "bps": 12_500_000.0}
    dev.set_limits({"pps": 0})
    assert dev.limits() == {"pps": 0.0, "bps": 12_500_000.0}


@pytest.mark.parametrize(
    "limits, message",
    [
        ({"iops": 10}, "port0: unknown limit 'iops'; the limits are pps, bps"),
        ({"pps": -5}, "port0: limit pps=-5 must be a finite number >= 0"),
        ({"bps": math.nan}, "port0: limit bps=nan must be a finite number >= 0"),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(limits, message):
    dev = VirtioNet(MAC, label="port0")
    dev.set_limits({"pps": 50})
    with pytest.raises(ValueError, match=f"^{message}"):
        dev.set_limits({"bps": 1000, **limits})
    assert dev.limits() == {"pps": 50.0, "bps": 0.0}


def test_unlimited_port_drops_nothing():
    dev, guest = port()
    for _ in range(20):
        guest.step()
    assert dev.stats["tx_packets"] == guest.sent  # the in-process device serves each kick at once
    assert dev.stats["tx_drop_rate_limit"] == 0


def test_limits_change_at_runtime_from_another_thread():
    dev, guest = port()
    dev.set_limits({"pps": 10})  # a burst of 1 frame, then 10 a second
    guest.step()
    guest.step()
    assert dev.stats["tx_packets"] <= 2
    assert dev.stats["tx_drop_rate_limit"] >= 254
    changer = threading.Thread(target=dev.set_limits, args=({"pps": 0},))
    changer.start()
    changer.join()
    before = dev.stats["tx_packets"]
    guest.step()
    assert dev.stats["tx_packets"] - before == 256  # the ring after the change passed whole


def test_pps_limit_holds_over_5_s():
    """A guest transmitting as fast as it can, held to 2,000 frames/s."""
    dev, guest = port()
    dev.set_limits({"pps": 2000})
    elapsed = guest.run(5.0)
    passed, dropped = dev.stats["tx_packets"], dev.stats["tx_drop_rate_limit"]
    assert passed + dropped == guest.sent  # the in-process device serves each kick at once
    assert dropped > passed  # the guest offered more than the limit
    assert within(passed / elapsed, 2000), f"{passed} frames in {elapsed:.2f} s"
