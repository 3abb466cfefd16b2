"""The descriptor-chain fuzzer's own checks, on guest memory in a bytearray (no server).

A check that allows too little reports false findings (one did: a mutated
``next`` made a DISCARD read another chain's segments); one that allows too
much hides real ones.
"""

from __future__ import annotations

import chain_fuzz
from chain_fuzz import DESC, HEADER, MEMORY, QSIZE, SECTOR, SEGMENT, U16, Ring
from iovirt.memory import BumpAllocator
from iovirt.virtio.blk.defs import VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_OUT
from iovirt.virtio.defs import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

DATA = 0x40000


def _ring(mem: bytearray, heads: list[int]) -> Ring:
    ring = Ring(0, BumpAllocator(0x1000, MEMORY - 0x1000))
    for k, head in enumerate(heads):
        U16.pack_into(mem, ring.avail + 4 + 2 * k, head)
    ring.first, ring.count = 0, len(heads)
    return ring


def test_device_write_ranges_follow_a_next_into_another_chains_segments():
    mem = bytearray(MEMORY)
    ring = _ring(mem, [0])
    header, segments, status = DATA, DATA + 0x100, DATA + 0x200
    HEADER.pack_into(mem, header, VIRTIO_BLK_T_DISCARD, 0, 0)
    SEGMENT.pack_into(mem, segments, 7, 3, 0)
    SEGMENT.pack_into(mem, segments + 16, 100, 1, 0)
    # Head 0: the header, then next = 9, a descriptor the chain was not written with.
    DESC.pack_into(mem, ring.desc, header, 16, VIRTQ_DESC_F_NEXT, 9)
    DESC.pack_into(mem, ring.desc + 16 * 9, segments, 32, VIRTQ_DESC_F_NEXT, 10)
    DESC.pack_into(mem, ring.desc + 16 * 10, status, 1, VIRTQ_DESC_F_WRITE, 0)
    assert sorted(chain_fuzz._device_write_ranges(mem, ring)) == [(7 * SECTOR, 10 * SECTOR), (100 * SECTOR, 101 * SECTOR)]


def test_device_write_ranges_read_a_split_header_and_an_indirect_table():
    mem = bytearray(MEMORY)
    ring = _ring(mem, [3])
    table, data = DATA, DATA + 0x1000
    packed = HEADER.pack(VIRTIO_BLK_T_OUT, 0, 20)
    mem[data : data + 4] = packed[:4]
    mem[data + 0x100 : data + 0x10C] = packed[4:]
    DESC.pack_into(mem, ring.desc + 16 * 3, table, 48, VIRTQ_DESC_F_INDIRECT, 0)
    DESC.pack_into(mem, table, data, 4, VIRTQ_DESC_F_NEXT, 1)  # the header split over two buffers
    DESC.pack_into(mem, table + 16, data + 0x100, 12 + 1024, VIRTQ_DESC_F_NEXT, 2)
    DESC.pack_into(mem, table + 32, data + 0x800, 1, VIRTQ_DESC_F_WRITE, 0)
    assert chain_fuzz._device_write_ranges(mem, ring) == [(20 * SECTOR, 20 * SECTOR + 1024)]


def test_device_write_ranges_end_a_next_loop():
    mem = bytearray(MEMORY)
    ring = _ring(mem, [0])
    HEADER.pack_into(mem, DATA, VIRTIO_BLK_T_OUT, 0, 1)
    DESC.pack_into(mem, ring.desc, DATA, 16, VIRTQ_DESC_F_NEXT, 0)
    assert chain_fuzz._device_write_ranges(mem, ring) == [(SECTOR, SECTOR + 16 * (QSIZE - 1))]


def test_writable_ranges_cover_indirect_tables_and_nothing_readable():
    mem = bytearray(MEMORY)
    ring = _ring(mem, [])
    table = DATA
    DESC.pack_into(mem, ring.desc, DATA + 0x100, 16, VIRTQ_DESC_F_NEXT, 1)
    DESC.pack_into(mem, ring.desc + 16, DATA + 0x200, 512, VIRTQ_DESC_F_WRITE, 0)
    DESC.pack_into(mem, ring.desc + 32, table, 32, VIRTQ_DESC_F_INDIRECT, 0)
    DESC.pack_into(mem, table, DATA + 0x400, 8, VIRTQ_DESC_F_NEXT, 1)
    DESC.pack_into(mem, table + 16, DATA + 0x500, 4, VIRTQ_DESC_F_WRITE, 0)
    ranges, tables = chain_fuzz._writable(mem, [(ring.desc, 3)])
    assert sorted(ranges) == [(DATA + 0x200, DATA + 0x400), (DATA + 0x500, DATA + 0x504)]
    assert sorted(tables) == sorted([(ring.desc, 3), (table, 2)])
    assert chain_fuzz._merge([(5, 10), (0, 6), (20, 2**64), (-3, 1)], 100) == [(0, 10), (20, 100)]
