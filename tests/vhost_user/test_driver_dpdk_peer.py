"""iovirt's vhost-user driver against DPDK's vhost PMD, a back-end that offers the packed ring.

DPDK 22.11's vhost library offers VIRTIO_F_RING_PACKED, IN_ORDER and more.
iovirt's driver lays out split rings unless asked for packed ones, so it
must not ack the packed layout then (virtio 1.2 §6.1), nor IN_ORDER: once it did, DPDK looked for packed descriptors
in a split ring and never delivered a frame (the OVS and DPDK receive
benchmarks saw 0 frames/s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from iovirt.vhost_user.driver import UNIMPLEMENTED_RING_FEATURES, VhostUserDriver
from iovirt.virtio.defs import VIRTIO_F_RING_PACKED

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd not installed"),
]


def test_driver_receives_from_dpdk_vhost_pmd_over_split_rings(tmp_path):
    sock = tmp_path / "vhost.sock"
    proc = subprocess.Popen(
        ["dpdk-testpmd", "--no-huge", "-m", "256", "-l", "0-1", "--no-pci", "--file-prefix", f"ivt{os.getpid()}",
         "--vdev", f"net_vhost0,iface={sock},queues=1", "--", "--forward-mode=txonly", "--auto-start",
         "--stats-period=1", "--total-num-mbufs=2048"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, "dpdk-testpmd exited before listening"
            assert time.monotonic() < deadline, "dpdk-testpmd did not listen"
            time.sleep(0.05)
        with VhostUserDriver(str(sock)) as drv:
            split_only = UNIMPLEMENTED_RING_FEATURES | 1 << VIRTIO_F_RING_PACKED
            assert drv.offered & split_only, "DPDK offers the packed ring and IN_ORDER: the test needs them"
            assert not drv.features & split_only
            rx = drv.start_queues([0, 1], size=64)[0]
            for _ in range(32):
                rx.add_data([], [2048])
            drv.kick(0)
            got = []
            deadline = time.monotonic() + 10
            while len(got) < 8 and time.monotonic() < deadline:
                got += rx.get_used()
                time.sleep(0.01)
            assert len(got) >= 8, f"{len(got)} frames from testpmd's txonly in 10 s"
    finally:
        proc.terminate()
        proc.wait(10)
