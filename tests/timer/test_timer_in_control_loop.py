"""Guest timers and device requests in one process and one loop (issue 7).

The timer multiplexer's one host timer (a timerfd) sits in the vhost-user
back-end's control loop: a vLAPIC's periodic timer keeps ticking on the real
clock while a blk front-end is served through the same process.
"""

from __future__ import annotations

import struct
import threading
import time

from iovirt.timer import ApicBus, MonotonicClock, TimerFd, TimerMultiplexer
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN
from iovirt.virtio.blk.device import VirtioBlk

VECTOR = 0x40
PERIOD_NS = 1_000_000  # 1 kHz


def test_lapic_timer_ticks_in_the_backend_loop_while_a_device_is_served(tmp_path):
    mux = TimerMultiplexer(MonotonicClock(), TimerFd())
    ticks = []

    def service(lapic, vector):
        ticks.append(vector)

    def vcpu_kick(lapic):  # the vCPU takes the interrupt at once
        lapic.ack()
        lapic.eoi()

    bus = ApicBus(mux, 1, service_routine=service, on_pending=vcpu_kick)
    lapic = bus.lapics[0]
    lapic.mmio_write(0xF0, 4, 0x1FF)  # SVR: software enable
    lapic.mmio_write(0x3E0, 4, 0xB)  # TDCR: divide by 1 (1 ns bus cycle)
    lapic.mmio_write(0x320, 4, 1 << 17 | VECTOR)  # LVTT: periodic
    lapic.mmio_write(0x380, 4, PERIOD_NS)  # TMICT: arms the timer

    server = VhostUserServer()
    device = VirtioBlk(str(tmp_path / "disk.img"), size=1 << 20, label="blk0")
    sock = tmp_path / "blk.sock"
    server.add_socket(str(sock), device)
    server.add_reader(mux.fileno(), mux.on_host_timer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        served = 0
        start = time.monotonic()
        with VhostUserDriver(str(sock)) as drv:
            (q,) = drv.start_queues([0], size=16).values()
            while time.monotonic() - start < 0.5:
                q.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [512, 1])
                drv.kick(0)
                assert drv.frontend.wait_call(0, timeout=5)
                (used,) = q.get_used()
                assert used.data[-1] == VIRTIO_BLK_S_OK
                served += 1
        elapsed = time.monotonic() - start
    finally:
        server.stop()
        thread.join(10)
        device.close()
    assert served > 10
    # ~1 kHz on the real clock, one host timer for it all; generous bounds for a loaded machine.
    assert 0.3 * elapsed * 1000 < len(ticks) <= 1.2 * elapsed * 1000 + 5, (len(ticks), elapsed)
    assert set(ticks) == {VECTOR}
    assert mux.host_timers == 1
