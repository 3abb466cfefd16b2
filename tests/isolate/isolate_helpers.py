"""Helpers of the isolation tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.net.defs import NetHdr
from blk_client import blk_request

HDR = 12  # virtio_net_hdr with num_buffers (VERSION_1, virtio 1.2 5.1.6)
BROADCAST = b"\xff" * 6


def wait_until(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return the last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def alive(pid: int) -> bool:
    """True while ``pid`` runs (the supervisor reaps its workers, so a dead one leaves no zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def net_port(path: str) -> VhostUserDriver:
    """A front-end on a net socket with its first queue pair started and receive buffers posted."""
    drv = VhostUserDriver(path, memory_size=8 << 20)
    drv.start_queues([0, 1], size=64)
    for _ in range(16):
        drv.queues[0].add_data([], [2048])
    drv.kick(0)
    return drv


def eth(dst: bytes, src: bytes, payload: bytes = bytes(range(50))) -> bytes:
    return dst + src + b"\x88\xb5" + payload


def send(drv: VhostUserDriver, frame: bytes) -> None:
    """Transmit one frame on queue 1 and wait until the device returned its buffer."""
    drv.queues[1].add_data([NetHdr().pack() + frame])
    drv.kick(1)
    assert drv.frontend.wait_call(1, timeout=5)
    assert len(drv.queues[1].get_used()) == 1


def receive(drv: VhostUserDriver, timeout: float = 5.0) -> bytes:
    """The next frame on receive queue 0 (one buffer each: 2048 bytes hold any test frame)."""
    deadline = time.monotonic() + timeout
    while True:
        used = drv.queues[0].get_used()
        if used:
            (chain,) = used
            drv.queues[0].add_data([], [2048])
            drv.kick(0)
            return chain.data[HDR:]
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no frame arrived"
        select.select([drv.frontend.call_fds[0]], [], [], min(remaining, 0.1))
        drv.frontend.wait_call(0, timeout=0)


def blk_roundtrip(drv: VhostUserDriver, sector: int, data: bytes) -> None:
    """Write ``data`` at ``sector``, read it back."""
    assert blk_request(drv, VIRTIO_BLK_T_OUT, sector, out=data) == (b"", VIRTIO_BLK_S_OK)
    assert blk_request(drv, VIRTIO_BLK_T_IN, sector, in_len=len(data)) == (data, VIRTIO_BLK_S_OK)


def blk_port(path: str) -> VhostUserDriver:
    drv = VhostUserDriver(path)
    drv.start_queues([0], size=16)
    return drv


SERVING = re.compile(r"(\w+) \(.*?\): worker pid (\d+) serving")


class Supervised:
    """``iovirt serve --isolate`` with its log in a file; worker pids read from the supervisor's status lines."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(2)]
        self.blk_path = str(tmp / "blk.sock")
        self.image = tmp / "disk.img"
        self.log_path = tmp / "serve.log"
        argv = [sys.executable, "-m", "iovirt", "--log-level", "info", "serve", "--isolate", *extra]
        for path in self.net_paths:
            argv += ["--net", path]
        argv += ["--blk", f"{self.blk_path},{self.image},size=1M"]
        self.proc = subprocess.Popen(argv, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        assert wait_until(lambda: set(self.pids()) == {"net0", "net1", "blk0"}, 30), self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """The serving worker of each device (the latest status line wins)."""
        return {name: int(pid) for name, pid in SERVING.findall(self.log())}

    def wait_new_worker(self, name: str, old: int, timeout: float = 15.0) -> int:
        assert wait_until(lambda: self.pids()[name] != old, timeout), self.log()
        return self.pids()[name]

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds it took)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        return code, time.monotonic() - start
