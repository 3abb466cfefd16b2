#!/usr/bin/env python3
"""vsock and SCSI devices: iovirt against a plain UNIX socket pair and against its own blk device.

Vsock: a stream from iovirt's front-end (the driver side of
``iovirt.virtio.vsock.driver.VsockDriver`` over
``iovirt.vhost_user.driver.VhostUserDriver``) through ``iovirt serve --vsock
SOCKET,cid=N,uds=PATH`` to a host program reading the UNIX socket
``PATH_P`` the guest connected to (the hybrid-vsock convention).  The
front-end sends 64 KiB OP_RW packets (Linux's largest, ``MAX_PKT_PAYLOAD``)
as fast as the device's credit allows (virtio 1.2 section 5.10.6.3:
never more than ``buf_alloc - (tx_cnt - fwd_cnt)`` in flight), then
SHUTDOWN; the host program counts the bytes from the first to end of file.
The peer: the same host program reading a plain UNIX stream socket that a
writer fills with the same 64 KiB chunks.  ``ratio_vsock_vs_unix_socket``
is the vsock rate over the plain rate.

SCSI: 4 KiB random reads at queue depth 32 against ``iovirt serve --scsi``
and ``iovirt serve --blk`` on the same /dev/shm image, from the same kind of
front-end process (READ(10) CDBs for SCSI, VIRTIO_BLK_T_IN for blk; every
block's data checked); ``ratio_scsi_vs_blk`` is SCSI IOPS over blk IOPS.
It is ``null`` when ``iovirt.virtio.scsi`` is not there.

Each side of a ratio runs twice, alternating with the other side, against
the same back-end process; the best of each counts (the machine is shared).
Cores (2): ``iovirt serve`` and the host-side reader on core 0, the
front-ends (and the plain writer) on core 1.  The last output line is one
JSON object of the figures.

    python benchmarks/devices.py [--seconds S] [--only vsock|scsi]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

from vhost_common import NO_EVENT_IDX, numbered_image, read_run, serve_iovirt, stop_process, wait_socket

CHUNK = 64 << 10
"""Bytes per write and per vsock packet (virtio-vsock's MAX_PKT_PAYLOAD, Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)."""

GUEST_CID = 42
HOST_PORT = 1234
GUEST_PORT = 5000
TX_CHAINS = 8
"""Transmit chains the front-end cycles through (the device's credit keeps at most 4 of 64 KiB in flight)."""
RX_BUFFERS = 64
"""Receive buffers the front-end keeps posted (it only receives the device's credit updates)."""
ROUNDS = 2
"""Each side of a ratio is measured this many times, alternating with the other; the best of each counts."""


# -- the host side: one reader for both runs ---------------------------------------------------


def _host_reader(path: str, ready, out) -> None:
    """Listen on ``path``, accept one stream, read it to end of file; report (bytes, seconds from first byte)."""
    os.sched_setaffinity(0, {0})
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    ready.set()
    conn, _ = listener.accept()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = conn.recv_into(view)
    start = time.monotonic()
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        total += n
    out.put((total, time.monotonic() - start))
    conn.close()
    listener.close()
    os.unlink(path)  # the next round binds it again


def _plain_writer(path: str, seconds: float, out) -> None:
    os.sched_setaffinity(0, {1})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    chunk = bytes(range(256)) * (CHUNK // 256)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.sendall(chunk)
        sent += CHUNK
    sock.close()
    out.put(sent)


# -- the vsock front-end ------------------------------------------------------------------------


def _vsock_writer(sock: str, seconds: float, out) -> None:
    """Connect guest port GUEST_PORT to host port HOST_PORT, stream 64 KiB OP_RW packets within credit, shut down."""
    os.sched_setaffinity(0, {1})
    from iovirt.vhost_user.driver import VhostUserDriver
    from iovirt.virtio.vsock.connection import U32
    from iovirt.virtio.vsock.defs import (
        HDR_SIZE,
        RX_QUEUE,
        TX_QUEUE,
        VIRTIO_VSOCK_OP_REQUEST,
        VIRTIO_VSOCK_OP_RESPONSE,
        VIRTIO_VSOCK_OP_RST,
        VIRTIO_VSOCK_OP_RW,
        VIRTIO_VSOCK_OP_SHUTDOWN,
        VIRTIO_VSOCK_SHUTDOWN_MASK,
        Header,
    )
    from iovirt.virtio.vsock.driver import RX_BUF_SIZE, VsockDriver

    rx_size = HDR_SIZE + RX_BUF_SIZE

    with VhostUserDriver(sock, features=NO_EVENT_IDX) as drv:
        guest = VsockDriver(drv, GUEST_CID, rx_buffers=RX_BUFFERS)
        guest.send(guest.header(GUEST_PORT, HOST_PORT, VIRTIO_VSOCK_OP_REQUEST))
        hdr, _ = guest.wait_op(VIRTIO_VSOCK_OP_RESPONSE, GUEST_PORT)
        peer_buf_alloc, peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
        tx, rx, mem = guest.tx, guest.rx, drv.memory
        # TX_CHAINS chains of [header, 64 KiB payload], built once: every RW
        # packet is the same bytes (the guest receives nothing, so its own
        # fwd_cnt stays 0).  The device completes chains in order, so the avail
        # ring is filled with the heads cyclically once and sending k more
        # packets is an avail->idx bump of k.
        raw = guest.header(GUEST_PORT, HOST_PORT, VIRTIO_VSOCK_OP_RW, length=CHUNK).pack()
        payload = bytes(range(256)) * (CHUNK // 256)
        heads = []
        for _ in range(TX_CHAINS):
            hdr_addr, data_addr = drv.alloc.alloc(HDR_SIZE), drv.alloc.alloc(CHUNK, 4096)
            mem.write(hdr_addr, raw)
            mem.write(data_addr, payload)
            heads.append(tx.add_chain([(hdr_addr, HDR_SIZE), (data_addr, CHUNK)]))
        tx.set_interrupts(False)
        avail = mem.view(tx.avail_addr, 4 + 2 * tx.size).cast("H")
        used_idx = mem.view(tx.used_addr + 2, 2).cast("H")
        base = avail[1]
        for k in range(tx.size):
            avail[2 + (base + k) % tx.size] = heads[k % TX_CHAINS]
        # Receive buffers are re-posted from a fixed pool, round robin: twice the
        # ring's fill, so a buffer comes back only after the device returned it.
        rx_pool = [drv.alloc.alloc(rx_size) for _ in range(2 * RX_BUFFERS)]
        posted = sent = rx_posted = 0
        start = time.monotonic()
        end = start + seconds
        while time.monotonic() < end:
            if rx.used_idx() != rx.last_used_idx:  # the device's CREDIT_UPDATEs
                for elem in rx.get_used():
                    hdr = Header.unpack(elem.data[:HDR_SIZE])
                    if hdr.op == VIRTIO_VSOCK_OP_RST:
                        raise RuntimeError("the device reset the connection")
                    peer_buf_alloc, peer_fwd_cnt = hdr.buf_alloc, hdr.fwd_cnt
                    rx.add_chain([], [(rx_pool[rx_posted % len(rx_pool)], rx_size)])
                    rx_posted += 1
                drv.kick(RX_QUEUE)
            credit = peer_buf_alloc - ((sent - peer_fwd_cnt) & U32)
            n = min(credit // CHUNK, TX_CHAINS - ((base + posted - used_idx[0]) & 0xFFFF))
            if n > 0:
                posted += n
                sent += n * CHUNK
                avail[1] = (base + posted) & 0xFFFF
                drv.frontend.kick(TX_QUEUE)
        # Every chain consumed, then hand the ring back to DriverQueue for the SHUTDOWN.
        while used_idx[0] != (base + posted) & 0xFFFF:
            time.sleep(0.001)
        tx.avail_idx = tx.last_used_idx = (base + posted) & 0xFFFF
        tx.publish()
        for view in (avail, used_idx):
            view.release()
        guest.send(guest.header(GUEST_PORT, HOST_PORT, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_MASK))
        guest.wait_op(VIRTIO_VSOCK_OP_RST, GUEST_PORT, timeout=30)  # both directions over: the device closes
    out.put(sent)


def _stream(path: Path, writer, args: tuple, seconds: float) -> float:
    """Bytes/s the host reader at ``path`` got from ``writer(*args, seconds, out)``; the counts must agree."""
    ctx = mp.get_context("spawn")
    ready, got, put = ctx.Event(), ctx.Queue(), ctx.Queue()
    reader = ctx.Process(target=_host_reader, args=(str(path), ready, got))
    reader.start()
    try:
        if not ready.wait(20):
            raise RuntimeError("the host reader did not start")
        proc = ctx.Process(target=writer, args=(*args, seconds, put))
        proc.start()
        sent = put.get(timeout=seconds + 60)
        received, elapsed = got.get(timeout=60)
        proc.join(10)
    finally:
        reader.join(10)
        if reader.is_alive():
            reader.kill()
    if received != sent:
        raise RuntimeError(f"{writer.__name__}: sent {sent} bytes, the host read {received}")
    return received / elapsed


def vsock_figures(tmp: Path, seconds: float) -> dict[str, float]:
    uds = tmp / "vm.vsock"
    sock, plain = tmp / "iovirt-vsock.sock", tmp / "plain.sock"
    backend = serve_iovirt(["--vsock", f"{sock},cid={GUEST_CID},uds={uds}"], tmp / "iovirt-vsock.log")
    wait_socket(sock, backend)
    ours = theirs = 0.0
    try:
        for _ in range(ROUNDS):
            ours = max(ours, _stream(Path(f"{uds}_{HOST_PORT}"), _vsock_writer, (str(sock),), seconds))
            theirs = max(theirs, _stream(plain, _plain_writer, (str(plain),), seconds))
    finally:
        stop_process(backend, signal.SIGTERM)
    ratio = ours / theirs
    print(f"vsock stream, 64 KiB writes, front-end -> host UNIX socket: iovirt {ours / 1e6:,.0f} MB/s   "
          f"plain UNIX socket pair {theirs / 1e6:,.0f} MB/s   ratio {ratio:.2f}")
    return {"vsock_stream_bytes_per_s": ours, "unix_socket_stream_bytes_per_s": theirs,
            "ratio_vsock_vs_unix_socket": round(ratio, 3)}


def scsi_figures(tmp: Path, seconds: float) -> dict[str, float | None]:
    if importlib.util.find_spec("iovirt.virtio.scsi") is None:
        print("scsi: not available (iovirt.virtio.scsi missing)")
        return {"ratio_scsi_vs_blk": None}
    size = 256 << 20
    iops = {"scsi": 0.0, "blk": 0.0}
    with numbered_image(size) as image:
        socks = {kind: tmp / f"iovirt-{kind}.sock" for kind in iops}
        backends = [serve_iovirt([f"--{kind}", f"{socks[kind]},{image}"], tmp / f"iovirt-{kind}.log") for kind in iops]
        try:
            for kind, backend in zip(iops, backends):
                wait_socket(socks[kind], backend)
            for _ in range(ROUNDS):
                for kind in iops:
                    iops[kind] = max(iops[kind], read_run(kind, socks[kind], size // 512, seconds))
        finally:
            for backend in backends:
                stop_process(backend, signal.SIGTERM)
    ratio = iops["scsi"] / iops["blk"]
    print(f"4 KiB random read, QD32, /dev/shm: iovirt scsi {iops['scsi']:,.0f} IOPS   "
          f"iovirt blk {iops['blk']:,.0f} IOPS   ratio {ratio:.2f}")
    return {"scsi_4k_randread_iops": iops["scsi"], "blk_4k_randread_iops": iops["blk"],
            "ratio_scsi_vs_blk": round(ratio, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per figure (default 5)")
    parser.add_argument("--only", choices=["vsock", "scsi"], help="run only the vsock or the SCSI figures")
    args = parser.parse_args()
    figures: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="iovirt-bench-") as tmp:
        if args.only in (None, "vsock"):
            figures.update(vsock_figures(Path(tmp), args.seconds))
        if args.only in (None, "scsi"):
            figures.update(scsi_figures(Path(tmp), args.seconds))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
