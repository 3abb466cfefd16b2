"""Helpers shared by the vhost-user benchmarks (``vhost_user.py``, ``devices.py``).

Back-end processes: ``iovirt serve`` pinned to core 0, waiting for a socket
to appear, stopping.  Blk: a raw image in /dev/shm whose every 4 KiB block
starts with its own sector number, and the 4 KiB random-read front-end
process (iovirt's Python driver on core 1, queue depth 32, each request
re-posted as soon as it completes, every block's data checked).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

NO_EVENT_IDX = ~(1 << 29) & ((1 << 64) - 1)
"""Front-end features without VIRTIO_F_EVENT_IDX: the pollers never wait on calls."""


def wait_socket(path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait until ``proc`` created the socket ``path``; RuntimeError if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not create {path}")
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    """Send ``sig`` to ``proc`` and wait for it (killed after 15 s)."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def serve_iovirt(args: list[str], log: Path) -> subprocess.Popen:
    """``iovirt serve ARGS`` on core 0, its output into ``log``."""
    return subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "iovirt", "--log-level", "warning", "serve", *args],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )

@contextlib.contextmanager
def numbered_image(size: int) -> Iterator[Path]:
    """A raw image of ``size`` bytes in /dev/shm whose every 4 KiB block starts with its sector number (u64 LE)."""
    image = Path(tempfile.mkdtemp(dir="/dev/shm")) / "bench.img"
    try:
        with open(image, "wb") as f:
            block = bytearray(4096)
            for sector in range(0, size // 512, 8):
                block[:8] = sector.to_bytes(8, "little")
                f.write(block)
        yield image
    finally:
        image.unlink(missing_ok=True)
        image.parent.rmdir()


# -- blk: 4 KiB random reads, QD32 -------------------------------------------------------------


def _blk_frontend(sock: str, sectors: int, seconds: float, out, log: bool = False) -> None:
    os.sched_setaffinity(0, {1})
    from iovirt.vhost_user.driver import VhostUserDriver
    from iovirt.virtio.blk.defs import VIRTIO_BLK_T_IN

    depth, size = 32, 4096
    with VhostUserDriver(sock, features=NO_EVENT_IDX) as drv:
        (q,) = drv.start_queues([0], size=128).values()  # 32 requests x 3 descriptors
        q.set_interrupts(False)
        dirty_log = drv.start_logging() if log else None
        mem = drv.memory
        rand = random.Random(1)
        head_sector = {}  # head -> index of its header's sector field in a u64 view
        head_status = {}  # head -> address of its status byte
        head_data = {}  # head -> index of its data's first u64
        for _ in range(depth):
            hdr = drv.alloc.alloc(16)
            data = drv.alloc.alloc(size, 4096)
            status = drv.alloc.alloc(1)
            mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, rand.randrange(sectors // 8) * 8))
            head = q.add_chain([(hdr, 16)], [(data, size), (status, 1)])
            head_sector[head], head_status[head], head_data[head] = (hdr + 8) // 8, status, data // 8
        drv.kick(0)
        # Typed views of guest memory: the driver's per-request work is a few stores.
        region = mem.regions[0]
        u64 = region.view.cast("Q")
        used = mem.view(q.used_addr, 4 + 8 * q.size).cast("I")
        avail = mem.view(q.avail_addr, 4 + 2 * q.size).cast("H")
        u8 = region.view
        heads = head_sector
        top = sectors // 8
        done = seen = failed = wrong = 0
        avail_idx = avail[1]
        start = time.monotonic()
        end = start + seconds
        while True:
            used_idx = used[0] >> 16
            n = (used_idx - seen) & 0xFFFF
            if n:
                for k in range(n):
                    head = used[1 + 2 * ((seen + k) % q.size)]
                    failed += u8[head_status[head]] != 0
                    # The image holds each 4 KiB block's sector number in its first 8 bytes.
                    wrong += u64[head_data[head]] != u64[heads[head]]
                    u64[heads[head]] = rand.randrange(top) * 8
                    avail[2 + avail_idx % q.size] = head
                    avail_idx = (avail_idx + 1) & 0xFFFF
                seen = used_idx
                avail[1] = avail_idx
                drv.frontend.kick(0)
                done += n
                if time.monotonic() >= end:
                    break
        elapsed = time.monotonic() - start
        for view in (u64, used, avail):
            view.release()
        q._inflight.clear()
        if dirty_log is not None and not any(dirty_log):
            raise RuntimeError("LOG_ALL on, but nothing was logged")
    out.put((done / elapsed, failed, wrong))


def blk_run(sock: Path, sectors: int, seconds: float, log: bool = False) -> float:
    """IOPS of the front-end process against ``sock``; every request must succeed with the right data."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_blk_frontend, args=(str(sock), sectors, seconds, out, log))
    proc.start()
    try:
        iops, failed, wrong = out.get(timeout=seconds + 60)
    finally:
        proc.join(10)
    if failed or wrong:
        raise RuntimeError(f"{sock.name}: {failed} requests failed, {wrong} returned the wrong block")
    return iops
