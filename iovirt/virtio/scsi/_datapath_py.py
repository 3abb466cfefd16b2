"""virtio-scsi's batch data path in Python: the readable reference of ``_datapath_c.pyx``.

:func:`serve_batch` serves the commands that carry the data of a disk, READ
and WRITE (10) and (16) (SBC-3 5.11, 5.15, 5.35, 5.39), of a popped batch of
request queue chains (virtio 1.2 5.6.6.1) with ``preadv``/``pwritev``
straight on views of guest memory, when they end GOOD.  Everything else is
left to the device (``device.py``) and its target (``target.py``): other
commands, a lun field that names no LUN of target 0, a CDB field the fast
path does not take (protection information), an LBA out of range, a
transfer beyond the maximum, a write to a read-only LUN, buffers smaller than
the transfer, data-out and data-in in one request, no room for the header or
the response, and image I/O that fails; the device answers those with the
right sense data, and a failed I/O is tried once more there.  Unlike the C
twin it takes any buffer layout (the header or the response split over
buffers, buffers without a host pointer).  :func:`parse_lun` and the buffer
helpers are the request layout the device reads too.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

from iovirt.memory import Access, GuestMemory, GuestMemoryError
from iovirt.virtio.chain import DescChain
from iovirt.virtio.scsi.defs import (
    BLOCK_SIZE,
    GOOD,
    LUN_ADDRESS_METHOD_MASK,
    LUN_FIRST_BYTE,
    LUN_FLAT_ADDRESSING,
    READ_10,
    READ_16,
    REQ_CMD_HDR,
    RESP_CMD_HDR,
    VIRTIO_SCSI_S_OK,
    WRITE_10,
    WRITE_16,
)

from iovirt.virtio.scsi.target import MAX_TRANSFER_BLOCKS

__all__ = ["FAST_OPCODES", "LunInfo", "gather", "lba_count", "parse_lun", "scatter", "serve_batch", "skip"]

Buffers = list[tuple[int, int]]

FAST_OPCODES = {READ_10: (10, False), READ_16: (16, False), WRITE_10: (10, True), WRITE_16: (16, True)}
"""The operation codes the data path serves: their CDB length and whether they write."""


class LunInfo(NamedTuple):
    """What the data path needs of one LUN: the image's fd, its size in blocks, whether it is read-only."""

    fd: int
    blocks: int
    read_only: bool


def parse_lun(lun: bytes) -> tuple[int, int] | None:
    """``(target, LUN)`` of a single-level lun field (5.6.6.1), or ``None`` when it is not in that format."""
    if lun[0] != LUN_FIRST_BYTE or any(lun[4:]) or lun[2] & LUN_ADDRESS_METHOD_MASK not in (0, LUN_FLAT_ADDRESSING):
        return None
    return lun[1], (lun[2] & ~LUN_ADDRESS_METHOD_MASK & 0xFF) << 8 | lun[3]


def lba_count(cdb: bytes) -> tuple[int, int]:
    """The LBA and transfer length of a READ/WRITE(10) or (16) CDB (SBC-3 5.11, 5.15, 5.35, 5.39)."""
    if cdb[0] in (READ_16, WRITE_16):
        return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")
    return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")


def serve_batch(
    batch: Any, queue: Any, luns: Sequence[LunInfo], sense_size: int, cdb_size: int,
    indexes: Sequence[int] | None = None,
) -> tuple[list[int], int, int, int, int]:
    """Serve the READ/WRITE(10/16) commands that end GOOD among chains ``indexes`` (all by default) of ``batch``.

    Writes each served chain's response (GOOD, no sense, the residual of the
    data buffers) and sets its used length (the response and the data-in
    bytes, as the device does).  Returns ``(left, reads, writes, read_bytes,
    written_bytes)`` as the C twin does: ``left`` lists the chains for the
    device.
    """
    memory = queue.memory
    left: list[int] = []
    reads = writes = read_bytes = written_bytes = 0
    for i in range(len(batch)) if indexes is None else indexes:
        chain = batch[i]
        served = _serve(memory, chain, luns, sense_size, cdb_size)
        if served is None:
            left.append(i)
            continue
        write, nbytes, used_len = served
        writes += write
        reads += not write
        if write:
            written_bytes += nbytes
        else:
            read_bytes += nbytes
        batch.set_used_len(i, used_len)
    return left, reads, writes, read_bytes, written_bytes


def _serve(
    memory: GuestMemory, chain: DescChain, luns: Sequence[LunInfo], sense_size: int, cdb_size: int
) -> tuple[bool, int, int] | None:
    """``(write, bytes moved, used length)`` of a served command, ``None`` to leave it to the device."""
    resp_size = RESP_CMD_HDR.size + sense_size
    hdr_size = REQ_CMD_HDR.size + cdb_size
    if chain.writable_len < resp_size or chain.readable_len < hdr_size:
        return None
    try:
        header = gather(memory, chain.readable, hdr_size)
    except GuestMemoryError:
        return None
    address = parse_lun(header[:8])
    if address is None or address[0] != 0 or address[1] >= len(luns):
        return None
    cdb = header[REQ_CMD_HDR.size :]
    fast = FAST_OPCODES.get(cdb[0])
    if fast is None or cdb_size < fast[0] or cdb[1] & 0xE0:
        return None  # another command, a CDB cut short, or protection information (RDPROTECT/WRPROTECT)
    write = fast[1]
    lun = luns[address[1]]
    lba, count = lba_count(cdb)
    if (write and lun.read_only) or lba > lun.blocks or count > lun.blocks - lba or count > MAX_TRANSFER_BLOCKS:
        return None
    dataout, datain = skip(chain.readable, hdr_size), skip(chain.writable, resp_size)
    bufs, other = (dataout, datain) if write else (datain, dataout)
    buf_len = sum(n for _, n in bufs)
    nbytes = count * BLOCK_SIZE
    if any(n for _, n in other) or buf_len < nbytes:
        return None
    if nbytes and not _transfer(memory, lun.fd, bufs, nbytes, lba * BLOCK_SIZE, write):
        return None
    try:
        scatter(memory, chain.writable, RESP_CMD_HDR.pack(0, buf_len - nbytes, 0, GOOD, VIRTIO_SCSI_S_OK))
    except GuestMemoryError:
        return None
    return write, nbytes, resp_size + (0 if write else nbytes)


def _transfer(memory: GuestMemory, fd: int, bufs: Buffers, nbytes: int, offset: int, write: bool) -> bool:
    """The first ``nbytes`` of ``bufs`` to the image (``write``) or from it, zero-copy; ``False`` if it failed."""
    # The device reads guest memory for a WRITE, writes it for a READ (VT-d R/W).
    access = Access.READ if write else Access.WRITE
    views: list[memoryview] = []
    try:
        left = nbytes
        for addr, n in bufs:
            if left <= 0:
                break
            k = min(n, left)
            if k:
                views += memory.views(addr, k, access)
            left -= k
        done = os.pwritev(fd, views, offset) if write else os.preadv(fd, views, offset)
    except (GuestMemoryError, OSError):
        return False
    finally:
        for view in views:
            view.release()
    return done == nbytes


def skip(bufs: Buffers, nbytes: int) -> Buffers:
    """The buffers left after the first ``nbytes``."""
    out = []
    for addr, n in bufs:
        if nbytes >= n:
            nbytes -= n
            continue
        out.append((addr + nbytes, n - nbytes))
        nbytes = 0
    return out


def gather(memory: GuestMemory, bufs: Buffers, limit: int) -> bytes:
    """The first ``limit`` bytes of ``bufs``."""
    out = bytearray()
    for addr, n in bufs:
        if len(out) >= limit:
            break
        out += memory.read(addr, min(n, limit - len(out)))
    return bytes(out)


def scatter(memory: GuestMemory, bufs: Buffers, data: bytes) -> None:
    """``data`` written over ``bufs`` from the front."""
    pos = 0
    for addr, n in bufs:
        if pos >= len(data):
            break
        k = min(n, len(data) - pos)
        memory.write(addr, data[pos : pos + k])
        pos += k
