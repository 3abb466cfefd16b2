"""DPDK's virtio-user with ``in_order=1`` (split and ``packed_vq=1``) against iovirt's back-end.

DPDK's in-order data paths rely on VIRTIO_F_IN_ORDER (virtio 1.2 2.7.9,
2.8.8): its transmit clean-up frees every descriptor up to the used idx
(split) or up to the Buffer ID of a used descriptor (packed) without
reading the others, and its in-order receive path reads the used entry of
every buffer.  iovirt's net device returns each transmit batch through one
used entry and writes one entry per receive buffer.  Checked with frames
moving both ways: testpmd's ``txonly`` sends more frames than its ring
holds (it stalls unless batched used entries free its descriptors), and
``macswap`` sends back what iovirt's own driver (in order too) sends it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.defs import VIRTIO_F_IN_ORDER, VIRTIO_F_RING_PACKED
from iovirt.virtio.net.defs import NET_HDR_SIZE
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.queue import ring_of

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("dpdk-testpmd") is None, reason="dpdk-testpmd (dpdk-dev) is not installed"),
]

RX_MAC = bytes.fromhex("525400aabbcc")
DPDK_MAC = bytes.fromhex("525400dddd01")
RING = 256  # virtio-user's queue_size: txonly must send many times this many frames


class Setup:
    """Two iovirt ports on one switch; DPDK's virtio-user on port 0, iovirt's driver on port 1."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.switch = LearningSwitch()
        self.server = VhostUserServer()
        self.ports = [VirtioNet(bytes([0x52, 0x54, 0, 0, 0, i]), self.switch, label=f"p{i}") for i in range(2)]
        self.socks = [tmp_path / f"p{i}.sock" for i in range(2)]
        for dev, sock in zip(self.ports, self.socks):
            self.server.add_socket(str(sock), dev)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.testpmd: subprocess.Popen[bytes] | None = None
        self.log = tmp_path / "testpmd.log"

    def start_testpmd(self, packed: bool, *args: str) -> None:
        vdev = f"net_virtio_user0,path={self.socks[0]},queues=1,queue_size={RING},in_order=1,mac={DPDK_MAC.hex(':')}"
        if packed:
            vdev += ",packed_vq=1"
        self.testpmd = subprocess.Popen(
            ["dpdk-testpmd", "-l", "0,1", "--main-lcore", "0", "--no-pci", "--no-huge", "-m", "256",
             f"--file-prefix=ivt-inorder-{id(self)}", "--vdev", vdev,
             "--", *args, "--auto-start", "--stats-period=1", "--nb-cores=1", "--total-num-mbufs=4096"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def dpdk_ring(self, index: int):
        """Port 0's ring ``index`` as iovirt serves it, once DPDK started it."""
        deadline = time.monotonic() + 30
        while self.ports[0].queues[index] is None:
            assert self.testpmd is not None and self.testpmd.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, "testpmd did not start its rings"
            time.sleep(0.05)
        return ring_of(self.ports[0].queues[index])

    def close(self) -> None:
        if self.testpmd is not None:
            self.testpmd.terminate()
            self.testpmd.wait(15)
        self.server.stop()
        self.thread.join(10)


@pytest.fixture
def setup(tmp_path):
    s = Setup(tmp_path)
    yield s
    s.close()


def _frame(dst: bytes, src: bytes, seq: int) -> bytes:
    return dst + src + b"\x88\xb5" + seq.to_bytes(4, "big") + bytes(56)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_in_order_txonly_crosses_the_switch(setup, packed):
    with VhostUserDriver(str(setup.socks[1])) as rx_side:
        assert rx_side.features >> VIRTIO_F_IN_ORDER & 1  # iovirt's driver takes batched entries too
        rx, tx = rx_side.start_queues([0, 1], size=256).values()
        for _ in range(200):
            rx.add_data([], [2048])
        rx_side.kick(0)
        tx.add_data([bytes(NET_HDR_SIZE) + _frame(b"\xff" * 6, RX_MAC, 0)])  # the switch learns RX_MAC
        rx_side.kick(1)
        setup.start_testpmd(packed, "--forward-mode=txonly", "--txpkts=128", f"--eth-peer=0,{RX_MAC.hex(':')}")
        ring = setup.dpdk_ring(1)
        assert ring.in_order and (type(ring).__name__ == "PackedQueue") == packed
        got = 0
        deadline = time.monotonic() + 60
        while (got < 1000 or setup.ports[0].stats["tx_packets"] < 20 * RING) and time.monotonic() < deadline:
            for used in rx.get_used():
                frame = used.data[NET_HDR_SIZE:]
                assert frame[:6] == RX_MAC and len(frame) == 128
                rx.add_data([], [2048])
                got += 1
            rx_side.kick(0)
            time.sleep(0.005)
        sent = setup.ports[0].stats["tx_packets"]
        assert sent >= 20 * RING, f"testpmd sent {sent} frames: {setup.log.read_text()[-3000:]}"
        assert got >= 1000 and setup.ports[0].stats["tx_errors"] == 0
        assert not setup.ports[0].needs_reset and not setup.ports[1].needs_reset


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_in_order_macswap_returns_every_frame(setup, packed):
    """iovirt's in-order driver sends to DPDK, whose in-order receive and transmit paths send them back."""
    with VhostUserDriver(str(setup.socks[1]), packed=packed) as drv:
        assert drv.features >> VIRTIO_F_IN_ORDER & 1 and bool(drv.features >> VIRTIO_F_RING_PACKED & 1) == packed
        rx, tx = drv.start_queues([0, 1], size=256).values()
        for _ in range(200):
            rx.add_data([], [2048])
        drv.kick(0)
        setup.start_testpmd(packed, "--forward-mode=macswap")
        assert setup.dpdk_ring(0).in_order and setup.dpdk_ring(1).in_order
        time.sleep(1)  # testpmd's forwarding started
        sent, seen = 0, set()
        deadline = time.monotonic() + 60
        while len(seen) < 2000 and time.monotonic() < deadline:
            while sent < 2000 and sent - len(seen) < 64 and tx.num_free:
                tx.add_data([bytes(NET_HDR_SIZE) + _frame(DPDK_MAC, RX_MAC, sent)])
                sent += 1
            drv.kick(1)
            tx.get_used()
            for used in rx.get_used():
                frame = used.data[NET_HDR_SIZE:]
                assert frame[:12] == RX_MAC + DPDK_MAC  # swapped back
                seen.add(int.from_bytes(frame[14:18], "big"))
                rx.add_data([], [2048])
            drv.kick(0)
            time.sleep(0.002)
        assert len(seen) >= 1900, f"{len(seen)} of {sent} frames came back: {setup.log.read_text()[-3000:]}"
        assert not setup.ports[0].needs_reset and not setup.ports[1].needs_reset
