"""The batch data path's twins against each other and against the device's own command path.

One batch mixes READ/WRITE(10/16) the data path serves with every request it
must leave to the device (errors, other commands, unusual layouts, buffers
that cross from one memory region into the next, so without a host
pointer).  The same batch runs three ways: the reference queue (the Python
twin), the Cython queue (the C twin, with the Python twin behind it), and
with the data path switched off (every request through ``target.py``).
Responses, used lengths, images and counters must be the same byte for byte.
"""

from __future__ import annotations

import random
import struct

import pytest

import iovirt.virtio.device as device_mod
from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.virtio.defs import VIRTIO_F_VERSION_1
from iovirt.virtio.driver import DriverQueue
from iovirt.virtio.scsi import _datapath_py, datapath
from iovirt.virtio.scsi.defs import CONFIG_CDB_SIZE_OFFSET, RESP_CMD_HDR
from iovirt.virtio.scsi.device import VirtioScsi

from scsi_guest import lun_field, make_image

REGION = 4 << 20  # two adjacent regions: [0, 4 MiB) and [4 MiB, 8 MiB)
CROSSING = REGION - 1024  # a buffer here has no host pointer in the Cython queue (it spans both regions)
SENSE = 96


def rw10(op: int, lba: int, count: int, byte1: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, byte1, lba, 0, count, 0)


def rw16(op: int, lba: int, count: int) -> bytes:
    return struct.pack(">BBQIBB", op, 0, lba, count, 0, 0)


def requests(cdb_size: int) -> list[tuple[bytes, bytes, list, list]]:
    """(lun field, CDB, readable data, writable sizes or (addr, len) buffers) for one mixed batch."""
    rng = random.Random(16)
    data = lambda n: bytes(rng.randrange(256) for _ in range(n))  # noqa: E731
    out = [
        (lun_field(0), rw10(0x28, 3, 8), [], [4096]),  # READ(10)
        (lun_field(0), rw16(0x88, 100, 1), [], [256, 256]),  # READ(16) over two buffers
        (lun_field(0), rw10(0x2A, 10, 2), [data(1024)], []),  # WRITE(10)
        (lun_field(1), rw16(0x8A, 2000, 4), [data(1024), data(1024)], []),  # WRITE(16), LUN 1
        (lun_field(0), rw10(0x28, 1, 2), [], [2048]),  # a residual: buffer larger than the transfer
        (lun_field(0), rw10(0x28, 8191, 2), [], [1024]),  # LBA out of range
        (lun_field(5), rw10(0x28, 0, 1), [], [512]),  # no such LUN
        (lun_field(0, target=1), rw10(0x28, 0, 1), [], [512]),  # another target
        (b"\x02" + bytes(7), rw10(0x28, 0, 1), [], [512]),  # not a single-level lun field
        (lun_field(0), rw10(0x28, 0, 1, byte1=0x20), [], [512]),  # RDPROTECT
        (lun_field(0), rw10(0x28, 0, 8), [], [1024]),  # buffers smaller than the transfer: overrun
        (lun_field(0), rw10(0x2A, 0, 1), [data(512)], [512]),  # data-out and data-in together
        (lun_field(0), rw10(0x28, 0, 4096), [], [512]),  # beyond the maximum transfer
        (lun_field(0), bytes([0x12, 0, 0, 0, 36, 0]), [], [36]),  # INQUIRY
        (lun_field(0), rw10(0x28, 5, 0), [], []),  # READ(10) of 0 blocks
        (lun_field(0), rw16(0x8A, 5, 0), [], []),  # WRITE(16) of 0 blocks
        (lun_field(0), bytes([0x08, 0, 0, 7, 2, 0]), [], [1024]),  # READ(6): the device's
        (lun_field(0), rw10(0x28, 20, 2), [], [(CROSSING, 1024)]),  # data across the region boundary
        (lun_field(1), rw10(0x2A, 30, 2), [(CROSSING, 1024)], []),  # written from across it
        (bytes([1, 0, 0, 1, 0, 0, 0, 0]), rw10(0x28, 2000, 1), [], [512]),  # peripheral addressing, LUN 1
        (lun_field(0), rw10(0x28, 4, 1), "split header", [512]),  # the header over two buffers
        (lun_field(0), rw10(0x28, 6, 1), [], "split response"),  # the response over two buffers
    ]
    if cdb_size < 16:
        out.append((lun_field(0), rw16(0x88, 0, 1), [], [512]))  # a CDB longer than cdb_size
    return out


class Guest:
    """Request queue 0 of a VirtioScsi over two adjacent memory regions, filled with one batch at a time."""

    def __init__(self, dev: VirtioScsi) -> None:
        self.dev = dev
        self.memory = GuestMemory.from_ranges([(0, REGION), (REGION, REGION)])
        self.alloc = BumpAllocator(0x1000, REGION - 0x10_0000)
        dev.set_features(1 << VIRTIO_F_VERSION_1)
        for index in range(dev.num_queues):
            queue = DriverQueue(self.memory, self.alloc, 128, index=index)
            dev.start_queue(index, self.memory, queue.state(), notify=lambda: None)
            dev.set_queue_enabled(index, True)
            if index == 2:
                self.queue = queue

    def put(self, spec) -> tuple[int, int]:
        """A buffer: ``(addr, len)`` as given, a fresh one of ``spec`` bytes, or one holding ``spec``."""
        if isinstance(spec, tuple):
            return spec
        if isinstance(spec, int):
            return self.alloc.alloc(max(spec, 1)), spec
        addr = self.alloc.alloc(len(spec))
        self.memory.write(addr, spec)
        return addr, len(spec)

    def run(self, batch) -> list[tuple[int, bytes]]:
        """Every request of ``batch`` made available at once, one kick; (used length, bytes) of each."""
        resp = RESP_CMD_HDR.size + SENSE
        for field, cdb, out, ins in batch:
            header = field + struct.pack("<QBBB", 7, 0, 0, 0) + cdb.ljust(self.dev.cdb_size, b"\0")[: self.dev.cdb_size]
            if out == "split header":
                readable = [self.put(header[:11]), self.put(header[11:])]
            else:
                readable = [self.put(header)] + [self.put(o) for o in out]
            if ins == "split response":
                writable = [self.put(50), self.put(resp - 50), self.put(512)]
            else:
                writable = [self.put(resp)] + [self.put(i) for i in ins]
            self.queue.add_chain(readable, writable)
        self.queue.publish()
        self.dev.kick(2)
        return [(elem.len, elem.data) for elem in self.queue.get_used()]


def run_all(tmp_path, mode: str, cdb_size: int) -> tuple:
    images = [make_image(tmp_path / "lun0.img", fill=bytes(range(256)) * 128),
              make_image(tmp_path / "lun1.img", 1 << 20, fill=b"\x5a" * 4096)]
    dev = VirtioScsi(images, label="scsi0")
    try:
        guest = Guest(dev)
        if cdb_size != dev.cdb_size:
            assert dev.write_config(CONFIG_CDB_SIZE_OFFSET, struct.pack("<I", cdb_size))
        guest.memory.write(CROSSING, bytes(range(256)) * 4)
        used = guest.run(requests(cdb_size))
        return used, [open(p, "rb").read() for p in images], dict(dev.stats)
    finally:
        dev.close()


MODES = ["python", "cython"]


@pytest.mark.parametrize("cdb_size", [32, 12])
def test_the_twins_and_the_device_path_agree(tmp_path, monkeypatch, cdb_size):
    from iovirt.virtio import queue as queue_mod

    impls = queue_mod.implementations()
    results = {}
    for mode in MODES + ["device"]:
        if mode == "cython" and ("cython" not in impls or datapath.accel is None):
            continue
        with monkeypatch.context() as m:
            m.setattr(device_mod, "SplitQueue", impls["python" if mode == "device" else mode])
            served = []
            if mode == "device":
                m.setattr(datapath, "serve_batch", lambda batch, *a: (list(range(len(batch))), 0, 0, 0, 0))
            else:
                real = _datapath_py.serve_batch

                def counting(batch, queue, luns, sense_size, cdb_size, indexes=None):
                    served.append(len(batch) if indexes is None else len(indexes))
                    return real(batch, queue, luns, sense_size, cdb_size, indexes)

                m.setattr(_datapath_py, "serve_batch", counting)
            path = tmp_path / mode
            path.mkdir()
            results[mode] = run_all(path, mode, cdb_size)
            if mode == "cython":
                # The C twin served the common requests: only the rest reached the Python twin.
                assert served and sum(served) < len(requests(cdb_size)) - 5
    reference = results.pop("device")
    assert results, "no twin ran"
    for mode, result in results.items():
        assert result[0] == reference[0], mode  # responses and used lengths
        assert result[1] == reference[1], mode  # images
        assert result[2] == reference[2], mode  # counters
    # The batch does what it says: reads GOOD with data, errors with sense.
    used = reference[0]
    assert used[0][0] == RESP_CMD_HDR.size + SENSE + 4096
    assert used[0][1][RESP_CMD_HDR.size + SENSE :] == (bytes(range(256)) * 128)[3 * 512 : 11 * 512]
    assert RESP_CMD_HDR.unpack_from(used[4][1])[1] == 1024  # the residual
    assert RESP_CMD_HDR.unpack_from(used[5][1])[3] == 0x02  # CHECK CONDITION


@pytest.mark.parametrize("mode", MODES)
def test_a_read_only_lun_refuses_writes_in_every_twin(tmp_path, monkeypatch, mode):
    from iovirt.virtio import queue as queue_mod

    impls = queue_mod.implementations()
    if mode == "cython" and ("cython" not in impls or datapath.accel is None):
        pytest.skip("the Cython queue or the scsi _datapath_c extension is not loaded")
    monkeypatch.setattr(device_mod, "SplitQueue", impls[mode])
    image = make_image(tmp_path / "ro.img", fill=b"\x11" * 4096)
    dev = VirtioScsi([image], read_only=True, label="scsi-ro")
    try:
        guest = Guest(dev)
        used = guest.run([(lun_field(0), rw10(0x2A, 0, 1), [b"\x22" * 512], []),
                          (lun_field(0), rw10(0x28, 0, 1), [], [512])])
    finally:
        dev.close()
    sense_len, _residual, _q, status, response = RESP_CMD_HDR.unpack_from(used[0][1])
    assert (status, response, sense_len) == (0x02, 0, 18)
    assert used[0][1][RESP_CMD_HDR.size + 2] & 0xF == 0x7  # DATA PROTECT
    assert used[1][1][RESP_CMD_HDR.size + SENSE :] == b"\x11" * 512
    assert open(image, "rb").read(4096) == b"\x11" * 4096
