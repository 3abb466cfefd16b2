#!/usr/bin/env python3
"""Two port-to-port flows on one data-plane worker and on two: what a second worker adds.

``iovirt serve --workers N`` gives each device socket one worker, round
robin.  Here one back-end process serves four virtio-net ports on one
switch: ports 0 and 2 on worker 0, ports 1 and 3 on worker 1 (with two
workers), and two flows of 64-byte frames run at once, 0 -> 2 and 1 -> 3,
each staying on its worker.  The guests of each flow are one C loop
(``net_drive.c``, through ctypes: no interpreter lock) on rings set up by
iovirt's Python driver over real vhost-user connections; it re-posts what
the device used and sleeps on the call eventfds when nothing moved.

Each configuration runs with the workers' kick loop (kicks served by net's
forward in C, without the interpreter: ``iovirt/vhost_user/kickloop.py``)
and without it (the workers' Python loop, as with ``IOVIRT_NO_EXTENSIONS``
for that part).  Figures: the frames per second both receivers got
together, best of ``ROUNDS`` alternating runs, and the ratios
``ratio_2_workers_vs_1`` (with the kick loop) and
``ratio_2_workers_vs_1_python_loop``.  Then the same two flows with
each crossing from one worker to the other (0 -> 1 and 2 -> 3: each
through its crossing, ``iovirt/virtio/net/crossing.py``, served in C on
both workers), with the kick loop: ``ratio_crossing_vs_1_worker``.

The back-end and the two guest loops share the machine's cores (not
pinned): on a 2-core machine two workers and two guest loops compete for
two cores.

    python benchmarks/workers.py [--seconds S]

The last line is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from vhost_common import NO_EVENT_IDX, stop_process, wait_socket

from iovirt.vhost_user.driver import VhostUserDriver

ROUNDS = 2
NAP_NS = 50_000
RING = 1024
FEATURES = NO_EVENT_IDX & ~(1 << 35)
"""Every feature but VIRTIO_F_EVENT_IDX (the guest loop sleeps on calls) and VIRTIO_F_IN_ORDER (35), which QEMU
7.2's virtio-net does not offer its guests: what they negotiate."""
HDR = bytes(12)  # virtio_net_hdr with num_buffers (VERSION_1): no offloads

BACKEND = """
import sys
from iovirt.vhost_user import kickloop
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
socks, workers, jobs = sys.argv[1:5], int(sys.argv[5]), sys.argv[6] == "1"
if not jobs:
    kickloop.accel = None  # every kick through the workers' Python loop
switch, server = LearningSwitch(), VhostUserServer(workers=workers)
for i, sock in enumerate(socks):
    port = VirtioNet(bytes([0x52, 0x54, 0, 0, 1, i]), switch, label=f"p{i}")
    endpoint = server.add_socket(sock, port)
    if workers > 1:  # as iovirt serve --workers does
        switch.set_owner(port, endpoint.worker, server.dataplane.home)
try:
    server.serve_forever()
except KeyboardInterrupt:
    server.stop()
"""


def mac(i: int) -> bytes:
    """The MAC the guest of port ``i`` sends from."""
    return bytes([0x02, 0, 0, 0, 2, i])


class Pair:
    """The guests of one flow: port ``src``'s transmit ring full of frames to port ``dst``, ``dst``'s receive ring."""

    def __init__(self, socks: list[Path], src: int, dst: int) -> None:
        self.sender = VhostUserDriver(str(socks[src]), features=FEATURES)
        self.receiver = VhostUserDriver(str(socks[dst]), features=FEATURES)
        srx, self.tx = self.sender.start_queues([0, 1], size=RING).values()
        self.rx, rtx = self.receiver.start_queues([0, 1], size=RING).values()
        for _ in range(16):  # the sender takes the other flow's hellos
            srx.add_data([], [2048])
        self.sender.kick(0)
        for _ in range(RING):
            self.rx.add_data([], [2048])
        self.receiver.kick(0)
        # The receiver's hello: the switch learns its MAC on its port.
        rtx.add_data([HDR + b"\xff" * 6 + mac(dst) + b"\x08\x06" + bytes(46)])
        self.receiver.kick(1)
        frame = HDR + mac(dst) + mac(src) + b"\x08\x00" + bytes(50)
        for _ in range(RING):
            self.tx.add_data([frame])
        self.tx.publish()
        if NAP_NS:
            self.tx.set_interrupts(False)
            self.rx.set_interrupts(False)
        self.result: tuple[int, int] = (0, 0)

    def drive(self, lib: Any, seconds: float) -> None:
        """Run the C loop for ``seconds`` (on the calling thread, without the GIL)."""
        anchors = []
        words = []
        for drv, q, index in ((self.sender, self.tx, 1), (self.receiver, self.rx, 0)):
            region = drv.memory.regions[0]
            anchor = ctypes.c_char.from_buffer(region.view)
            anchors.append(anchor)
            base = ctypes.addressof(anchor) - region.gpa
            words += [base + q.avail_addr + 2, base + q.used_addr + 2, drv.frontend.kick_fds[index],
                      drv.frontend.call_fds[index]]
        out = (ctypes.c_uint64 * 2)()
        rc = lib.drive(*words, seconds, NAP_NS, out)
        del anchors
        if rc != 0:
            raise RuntimeError("the back-end stopped moving frames" if rc == -2 else "a kick failed")
        self.result = (out[0], out[1])

    def close(self) -> None:
        """Disconnect both guests."""
        for drv in (self.sender, self.receiver):
            drv.close()


def run(tmp: Path, lib: Any, workers: int, jobs: bool, seconds: float, crossing: bool = False) -> float:
    """Frames/s both receivers got, with ``workers`` workers, with the kick loop or without.

    ``crossing``: the flows are 0 -> 1 and 2 -> 3, each from one worker to the other (through its crossing).
    """
    name = f"w{workers}-{int(jobs)}{'-x' if crossing else ''}"
    socks = [tmp / f"{name}-p{i}.sock" for i in range(4)]
    log = tmp / f"backend-{name}.log"
    backend = subprocess.Popen(
        [sys.executable, "-c", BACKEND, *map(str, socks), str(workers), "1" if jobs else "0"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    pairs: list[Pair] = []
    try:
        for sock in socks:
            wait_socket(sock, backend)
        pairs = [Pair(socks, 0, 1), Pair(socks, 2, 3)] if crossing else [Pair(socks, 0, 2), Pair(socks, 1, 3)]
        threads = [threading.Thread(target=p.drive, args=(lib, seconds)) for p in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 30)
        return sum(received / (ns / 1e9) for received, ns in (p.result for p in pairs) if ns)
    finally:
        for p in pairs:
            p.close()
        stop_process(backend)
        for sock in socks:
            sock.unlink(missing_ok=True)


def compile_driver(tmp: Path) -> Any:
    """``net_drive.c`` compiled into a shared library, loaded."""
    lib_path = tmp / "net_drive.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib_path), str(Path(__file__).with_name("net_drive.c"))],
                   check=True)
    lib = ctypes.CDLL(str(lib_path))
    ptr, fd = ctypes.c_void_p, ctypes.c_int
    lib.drive.argtypes = [ptr, ptr, fd, fd, ptr, ptr, fd, fd, ctypes.c_double, ctypes.c_long, ptr]
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each run (default 3)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="iovirt-workers-"))
    atexit.register(shutil.rmtree, tmp, True)
    lib = compile_driver(tmp)
    best: dict[tuple[int, bool], float] = {}
    runs: dict[tuple[int, bool], list[float]] = {}
    crossing: list[float] = []
    for _ in range(ROUNDS):
        for jobs in (True, False):
            for workers in (1, 2):
                rate = run(tmp, lib, workers, jobs, args.seconds)
                runs.setdefault((workers, jobs), []).append(rate)
                best[(workers, jobs)] = max(best.get((workers, jobs), 0.0), rate)
        crossing.append(run(tmp, lib, 2, True, args.seconds, crossing=True))
    for jobs, name in ((True, "kick loop (C)"), (False, "Python loop")):
        one, two = best[(1, jobs)], best[(2, jobs)]
        listed = " / ".join(f"{r:,.0f}" for r in runs[(1, jobs)]), " / ".join(f"{r:,.0f}" for r in runs[(2, jobs)])
        print(f"two 64 B flows, {name}: one worker {one:,.0f} frames/s (runs {listed[0]}), "
              f"two workers {two:,.0f} (runs {listed[1]})   ratio {two / one if one else float('nan'):.2f}")
    print(f"kick loop / Python loop: one worker {best[(1, True)] / best[(1, False)]:.2f}, "
          f"two workers {best[(2, True)] / best[(2, False)]:.2f}")
    print(f"two 64 B flows each from one worker to the other (crossing), kick loop: {max(crossing):,.0f} "
          f"frames/s (runs {' / '.join(f'{r:,.0f}' for r in crossing)})   against one worker "
          f"{max(crossing) / best[(1, True)]:.2f}")
    figures = {
        "p2p_2_flows_1_worker": round(best[(1, True)]),
        "p2p_2_flows_2_workers": round(best[(2, True)]),
        "ratio_2_workers_vs_1": round(best[(2, True)] / best[(1, True)], 3),
        "p2p_2_flows_1_worker_python_loop": round(best[(1, False)]),
        "p2p_2_flows_2_workers_python_loop": round(best[(2, False)]),
        "ratio_2_workers_vs_1_python_loop": round(best[(2, False)] / best[(1, False)], 3),
        "p2p_2_flows_2_workers_crossing": round(max(crossing)),
        "ratio_crossing_vs_1_worker": round(max(crossing) / best[(1, True)], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
