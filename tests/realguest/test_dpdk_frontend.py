"""DPDK's virtio-user (a C vhost-user front-end with no VM) against iovirt's back-end.

testpmd transmits (txonly) on iovirt's port 0 towards the MAC of port 1, where
iovirt's own Python driver posts receive buffers: the frames must cross the
switch intact, with a proper virtio_net_hdr.  With split rings and with packed
rings (``packed_vq=1``), for many laps of the transmit ring.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.net.defs import NET_HDR_SIZE, NetHdr
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd (dpdk-dev) is not installed"),
]

RX_MAC = bytes.fromhex("525400aabbcc")


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_virtio_user_through_the_switch(tmp_path, caplog, packed):
    caplog.set_level(logging.INFO, logger="iovirt")
    switch = LearningSwitch()
    server = VhostUserServer()
    ports = [VirtioNet(bytes([0x52, 0x54, 0, 0, 0, i]), switch, label=f"p{i}") for i in range(2)]
    socks = [tmp_path / f"p{i}.sock" for i in range(2)]
    for dev, sock in zip(ports, socks):
        server.add_socket(str(sock), dev)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    testpmd = None
    try:
        with VhostUserDriver(str(socks[1])) as rx_side:
            rx, tx = rx_side.start_queues([0, 1], size=256).values()
            for _ in range(128):
                rx.add_data([], [2048])
            rx_side.kick(0)
            # Let the switch learn our MAC on port 1.
            tx.add_data([bytes(NET_HDR_SIZE) + b"\xff" * 6 + RX_MAC + b"\x08\x06" + bytes(46)])
            rx_side.kick(1)
            testpmd = subprocess.Popen(
                ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge", "-m", "256",
                 f"--file-prefix=ivt-test-{os.getpid()}-{int(packed)}", "--vdev", f"net_virtio_user0,path={socks[0]},queues=1"
                 + (",packed_vq=1" if packed else ""),
                 "--", "--forward-mode=txonly", "--txpkts=128", f"--eth-peer=0,{RX_MAC.hex(':')}",
                 "--auto-start", "--stats-period=1", "--nb-cores=1", "--total-num-mbufs=2048"],
                stdout=open(tmp_path / "testpmd.log", "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 30
            got = []
            while len(got) < 64 and time.monotonic() < deadline:
                got += rx.get_used()
                time.sleep(0.01)
            assert len(got) >= 64, (tmp_path / "testpmd.log").read_text()[-2000:]
            for used in got[:64]:
                hdr = NetHdr.unpack(used.data[:NET_HDR_SIZE])
                frame = used.data[NET_HDR_SIZE:]
                assert hdr.num_buffers == 1 and hdr.gso_type == 0
                assert frame[:6] == RX_MAC and len(frame) == 128
            # Many laps of the 256-slot transmit ring: a wrong wrap counter stalls it after the first.
            laps = 8 * 256
            while ports[0].stats["tx_packets"] < laps and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ports[0].stats["tx_packets"] >= laps and ports[0].stats["tx_errors"] == 0, (
                ports[0].stats, (tmp_path / "testpmd.log").read_text()[-2000:])
            started = [m for m in (r.getMessage() for r in caplog.records) if f"{socks[0]}: vring 1 started" in m]
            assert started and all(("started packed" in m) == packed for m in started), started
    finally:
        if testpmd is not None:
            testpmd.terminate()
            testpmd.wait(15)
        server.stop()
        thread.join(10)
