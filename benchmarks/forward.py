#!/usr/bin/env python3
"""Port to port in one process: the C batch loop (``datapath.forward``) against the Python loop it shortcuts.

Two virtio-net ports on one switch, each with its guest memory and split
rings driven in this process (no front-end process, no vhost-user: only the
back-end's own work).  The sender's 256 transmit chains of 64-byte frames
and the receiver's 256 receive buffers are posted once and made available
again by moving the avail index, as a polling driver re-posts them; each
round kicks the transmit queue.  The same traffic runs with
``datapath.forward`` and with it answering None (the Python loop:
``VirtioNet._switch``, the switch, ``deliver_batch``), alternately
(``ROUNDS``, best of each): ``ratio_forward_vs_python_loop``.

Then the GIL: two such pairs of ports, each pair kicked from its own
thread (what two data-plane workers are), against one pair on one thread,
with forward: ``ratio_two_threads_vs_one`` is the two threads' frames/s
over one thread's.  The C loop releases the GIL for the whole batch loop,
so two threads on two cores may run it at once; with the Python loop they
take turns (also printed, ``ratio_two_threads_vs_one_python_loop``).

    python benchmarks/forward.py [--seconds S]

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.net import datapath
from iovirt.virtio.net.defs import NET_HDR_SIZE
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch

RING = 256
MEM = 4 << 20
ROUNDS = 3


class Pair:
    """A sender and a receiver port on their own switch, their rings posted once."""

    def __init__(self, k: int) -> None:
        self.switch = LearningSwitch()
        macs = [bytes([0x52, 0x54, 0, 0, k, i]) for i in range(2)]
        self.ports, self.rings = [], []
        for mac in macs:
            memory = GuestMemory.from_ranges([(0, MEM)])
            alloc = BumpAllocator(0x1000, MEM - 0x1000)
            rx, tx = DriverQueue(memory, alloc, RING, index=0), DriverQueue(memory, alloc, RING, index=1)
            dev = VirtioNet(mac, self.switch)
            dev.set_features(1 << VIRTIO_F_VERSION_1)
            for index, drv in ((0, rx), (1, tx)):
                drv.publish()
                dev.start_queue(index, memory, drv.state(), notify=lambda: None)
                dev.set_queue_enabled(index, True)
            self.ports.append(dev)
            self.rings.append((memory, rx, tx))
        sender_memory, sender_rx, sender_tx = self.rings[0]
        receiver_memory, receiver_rx, receiver_tx = self.rings[1]
        for _ in range(RING):
            receiver_rx.add_chain(writable=[(receiver_rx.alloc.alloc(2048), 2048)])
        receiver_rx.publish()
        # The receiver announces itself (learned), then the sender's frames go to it.
        self._send_one(receiver_tx, macs[1], 1)
        frame = macs[1] + macs[0] + b"\x08\x00" + bytes(50)
        for _ in range(RING):
            buf = sender_tx.alloc.alloc(NET_HDR_SIZE + len(frame))
            sender_memory.write(buf, bytes(NET_HDR_SIZE) + frame)
            sender_tx.add_chain(readable=[(buf, NET_HDR_SIZE + len(frame))])
        self.tx_avail = sender_tx.avail_addr + 2
        self.rx_avail = receiver_rx.avail_addr + 2
        self.rx_used = receiver_rx.used_addr + 2
        self.tx_memory, self.rx_memory = sender_memory, receiver_memory
        self.tx_idx = 0
        self.rx_idx = RING

    def _send_one(self, tx: DriverQueue, mac: bytes, port: int) -> None:
        tx.add_data([bytes(NET_HDR_SIZE) + b"\xff" * 6 + mac + b"\x08\x06" + bytes(46)])
        tx.publish()
        self.ports[port].kick(1)

    def round(self) -> None:
        """Make the 256 transmit chains available again and kick; re-post the receive buffers used."""
        self.tx_idx = (self.tx_idx + RING) & 0xFFFF
        self.tx_memory.write_u16(self.tx_avail, self.tx_idx)
        self.ports[0].kick(1)
        used = self.rx_memory.read_u16(self.rx_used)
        self.rx_idx = (used + RING) & 0xFFFF
        self.rx_memory.write_u16(self.rx_avail, self.rx_idx)

    def received(self) -> int:
        return self.ports[1].stats["rx_packets"]


def run(pairs: int, seconds: float, fast: bool) -> float:
    """Frames/s received over ``pairs`` pairs, each on its own thread; the Python loop unless ``fast``."""
    real = datapath.forward
    if not fast:
        datapath.forward = lambda *args: None  # type: ignore[assignment]
    try:
        made = [Pair(k) for k in range(pairs)]
        for pair in made:
            pair.round()  # the first batch goes through the switch, which learns the flow
        start = [pair.received() for pair in made]
        stop = threading.Event()

        def loop(pair: Pair) -> None:
            while not stop.is_set():
                pair.round()

        threads = [threading.Thread(target=loop, args=(pair,)) for pair in made]
        t0 = time.perf_counter()
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - t0
        return sum(pair.received() - s for pair, s in zip(made, start)) / elapsed
    finally:
        datapath.forward = real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each run (default 2)")
    args = parser.parse_args()
    if datapath.accel is None:
        sys.exit("the C data path is not built: python3 setup.py build_ext --inplace")
    best: dict[tuple[int, bool], float] = {}
    runs: dict[tuple[int, bool], list[float]] = {}
    for _ in range(ROUNDS):
        for key in ((1, True), (1, False), (2, True), (2, False)):
            rate = run(key[0], args.seconds, key[1])
            runs.setdefault(key, []).append(rate)
            best[key] = max(best.get(key, 0.0), rate)
    for (pairs, fast), rates in runs.items():
        loop = "C loop (forward)" if fast else "Python loop"
        print(f"{pairs} pair(s) on {pairs} thread(s), {loop}: best {best[pairs, fast]:,.0f} frames/s "
              f"(runs {', '.join(f'{r:,.0f}' for r in rates)})")
    figures: dict[str, Any] = {
        "p2p_in_process_64B_forward_frames_per_s": round(best[1, True]),
        "p2p_in_process_64B_python_loop_frames_per_s": round(best[1, False]),
        "ratio_forward_vs_python_loop": round(best[1, True] / best[1, False], 3),
        "ratio_two_threads_vs_one": round(best[2, True] / best[1, True], 3),
        "ratio_two_threads_vs_one_python_loop": round(best[2, False] / best[1, False], 3),
    }
    print(f"forward / Python loop: {figures['ratio_forward_vs_python_loop']:.2f}; two threads / one: "
          f"{figures['ratio_two_threads_vs_one']:.2f} (Python loop {figures['ratio_two_threads_vs_one_python_loop']:.2f})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
