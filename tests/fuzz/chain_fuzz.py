"""A descriptor-chain fuzzer: a correct front-end writes random and mutated chains into guest memory.

Each worker drives, through :class:`iovirt.vhost_user.driver.VhostUserDriver`,
one blk device and two net ports of the server (port a transmits, port b
receives what a sends to b's MAC).  A round writes a few chains into a
queue with the raw writers of :class:`iovirt.virtio.driver.DriverQueue`
(``write_desc``, ``post_head``, ``set_avail_idx``): plausible requests
(blk IN/OUT/FLUSH/GET_ID/DISCARD/WRITE_ZEROES at random sectors and sizes,
frames, receive buffers; direct or through an indirect table), the last one
often mutated (next loops, next or head out of the table, addresses and
lengths at boundary values or on the rings, flags flipped, nested or
misaligned indirect tables, the avail idx jumped).  It kicks and waits until
the device consumed the round, signalled its err eventfd, or went quiet.

Then the checks of the round, against the state before the kick:

* guest memory is filled with a canary pattern; only bytes of device-writable
  buffers (any descriptor with VIRTQ_DESC_F_WRITE in the table or an indirect
  table, as written or as found afterwards) and the used ring may change;
* the blk image changes only in the ranges the round's write requests name
  (sector and length, or the DISCARD/WRITE_ZEROES segments).

A device that failed or went quiet is reconnected (a fresh bring-up).
"""

from __future__ import annotations

import collections
import os
import random
import select
import struct
import time
from typing import Any

from fuzz_harness import Slot
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from iovirt.virtio.defs import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, used_ring_size
from iovirt.virtio.net.defs import NetHdr

MEMORY = 2 << 20
QSIZE = 256
DATA = 1 << 20
SECTOR = 512
LAST = 24
PAGE = 4096
DESC = struct.Struct("<QIHH")
PATTERN = bytes((0xA5 ^ (i * 7)) & 0xFF for i in range(251)) * (DATA // 251 + 1)
WRITES = (VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES)
U64_MAX = (1 << 64) - 1

Desc = tuple[int, int, int, int]  # addr, len, flags, next


class Device:
    """One connected device: driver, err eventfds, and the data area the rounds use."""

    def __init__(self, path: str, queues: list[int]) -> None:
        self.drv = VhostUserDriver(path, memory_size=MEMORY, timeout=2.0)
        try:
            self.drv.start_queues(queues, size=QSIZE)
            for q in queues:
                self.drv.frontend.set_vring_err(q)
            self.data = self.drv.alloc.alloc(DATA, PAGE)
        except BaseException:
            self.drv.close()
            raise
        self.view = self.drv.region.view

    def close(self) -> None:
        """Disconnect."""
        self.drv.close()


class ChainFuzzer:
    """One worker: blk rounds, net transmit rounds and net receive rounds."""

    def __init__(self, slot: Slot, index: int) -> None:
        self.net_a, self.net_b = slot.net[0], slot.net[1]
        self.blk_path, self.image = slot.blk[0]
        self.mac_b = bytes([0x02, 0xF0, 0, 0, index >> 8 & 0xFF, index & 0xFF])
        self.devices: dict[str, Device | None] = {"blk": None, "a": None, "b": None}
        self.rng = random.Random(0)
        self.counters: collections.Counter[str] = collections.Counter()
        self.last: collections.deque[str] = collections.deque(maxlen=LAST)
        self.problems: list[dict[str, str]] = []

    # -- campaign entry points ---------------------------------------------------------
    def run(self, seed: int, count: int) -> dict[str, Any]:
        """Post ``count`` chains from ``seed``; every device is disconnected at the end."""
        self.rng = random.Random(seed)
        self.counters = collections.Counter()
        self.problems = []
        self.last.clear()
        chains = 0
        while chains < count and self.counters["connect_failed"] < 5 and len(self.problems) < 5:
            kind = self.rng.choice(("blk", "blk", "tx", "tx", "rx"))
            try:
                chains += self._round(kind)
            except (OSError, EOFError, TimeoutError) as exc:
                # The server closed or refused a connection (it may be restarting).
                self.counters["connect_failed"] += 1
                self.last.append(f"{kind}: {type(exc).__name__}: {exc}")
                self._drop_all()
                time.sleep(0.05)
        self._drop_all()
        return {"units": chains, "counters": dict(self.counters), "last": list(self.last), "problems": self.problems}

    def close(self) -> None:
        """Disconnect every device."""
        self._drop_all()

    def _drop_all(self) -> None:
        for key in self.devices:
            self._drop(key)

    def _drop(self, key: str) -> None:
        dev, self.devices[key] = self.devices[key], None
        if dev is not None:
            try:
                dev.close()
            except OSError:
                pass

    def _device(self, key: str) -> Device:
        dev = self.devices[key]
        if dev is None:
            path = {"blk": self.blk_path, "a": self.net_a, "b": self.net_b}[key]
            dev = Device(path, [0] if key == "blk" else [0, 1])
            self.devices[key] = dev
            self.counters["connections"] += 1
        return dev

    # -- one round -------------------------------------------------------------------------
    def _round(self, kind: str) -> int:
        rng = self.rng
        key, qi = {"blk": ("blk", 0), "tx": ("a", 1), "rx": ("b", 0)}[kind]
        dev = self._device(key)
        if kind == "rx":
            dev.drv.frontend.send_rarp(self.mac_b)  # b's MAC is at port b (a fuzzed frame may have moved it)
        queue = dev.drv.queues[qi]
        mem = dev.drv.memory
        mem.write(queue.desc_addr, bytes(16 * QSIZE))
        mem.write(dev.data, PATTERN[:DATA])
        n = rng.randrange(1, 65)
        chains, meta = self._chains(kind, dev, n)
        n = len(chains)
        mutation = self._mutate(chains, dev, queue) if rng.random() < 0.3 else ""
        # A mutated address moves a header: the device reads it where the first descriptor points.
        meta += [((c[1][1][0][0] if c[1] is not None else c[0][0][0]), bufs) for c, (_, bufs) in zip(chains, meta)]
        slot = 0
        heads = []
        for descs, indirect in chains:
            if indirect is not None:
                table_addr, table = indirect
                for k, d in enumerate(table):
                    queue.write_desc(k, *d, table=table_addr)
            head = slot
            for k, d in enumerate(descs):
                queue.write_desc(slot + k, *d)
            slot += len(descs)
            heads.append(head)
        if mutation == "head-oob":
            heads[-1] = rng.choice((QSIZE, QSIZE + 1, 0xFFFF))
        for head in heads:
            queue.post_head(head)
        if mutation == "avail-jump":
            queue.avail_idx = (queue.avail_idx + rng.choice((QSIZE + 1, 0x8000, 0xFFFF))) & 0xFFFF
        target = queue.avail_idx
        queue.set_avail_idx(target)
        before = bytes(dev.view)
        image_before = _read_image(self.image) if kind == "blk" else b""
        self.last.append(f"{kind} round: {n} chains {[c[0] for c in chains]} indirect "
                         f"{[c[1] for c in chains if c[1]]} mutation={mutation or 'none'}")
        if kind == "rx":
            dev.drv.frontend.kick(qi)
            self._send_frames(n)
        else:
            dev.drv.frontend.kick(qi)
        outcome = self._wait(dev, qi, target, 0.02 if kind == "rx" else 0.5)
        self.counters[f"{kind}_{outcome}"] += 1
        after = bytes(dev.view)
        self._check_memory(dev, queue, before, after, kind, mutation)
        if kind == "blk":
            self._check_image(image_before, _read_image(self.image), meta, before, after, dev, mutation)
        if outcome != "done":
            self._drop(key)
        else:
            queue.last_used_idx = queue.used_idx()
        return n

    def _wait(self, dev: Device, qi: int, target: int, quiet: float) -> str:
        queue = dev.drv.queues[qi]
        err = dev.drv.frontend.err_fds[qi]
        last, changed = queue.used_idx(), time.monotonic()
        while True:
            used = queue.used_idx()
            if used == target & 0xFFFF:
                return "done"
            if select.select([err], [], [], 0)[0]:
                return "refused"
            now = time.monotonic()
            if used != last:
                last, changed = used, now
            elif now - changed > quiet:
                return "quiet"
            time.sleep(0.0002)

    def _send_frames(self, n: int) -> None:
        """``n`` valid frames from port a to b's MAC (a receive round's traffic)."""
        a = self._device("a")
        queue = a.drv.queues[1]
        a.drv.memory.write(queue.desc_addr, bytes(16 * QSIZE))
        for i in range(n):
            size = self.rng.choice((60, 64, 200, 1000, 1514))
            frame = self.mac_b + bytes([2, 0xF1, 0, 0, 0, i]) + b"\x88\xb5" + self.rng.randbytes(size - 14)
            addr = a.data + i * 2048
            a.drv.memory.write(addr, NetHdr().pack() + frame)
            queue.write_desc(i, addr, 12 + len(frame), 0, 0)
            queue.post_head(i)
        target = queue.avail_idx
        queue.set_avail_idx(target)
        a.drv.frontend.kick(1)
        if self._wait(a, 1, target, 0.5) != "done":
            self._drop("a")

    # -- chains ------------------------------------------------------------------------------
    def _chains(self, kind: str, dev: Device, n: int) -> tuple[list[tuple[list[Desc], tuple[int, list[Desc]] | None]], list[tuple[int, list[int]]]]:
        """``n`` plausible chains (ring descriptors, optional indirect table) and per chain (header addr, buffer addrs)."""
        rng = self.rng
        cur = dev.data
        chains: list[tuple[list[Desc], tuple[int, list[Desc]] | None]] = []
        meta: list[tuple[int, list[int]]] = []
        slot = 0
        mem = dev.drv.memory
        while len(chains) < n and cur < dev.data + DATA - (64 << 10) and slot + 6 <= QSIZE:
            bufs: list[tuple[int, int, int]] = []  # addr, len, flags
            header = cur
            if kind == "blk":
                rtype = rng.choice((VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) * 3 + (VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                                   VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, rng.randrange(256)))
                sector = rng.randrange(520) if rng.random() < 0.95 else rng.choice((2**63, U64_MAX, 2**55))
                mem.write(cur, struct.pack("<IIQ", rtype, 0, sector))
                bufs.append((cur, 16, 0))
                cur += 16
                for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
                    size = rng.choice((512, 1024, 4096, 512, 1, 511, 0, 8192))
                    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
                        seg = struct.pack("<QII", rng.randrange(520), rng.choice((1, 8, 16, 0, 0xFFFFFFFF)), 0)
                        mem.write(cur, seg)
                        size = 16
                    writable = rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID)
                    bufs.append((cur, size, VIRTQ_DESC_F_WRITE if writable else 0))
                    cur += max(size, 1)
                bufs.append((cur, 1, VIRTQ_DESC_F_WRITE))
                cur += 16
            elif kind == "tx":
                size = rng.choice((60, 64, 100, 1514, 9000, 14, 13))
                dst = rng.choice((b"\xff" * 6, rng.randbytes(6), bytes([2, 0xF2, 0, 0, 0, 1])))
                src = bytes([2, 0xF3]) + rng.randbytes(4)  # never b's MAC
                hdr = NetHdr().pack() if rng.random() < 0.9 else rng.randbytes(12)
                mem.write(cur, hdr + dst + src + rng.randbytes(max(size - 12, 0)))
                total = 12 + size
                split = rng.randrange(1, total) if rng.random() < 0.3 and total > 1 else total
                bufs += [(cur, split, 0)] + ([(cur + split, total - split, 0)] if split < total else [])
                cur += total
            else:
                for _ in range(rng.choice((1, 1, 1, 2, 3))):
                    size = rng.choice((2048, 1526, 1600, 64, 12, 11, 0, 4096))
                    bufs.append((cur, size, VIRTQ_DESC_F_WRITE))
                    cur += max(size, 1)
            cur = (cur + 15) & ~15
            meta.append((header, [b[0] for b in bufs]))
            if rng.random() < 0.2:
                table_addr = cur
                table = [(a, ln, f | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0), k + 1 if k + 1 < len(bufs) else 0)
                         for k, (a, ln, f) in enumerate(bufs)]
                cur += 16 * len(table)
                chains.append(([(table_addr, 16 * len(table), VIRTQ_DESC_F_INDIRECT, 0)], (table_addr, table)))
                slot += 1
            else:
                descs = [(a, ln, f | (VIRTQ_DESC_F_NEXT if k + 1 < len(bufs) else 0), slot + k + 1 if k + 1 < len(bufs) else 0)
                         for k, (a, ln, f) in enumerate(bufs)]
                chains.append((descs, None))
                slot += len(descs)
        return chains, meta

    def _mutate(self, chains: list[tuple[list[Desc], tuple[int, list[Desc]] | None]], dev: Device, queue: Any) -> str:
        """Break the last chain one way; returns the mutation's name."""
        rng = self.rng
        descs, indirect = chains[-1]
        target = indirect[1] if indirect is not None and rng.random() < 0.7 else descs
        k = rng.randrange(len(target))
        addr, length, flags, nxt = target[k]
        first_slot = sum(len(c[0]) for c in chains[:-1])
        name = rng.choice(("next-loop", "next-oob", "addr", "len", "flags", "write-flip", "indirect-bad",
                           "head-oob", "avail-jump"))
        if name == "next-loop":
            target[k] = (addr, length, flags | VIRTQ_DESC_F_NEXT, first_slot if target is descs else 0)
        elif name == "next-oob":
            target[k] = (addr, length, flags | VIRTQ_DESC_F_NEXT, rng.choice((QSIZE, QSIZE + 1, 0xFFFF, len(target))))
        elif name == "addr":
            target[k] = (rng.choice((0, MEMORY - 1, MEMORY, MEMORY - length + 1, 2**63, U64_MAX, U64_MAX - 15,
                                     queue.desc_addr, queue.avail_addr, queue.used_addr)) & U64_MAX, length, flags, nxt)
        elif name == "len":
            target[k] = (addr, rng.choice((0, 1, 0xFFFFFFFF, 0x80000000, MEMORY, MEMORY + 1, DATA)), flags, nxt)
        elif name == "flags":
            target[k] = (addr, length, rng.getrandbits(16), nxt)
        elif name == "write-flip":
            target[k] = (addr, length, flags ^ VIRTQ_DESC_F_WRITE, nxt)
        elif name == "indirect-bad":
            table_addr = indirect[0] if indirect is not None else dev.data + DATA - 4096
            if indirect is None:
                dev.drv.memory.write(table_addr, rng.randbytes(4096))
            length = rng.choice((0, 8, 17, 16 * QSIZE * 2, 0xFFFFFFF0, 16 * (QSIZE + 1)))
            flags = VIRTQ_DESC_F_INDIRECT | rng.choice((0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE))
            descs[0] = (table_addr, length, flags, descs[0][3])
            if indirect is not None and rng.random() < 0.5:
                t = indirect[1]
                t[0] = (table_addr, 16 * len(t), VIRTQ_DESC_F_INDIRECT | t[0][2], t[0][3])  # nested
        return name

    # -- checks -----------------------------------------------------------------------------
    def _writable(self, mem: bytes, queue: Any, dev: Device) -> list[tuple[int, int]]:
        """Ranges a device may write: WRITE descriptors of the table and of indirect tables it names."""
        out = []
        base = queue.desc_addr
        tables = [(base, QSIZE)]
        seen = set()
        while tables:
            addr, count = tables.pop()
            if addr in seen or not 0 <= addr < MEMORY:
                continue
            seen.add(addr)
            for i in range(min(count, (MEMORY - addr) // 16)):
                d_addr, d_len, d_flags, _ = DESC.unpack_from(mem, addr + 16 * i)
                if d_flags & VIRTQ_DESC_F_INDIRECT:
                    tables.append((d_addr, min(d_len // 16, 4096)))
                if d_flags & VIRTQ_DESC_F_WRITE:
                    out.append((d_addr, d_addr + d_len))
        out.append((queue.used_addr, queue.used_addr + used_ring_size(QSIZE)))
        return out

    def _check_memory(self, dev: Device, queue: Any, before: bytes, after: bytes, kind: str, mutation: str) -> None:
        changed = [p for p in range(0, MEMORY, PAGE) if before[p : p + PAGE] != after[p : p + PAGE]]
        if not changed:
            return
        mask = bytearray(MEMORY)
        for start, end in self._writable(before, queue, dev) + self._writable(after, queue, dev):
            start, end = max(start, 0), min(end, MEMORY)
            if start < end:
                mask[start:end] = b"\xff" * (end - start)
        for p in changed:
            diff = int.from_bytes(before[p : p + PAGE], "little") ^ int.from_bytes(after[p : p + PAGE], "little")
            if diff & ~int.from_bytes(mask[p : p + PAGE], "little"):
                bad = next(i for i in range(p, p + PAGE) if before[i] != after[i] and not mask[i])
                self.problems.append({"kind": "wild-write", "detail": (
                    f"{kind} round (mutation {mutation or 'none'}): the device wrote guest byte {bad:#x} "
                    f"({before[bad]:#x} -> {after[bad]:#x}), outside every device-writable buffer")})
                return

    def _check_image(self, old: bytes, new: bytes, meta: list[tuple[int, list[int]]], before: bytes, after: bytes,
                     dev: Device, mutation: str) -> None:
        if old == new:
            return
        allowed = bytearray(len(old))
        for mem in (before, after):
            for header, bufs in meta:
                for start, end in _write_ranges(mem, header, bufs):
                    start, end = max(start, 0), min(end, len(old))
                    if start < end:
                        allowed[start:end] = b"\xff" * (end - start)
        for i in range(0, len(old), PAGE):
            if old[i : i + PAGE] != new[i : i + PAGE]:
                for j in range(i, i + PAGE):
                    if old[j] != new[j] and not allowed[j]:
                        self.problems.append({"kind": "image-write", "detail": (
                            f"blk round (mutation {mutation or 'none'}): image byte {j:#x} changed outside "
                            f"the ranges the round's write requests name")})
                        return


def _write_ranges(mem: bytes, header: int, bufs: list[int]) -> list[tuple[int, int]]:
    """Image ranges a request with its header at ``header`` may write (generous: any data it carries)."""
    if not 0 <= header <= len(mem) - 16:
        return []
    rtype, _, sector = struct.unpack_from("<IIQ", mem, header)
    if rtype == VIRTIO_BLK_T_OUT:
        return [(sector * SECTOR, sector * SECTOR + 16 * 8192)]
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        out = []
        for addr in bufs[1:]:
            if 0 <= addr <= len(mem) - 16:
                seg_sector, num, _ = struct.unpack_from("<QII", mem, addr)
                out.append((seg_sector * SECTOR, (seg_sector + num) * SECTOR))
        return out
    return []


def _read_image(path: str) -> bytes:
    with open(path, "rb") as image:
        return image.read()


def make(slot: Slot, index: int) -> ChainFuzzer:
    """The campaign's factory."""
    return ChainFuzzer(slot, index)
