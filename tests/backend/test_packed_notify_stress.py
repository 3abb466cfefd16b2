"""Notification stress on packed rings (virtio 1.2 2.8.10, 2.8.14): the driver never waits forever.

A driver modelled on Linux's ``virtio_ring.c`` (:mod:`linux_packed`) drives
iovirt's real back-end over vhost-user (the server and its data-plane
thread in this process): a submitting thread adds lists (direct chains and
indirect tables, random Buffer IDs) to a small ring, so the wrap counters
flip every few requests, and kicks only when the device's event
suppression asks for it; an interrupt thread sleeps on the call eventfd and
serves used buffers as Linux's drivers do, picking at random each time:
virtio_scsi/virtio_blk's ``disable_cb``/``get_buf``/``enable_cb`` loop,
NAPI's ``enable_cb_prepare`` then ``poll`` re-check, or virtio-net TX's
``enable_cb_delayed``.  With and without VIRTIO_F_EVENT_IDX, for the scsi
request queue, blk and net TX.  A lost kick or a lost call shows as
requests in flight and no progress: the test fails with the ring state.
"""

from __future__ import annotations

import os
import random
import select
import struct
import threading
import time

import pytest

from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.server import VhostUserServer
from iovirt.virtio.blk.defs import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTIO_F_EVENT_IDX, VIRTIO_F_IN_ORDER
from iovirt.virtio.net.defs import NetHdr
from iovirt.virtio.scsi.defs import READ_10, REQ_CMD_HDR, RESP_CMD_HDR, TEST_UNIT_READY
from iovirt.virtio.scsi.device import VirtioScsi

from backend_helpers import wait_until
from linux_packed import LinuxPackedVq

REQUESTS = 300
STALL_S = 5.0  # no completion for this long with requests in flight: a hang
SCSI_RESP = RESP_CMD_HDR.size + 96  # the default sense_size
SCSI_HDR = REQ_CMD_HDR.size + 32  # the default cdb_size


@pytest.fixture
def scsi_path(tmp_path):
    image = tmp_path / "lun0.img"
    image.write_bytes(bytes(1 << 20))
    dev = VirtioScsi([str(image)], label="scsi0")
    server = VhostUserServer()
    path = str(tmp_path / "scsi.sock")
    server.add_socket(path, dev, name="scsi0")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path
    server.stop()
    thread.join(timeout=10)
    dev.close()


def _blk_request(drv, rng):
    sector = rng.randrange(1024)
    if rng.random() < 0.5:
        out = [_buf(drv, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector)), _buf(drv, os.urandom(512))]
        return out, [_buf(drv, bytes(1))]
    return [_buf(drv, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector))], [_buf(drv, bytes(512)), _buf(drv, bytes(1))]


def _blk_check(drv, in_, length):
    assert drv.memory.read(in_[-1][0], 1) == bytes([VIRTIO_BLK_S_OK])


def _scsi_request(drv, rng):
    lun = bytes([1, 0, 0x40, 0, 0, 0, 0, 0])
    if rng.random() < 0.2:
        cdb = bytes([TEST_UNIT_READY]) + bytes(31)
        return [_buf(drv, REQ_CMD_HDR.pack(lun, rng.randrange(1 << 32), 0, 0, 0) + cdb)], [_buf(drv, bytes(SCSI_RESP))]
    cdb = struct.pack(">BBIBHB", READ_10, 0, rng.randrange(2048), 0, 1, 0).ljust(32, b"\0")
    header = REQ_CMD_HDR.pack(lun, rng.randrange(1 << 32), 0, 0, 0) + cdb
    return [_buf(drv, header)], [_buf(drv, bytes(SCSI_RESP)), _buf(drv, bytes(512))]


def _scsi_check(drv, in_, length):
    _sense_len, _residual, _sq, status, response = RESP_CMD_HDR.unpack(drv.memory.read(in_[0][0], RESP_CMD_HDR.size))
    assert (status, response) == (0, 0)


def _net_request(drv, rng):
    frame = bytes([0x02, 0, 0, 0, 0, 0x99]) + bytes([0x52, 0x54, 0, 0, 0, 0]) + b"\x08\x00" + os.urandom(46)
    if rng.random() < 0.5:
        return [_buf(drv, NetHdr().pack() + frame)], []
    return [_buf(drv, NetHdr().pack()), _buf(drv, frame)], []


def _buf(drv, data: bytes) -> tuple[int, int]:
    addr = drv.alloc.alloc(len(data))
    drv.memory.write(addr, data)
    return addr, len(data)


DEVICES = {
    "scsi": (2, [0, 1, 2], _scsi_request, _scsi_check),
    "blk": (0, [0], _blk_request, _blk_check),
    "net": (1, [0, 1], _net_request, None),
}


class Stress:
    """The Linux-modelled driver's two contexts on one queue, and the hang watch."""

    def __init__(self, drv: VhostUserDriver, index: int, vq: LinuxPackedVq, rng: random.Random, check) -> None:
        self.drv, self.index, self.vq, self.rng, self.check = drv, index, vq, rng, check
        self.done = 0
        self.interrupts = 0
        self.stop = False
        self.error: BaseException | None = None
        self.progress = threading.Condition()

    def complete(self, data, length) -> None:
        if self.check is not None:
            self.check(self.drv, data, length)
        with self.progress:
            self.done += 1
            self.progress.notify_all()

    def drain(self, budget: int | None = None) -> int:
        n = 0
        while budget is None or n < budget:
            got = self.vq.get_buf()
            if got is None:
                break
            self.complete(*got)
            n += 1
        return n

    def callback(self) -> None:
        vq = self.vq
        mode = self.rng.choice(["done", "napi", "delayed"])
        if mode == "done":  # virtscsi_vq_done, virtblk_done
            while True:
                vq.disable_cb()
                self.drain()
                if vq.enable_cb():
                    return
        elif mode == "napi":  # virtnet_poll: a budget, then enable_cb_prepare and a poll
            vq.disable_cb()
            while True:
                if self.drain(budget=self.rng.randint(1, 4)) >= 1 and vq.more_used():
                    continue  # budget used up: NAPI polls again
                opaque = vq.enable_cb_prepare()
                if not vq.poll(opaque):
                    return
                vq.disable_cb()
        else:  # virtio-net TX: interrupt after 3/4 of what is outstanding
            while True:
                vq.disable_cb()
                self.drain()
                if vq.enable_cb_delayed():
                    return

    def irq_thread(self) -> None:
        fd = self.drv.frontend.call_fds[self.index]
        try:
            while not self.stop:
                if not select.select([fd], [], [], 0.05)[0]:
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                with self.vq.lock:
                    self.interrupts += 1
                    self.vq.interrupt(self.callback)
        except BaseException as exc:  # reported by the test thread
            self.error = exc
            with self.progress:
                self.progress.notify_all()

    def submit(self, requests: int, make) -> None:
        sent = 0
        while self.done < requests:
            with self.vq.lock:
                burst = self.rng.randint(1, 6)
                added = 0
                while sent < requests and added < burst:
                    out, in_ = make(self.drv, self.rng)
                    if not self.vq.add(out, in_, in_):
                        break
                    sent += 1
                    added += 1
                    self.vq.yield_point()
                kick = added and self.vq.kick_prepare()
            if kick:
                self.drv.frontend.kick(self.index)
            with self.progress:
                before = self.done
                deadline = time.monotonic() + STALL_S
                waiting = sent == requests or self.vq.num_free == 0
                while self.done == before < sent and self.error is None and waiting:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise AssertionError(f"hang: {sent - self.done} requests in flight, no completion for "
                                             f"{STALL_S} s; {self.describe()}")
                    self.progress.wait(left)
            if self.error is not None:
                raise self.error

    def describe(self) -> str:
        vq, memory = self.vq, self.drv.memory
        driver = struct.unpack("<HH", memory.read(vq.driver_addr, 4))
        device = struct.unpack("<HH", memory.read(vq.device_addr, 4))
        return (f"driver: next_avail {vq.next_avail_idx} wrap {vq.avail_wrap_counter}, last_used {vq.last_used_idx:#x}, "
                f"num_free {vq.num_free}, in flight {sorted(vq.desc_state)}, shadow {vq.event_flags_shadow}, event_triggered {vq.event_triggered}, used pending {vq.more_used()}; "
                f"driver area (off_wrap, flags) {driver[0]:#x},{driver[1]}; device area {device[0]:#x},{device[1]}; "
                f"{self.interrupts} interrupts")


def endpoint(server, path: str):
    return next(e for e in server.endpoints if e.path == path)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("device", ["scsi", "blk", "net"])
def test_packed_notifications_never_hang(backend, scsi_path, device, event_idx):
    index, queues, make, check = DEVICES[device]
    path = {"scsi": scsi_path, "blk": backend.blk_path, "net": backend.net_paths[0]}[device]
    if device != "scsi":
        assert wait_until(lambda: endpoint(backend.server, path).connection is None)
    features = (1 << 64) - 1 if event_idx else ~(1 << VIRTIO_F_EVENT_IDX) & ((1 << 64) - 1)
    features &= ~(1 << VIRTIO_F_IN_ORDER)  # Linux 6.1's vring_transport_features() never accepts IN_ORDER
    for seed in range(3):
        rng = random.Random(f"{device}-{event_idx}-{seed}")
        with VhostUserDriver(path, memory_size=16 << 20, packed=True, features=features) as drv:
            started = drv.start_queues(queues, size=rng.choice([4, 8, 16]))
            assert bool(drv.features >> VIRTIO_F_EVENT_IDX & 1) == event_idx
            ring = started[index]
            drv.memory.write(ring.driver_addr, bytes(4))  # as Linux leaves it: ENABLE, offset 0
            vq = LinuxPackedVq(drv.memory, drv.alloc, ring.desc_addr, ring.driver_addr, ring.device_addr, ring.size,
                               event=event_idx, indirect=True, rng=rng)
            stress = Stress(drv, index, vq, random.Random(rng.random()), check)
            irq = threading.Thread(target=stress.irq_thread, daemon=True)
            irq.start()
            try:
                stress.submit(REQUESTS, make)
            finally:
                stress.stop = True
                irq.join(timeout=5)
            assert stress.done == REQUESTS
