"""One virtio-blk request through iovirt's vhost-user driver, for the tests of every folder."""

from __future__ import annotations

import struct

from iovirt.vhost_user.driver import VhostUserDriver


def blk_request(drv: VhostUserDriver, rtype: int, sector: int, out: bytes = b"", in_len: int = 0) -> tuple[bytes, int]:
    """One request on queue 0 (virtio 1.2 5.2.6): the bytes the device wrote before the status, and the status."""
    queue = drv.queues[0]
    queue.add_data([struct.pack("<IIQ", rtype, 0, sector)] + ([out] if out else []), ([in_len] if in_len else []) + [1])
    drv.kick(0)
    assert drv.frontend.wait_call(0, timeout=5)
    (used,) = queue.get_used()
    return used.data[:-1], used.data[-1]
