"""Helpers shared by the vhost-user benchmarks (``vhost_user.py``, ``devices.py``).

Back-end processes: ``iovirt serve`` pinned to core 0, waiting for a socket
to appear, stopping.  Blk: a raw image in /dev/shm whose every 4 KiB block
starts with its own sector number, and the 4 KiB random-read front-end
process (iovirt's Python driver on core 1, queue depth 32, each request
re-posted as soon as it completes, every block's data checked).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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


def serve_iovirt(args: list[str], log: Path, log_level: str = "warning") -> subprocess.Popen:
    """``iovirt serve --workers 1 ARGS`` on core 0, its output (from ``log_level`` up) into ``log``.

    One worker for the one core it has (the peer or the front-end runs on
    the other): the figures the issue asks "with one worker".
    """
    return subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "iovirt", "--log-level", log_level, "serve", "--workers", "1",
         *args],
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


# -- 4 KiB random reads, QD32, for blk and SCSI ----------------------------------------------

READ_SIZE = 4096


@dataclass(frozen=True)
class ReadFormat:
    """How a device type's 4 KiB read request is laid out around the data buffer.

    The chain is ``[header]`` device-readable, then ``[status, data]`` or
    ``[data, status]`` device-writable.  The request's block address is
    ``field`` at ``field_offset`` in the header, in 512-byte sectors; the
    bytes at ``status_offsets`` in the status buffer are all 0 on success.
    """

    queue: int
    header: bytes
    status_size: int
    status_first: bool
    field_offset: int
    field: struct.Struct
    status_offsets: tuple[int, ...]


def read_format(kind: str) -> ReadFormat:
    """The request layout of ``blk`` (5.2.6: VIRTIO_BLK_T_IN) or ``scsi`` (5.6.6.1: READ(10) to LUN 0)."""
    if kind == "blk":
        from iovirt.virtio.blk.defs import VIRTIO_BLK_T_IN

        return ReadFormat(0, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0), 1, False, 8, struct.Struct("<Q"), (0,))
    from iovirt.virtio.scsi.defs import (
        LUN_FIRST_BYTE,
        LUN_FLAT_ADDRESSING,
        READ_10,
        REQ_CMD_HDR,
        REQUESTQ_BASE,
        RESP_CMD_HDR,
        VIRTIO_SCSI_CDB_DEFAULT_SIZE,
        VIRTIO_SCSI_S_SIMPLE,
        VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
    )

    lun0 = bytes([LUN_FIRST_BYTE, 0, LUN_FLAT_ADDRESSING, 0, 0, 0, 0, 0])  # target 0, LUN 0 (5.6.6.1)
    # READ(10) (SBC-3 5.15): opcode, flags, LBA (be32), group, transfer length in blocks (be16), control.
    cdb = struct.pack(">BBIBHB", READ_10, 0, 0, 0, READ_SIZE // 512, 0).ljust(VIRTIO_SCSI_CDB_DEFAULT_SIZE, b"\0")
    # The response's status and response bytes are its last two before the sense buffer.
    return ReadFormat(REQUESTQ_BASE, REQ_CMD_HDR.pack(lun0, 0, VIRTIO_SCSI_S_SIMPLE, 0, 0) + cdb,
                      RESP_CMD_HDR.size + VIRTIO_SCSI_SENSE_DEFAULT_SIZE, True, REQ_CMD_HDR.size + 2,
                      struct.Struct(">I"), (RESP_CMD_HDR.size - 2, RESP_CMD_HDR.size - 1))


def _read_frontend(kind: str, sock: str, sectors: int, seconds: float, out, log: bool, poll_lib: str) -> None:
    os.sched_setaffinity(0, {1})
    from iovirt.vhost_user.driver import VhostUserDriver

    fmt = read_format(kind)
    depth = 32
    with VhostUserDriver(sock, features=NO_EVENT_IDX) as drv:
        q = drv.start_queues(range(fmt.queue + 1), size=128)[fmt.queue]  # 32 requests x 3 descriptors
        q.set_interrupts(False)
        dirty_log = drv.start_logging() if log else None
        mem = drv.memory
        rand = random.Random(1)
        top = sectors // 8
        field_at = {}  # head -> address of its header's block address field
        status_at = {}  # head -> addresses of its status bytes
        data_at = {}  # head -> index of its data's first u64
        expected = {}  # head -> the sector it asked for
        for _ in range(depth):
            hdr = drv.alloc.alloc(len(fmt.header))
            data = drv.alloc.alloc(READ_SIZE, 4096)
            status = drv.alloc.alloc(fmt.status_size)
            mem.write(hdr, fmt.header)
            sector = rand.randrange(top) * 8
            mem.write(hdr + fmt.field_offset, fmt.field.pack(sector))
            writable = [(status, fmt.status_size), (data, READ_SIZE)]
            head = q.add_chain([(hdr, len(fmt.header))], writable if fmt.status_first else writable[::-1])
            field_at[head], data_at[head], expected[head] = hdr + fmt.field_offset, data // 8, sector
            status_at[head] = tuple(status + k for k in fmt.status_offsets)
        drv.kick(fmt.queue)
        # The polling loop runs in C (read_poll.c): a Python loop capped the rate at its own ~6.5 us a request.
        lib = ctypes.CDLL(poll_lib)
        u64 = ctypes.c_uint64
        lib.read_poll.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_int, u64, u64, ctypes.c_double, ctypes.c_void_p]
        region = mem.regions[0]
        anchor = ctypes.c_char.from_buffer(region.view)  # released below: the driver unmaps the memory on close
        base = ctypes.addressof(anchor) - region.gpa
        per_head = u64 * q.size  # indexed by head; zero where no request
        nstatus = len(fmt.status_offsets)
        status = (u64 * (q.size * nstatus))()
        for head, addrs in status_at.items():
            status[head * nstatus : (head + 1) * nstatus] = addrs
        fields, datas, expect = per_head(), per_head(), per_head()
        for head in field_at:
            fields[head], datas[head], expect[head] = field_at[head], 8 * data_at[head], expected[head]
        out_values = (u64 * 4)()
        rc = lib.read_poll(base, base + q.avail_addr, base + q.used_addr, q.size, drv.frontend.kick_fds[fmt.queue],
                           fields, datas, status, nstatus, expect, int(fmt.field.format == ">I"), top, 1, seconds,
                           out_values)
        del anchor
        if rc != 0:
            raise RuntimeError("the back-end stopped completing requests" if rc == -2 else "a kick failed")
        done, failed, wrong, elapsed_ns = out_values
        elapsed = elapsed_ns / 1e9
        q._inflight.clear()
        if dirty_log is not None and not any(dirty_log):
            raise RuntimeError("LOG_ALL on, but nothing was logged")
    out.put((done / elapsed, failed, wrong))


_POLL_DIR = tempfile.mkdtemp(prefix="iovirt-read-poll-")
atexit.register(shutil.rmtree, _POLL_DIR, True)


def _poll_lib() -> str:
    """``read_poll.c`` compiled (once per run) into a shared library; its path."""
    lib = Path(_POLL_DIR) / "read_poll.so"
    if not lib.exists():
        source = Path(__file__).with_name("read_poll.c")
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    return str(lib)


def read_run(kind: str, sock: Path, sectors: int, seconds: float, log: bool = False) -> float:
    """IOPS of a ``kind`` (blk, scsi) read front-end process against ``sock``; every read must return its block."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_read_frontend, args=(kind, str(sock), sectors, seconds, out, log, _poll_lib()))
    proc.start()
    try:
        iops, failed, wrong = out.get(timeout=seconds + 60)
    finally:
        proc.join(10)
    if failed or wrong:
        raise RuntimeError(f"{sock.name}: {failed} requests failed, {wrong} returned the wrong block")
    return iops


def blk_run(sock: Path, sectors: int, seconds: float, log: bool = False) -> float:
    """IOPS of the blk read front-end process against ``sock`` (:func:`read_run`)."""
    return read_run("blk", sock, sectors, seconds, log)
