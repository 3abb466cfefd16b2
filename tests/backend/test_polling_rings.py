"""A ring started without a kick fd (SET_VRING_KICK with the no-fd bit) is polled.

vhost-user.rst SET_VRING_KICK: "If the bit is set ... the ring must be
polled".  Found by the protocol fuzzer: the ring object could not key the
data plane's pollers, and the request closed the connection with a traceback.
"""

from __future__ import annotations

import os
import struct

from iovirt.vhost_user import bringup
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.driver import DriverQueue

from backend_helpers import wait_until


def test_a_polled_ring_is_served(backend, caplog):
    with VhostUserDriver(backend.blk_path) as drv:
        queue = DriverQueue(drv.memory, drv.alloc, 16, index=0)
        bringup.start_vring(drv.frontend, 0, 16, queue.desc_addr, queue.avail_addr, queue.used_addr, kick=False)
        assert drv.frontend.set_vring_kick(0, poll=True) is None
        data = os.urandom(512)
        queue.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 3), data], [1])
        queue.publish()  # no kick: the back-end polls
        used = []
        # Requests in flight together complete in any order (2.7.8): the read goes once the write is used.
        assert wait_until(lambda: used.extend(queue.get_used()) or len(used) == 1, 5)
        queue.add_data([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 3)], [512, 1])
        queue.publish()
        assert wait_until(lambda: used.extend(queue.get_used()) or len(used) == 2, 5)
        assert used[0].data[-1] == VIRTIO_BLK_S_OK and used[1].data == data + bytes([VIRTIO_BLK_S_OK])
        assert drv.frontend.get_vring_base(0) == 2
    assert "Traceback" not in caplog.text
