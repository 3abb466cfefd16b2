"""iovirt's vhost-user driver against DPDK's vhost PMD, a back-end that offers the packed ring.

DPDK 22.11's vhost library offers VIRTIO_F_RING_PACKED, IN_ORDER and more.
iovirt's driver lays out split rings unless asked for packed ones, so it
must not ack the packed layout then (virtio 1.2 §6.1): once it acked an
unimplemented ring feature, DPDK looked for packed descriptors in a split
ring and never delivered a frame (the OVS and DPDK receive benchmarks saw 0
frames/s).  IN_ORDER it implements and acks (§2.7.9, §2.8.8): DPDK's vhost
library returns a transmitted batch of a packed in-order ring through one
used descriptor, which the driver must take as the whole batch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from iovirt.vhost_user.driver import UNIMPLEMENTED_RING_FEATURES, VhostUserDriver
from iovirt.virtio.defs import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED
from iovirt.virtio.net.defs import NET_HDR_SIZE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd not installed"),
]


def _vhost_pmd(sock, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["dpdk-testpmd", "--no-huge", "-m", "256", "-l", "0-1", "--no-pci", "--file-prefix", f"ivt{os.getpid()}",
         "--vdev", f"net_vhost0,iface={sock},queues=1", "--", f"--forward-mode={mode}", "--auto-start",
         "--stats-period=1", "--total-num-mbufs=2048"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, "dpdk-testpmd exited before listening"
        assert time.monotonic() < deadline, "dpdk-testpmd did not listen"
        time.sleep(0.05)
    return proc


def test_driver_receives_from_dpdk_vhost_pmd_over_split_rings(tmp_path):
    sock = tmp_path / "vhost.sock"
    proc = _vhost_pmd(sock, "txonly")
    try:
        with VhostUserDriver(str(sock)) as drv:
            split_only = UNIMPLEMENTED_RING_FEATURES | 1 << VIRTIO_F_RING_PACKED
            assert drv.offered & split_only, "DPDK offers the packed ring: the test needs it"
            assert not drv.features & split_only
            assert drv.features >> VIRTIO_F_IN_ORDER & 1
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


def test_driver_transmits_to_dpdk_vhost_pmd_over_packed_in_order_rings(tmp_path):
    """DPDK's vhost library uses a packed in-order transmit batch at once, through one used descriptor."""
    sock = tmp_path / "vhost.sock"
    proc = _vhost_pmd(sock, "rxonly")
    try:
        with VhostUserDriver(str(sock), packed=True) as drv:
            assert drv.features >> VIRTIO_F_IN_ORDER & 1 and drv.features >> VIRTIO_F_RING_PACKED & 1
            tx = drv.start_queues([0, 1], size=64)[1]
            done, sent = 0, 0
            deadline = time.monotonic() + 20
            while done < 2000 and time.monotonic() < deadline:
                while sent < 2000 and tx.num_free:
                    tx.add_data([bytes(NET_HDR_SIZE) + b"\xff" * 12 + b"\x88\xb5" + bytes(46)])
                    sent += 1
                drv.kick(1)
                time.sleep(0.002)
                done += len(tx.get_used())
            assert done == sent == 2000
            assert tx.num_free == 64
    finally:
        proc.terminate()
        proc.wait(10)
