"""A descriptor-chain fuzzer: a correct front-end writes random and mutated chains into guest memory.

Each worker drives one blk device and two net ports of the server (port a
transmits, port b receives what a sends to b's MAC), each on its own
:class:`~iovirt.vhost_user.frontend.VhostUserFrontend` brought up with
:mod:`iovirt.vhost_user.bringup`.  A round writes up to a few hundred chains
into a queue (one kick): plausible requests (blk IN/OUT/FLUSH/GET_ID/
DISCARD/WRITE_ZEROES at random sectors and sizes, frames, receive buffers;
direct or through an indirect table), the last one often mutated (next loops,
next or head out of the table, addresses and lengths at boundary values or on
the rings, flags flipped, nested or misaligned indirect tables, the avail idx
jumped).  It kicks and waits (on the call and err eventfds) until the device
consumed the round, signalled its err eventfd, or went quiet.

Then the checks of the round, against the state before the kick:

* guest memory is filled with a canary pattern; only bytes of device-writable
  buffers (any descriptor with VIRTQ_DESC_F_WRITE in the table or an indirect
  table, as written or as found afterwards) and the used ring may change;
* the blk image changes only in the ranges the round's write requests name
  (sector and length, or the DISCARD/WRITE_ZEROES segments), read from the
  chains as written or, when that does not explain a change, as the device
  walks them (a mutated ``next`` may hand a request another chain's buffers).

Both compare whole memory and the whole image, cheaply: every byte the
fuzzer writes goes to guest memory and to a shadow copy, so after a round
the shadow, with the allowed ranges copied in from guest memory, must equal
guest memory (one ``memcmp``); the image is compared with the previous
round's the same way.

A device that failed or went quiet is reset (VHOST_USER_RESET_DEVICE, which
stops its rings before the checks run) and its rings are set up again on the
same connection.
"""

from __future__ import annotations

import collections
import os
import random
import select
import struct
import time
from typing import Any, Iterable, cast

from fuzz_harness import Slot
from iovirt.memory import BumpAllocator
from iovirt.vhost_user import bringup
from iovirt.vhost_user.errors import BackendClosedError, ReplyTimeoutError
from iovirt.vhost_user.frontend import VhostUserFrontend
from iovirt.vhost_user.messages import Payload
from iovirt.vhost_user.protocol import Reply
from iovirt.vhost_user.requests import ReplyKind
from iovirt.virtio.blk.defs import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)
from iovirt.virtio.defs import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    VIRTIO_F_EVENT_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from iovirt.virtio.net.defs import NetHdr

MEMORY = 2 << 20
QSIZE = 1024
DATA = 3 << 19
RESERVE = 64 << 10  # the end of the data area: room for the last chain and a random "indirect table"
SECTOR = 512
LAST = 24
PAGE = 4096
SMALL_ROUND = 64  # chains: rounds of 1..64 (the size of the first fuzzer's rounds) ...
BIG_ROUND = 256  # ... or of 64..256 chains
SMALL_SHARE = 0.25
MUTATE = 0.5  # share of rounds whose last chain is mutated
QUIET = 0.5  # s without progress before a blk or transmit round counts as quiet
RX_QUIET = 0.002  # s: the switch delivers while port a transmits; then b's ring is only read
RX_BATCHES = 2  # batches of frames a receive round sends to fill its buffers: random sizes, then minimal
FRAME_SIZES: tuple[int, ...] = (60, 64, 200, 1000, 1514)
MIN_FRAME = 60
POLL = 0.01  # s: the longest wait on the eventfds before the used idx is read again
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
HEADER = struct.Struct("<IIQ")
SEGMENT = struct.Struct("<QII")
PATTERN = bytes((0xA5 ^ (i * 7)) & 0xFF for i in range(251)) * (DATA // 251 + 1)
U64_MAX = (1 << 64) - 1
DESC_BITS = VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE
ANY_TYPE = -1  # stands for a random request type in BLK_TYPES
BLK_TYPES = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) * 3 + (VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
                                                      VIRTIO_BLK_T_WRITE_ZEROES, ANY_TYPE)
SEGMENTED = (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES)
READS = (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID)  # requests whose data buffers the device writes
NET_HDR = NetHdr().pack()
POOL = 64 << 10  # random bytes per epoch, for frame payloads

Desc = tuple[int, int, int, int]  # addr, len, flags, next
Chain = tuple[list[Desc], tuple[int, list[Desc]] | None]  # ring descriptors, optional (table addr, table)
Meta = tuple[int, list[int]]  # header addr, buffer addrs


class PipelinedFrontend(VhostUserFrontend):
    """A front-end that, while :attr:`deferring`, sends requests at once and reads their REPLY_ACKs in :meth:`flush`.

    Setting a device up again is a dozen requests: one round trip for all
    of them instead of one each.  A request with a reply body flushes first.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deferring = False
        self._acks: list[int] = []

    def call(self, request: int, payload: Payload | bytes | None = None, fds: Any = (), *,
             need_reply: bool | None = None, timeout: float | None = None) -> Reply | None:
        """As :meth:`VhostUserFrontend.call`; while deferring, an ack is read later and ``None`` returned."""
        if need_reply is None:
            need_reply = self.reply_ack
        kind = self.conn.reply_due(request, need_reply)
        if not self.deferring or kind is ReplyKind.BODY:
            self.flush()
            return super().call(request, payload, fds, need_reply=need_reply, timeout=timeout)
        self.send(request, payload, fds, need_reply=need_reply)
        if kind is ReplyKind.ACK:
            self._acks.append(request)
        return None

    def flush(self) -> None:
        """Read (and check) the acks of the deferred requests."""
        while self._acks:
            request = self._acks.pop(0)
            self.conn.check_ack(request, self.recv_reply(request))


class Ring:
    """The driver side of one split ring (virtio 1.2 2.7): its layout and the avail idx."""

    def __init__(self, index: int, alloc: BumpAllocator) -> None:
        self.index = index
        self.desc = alloc.alloc(desc_table_size(QSIZE), DESC_ALIGN)
        self.avail = alloc.alloc(avail_ring_size(QSIZE), AVAIL_ALIGN)
        self.used = alloc.alloc(used_ring_size(QSIZE), USED_ALIGN)
        self.avail_idx = 0
        self.slots = 0  # descriptors of the table the last round wrote (the rest is zero)
        self.first = self.count = 0  # the avail ring entries of the last round: first idx, how many


class Device:
    """One connected device: its rings, the data area the rounds use, and a shadow of guest memory.

    Every write of the fuzzer goes through :meth:`put` (to guest memory and
    the shadow); :meth:`check` then finds any other change.
    """

    def __init__(self, path: str, queues: list[int]) -> None:
        self.frontend = cast(PipelinedFrontend, PipelinedFrontend.connect(path, timeout=2.0))
        try:
            region = self.frontend.add_region(0, MEMORY)
            self.view = region.view
            self.features = bringup.negotiate(self.frontend).features
            bringup.share_memory(self.frontend, [region])
            alloc = BumpAllocator(PAGE, MEMORY - PAGE)
            self.rings = {q: Ring(q, alloc) for q in queues}
            self.data = alloc.alloc(DATA, PAGE)
            self.shadow = bytearray(MEMORY)
            self.stale_end = self.data + DATA  # the data area still to fill with the pattern
            self.refill()
            self._start()
        except BaseException:
            self.frontend.close()
            raise
        self.event_idx = bool(self.features >> VIRTIO_F_EVENT_IDX & 1)
        self.stopped = False

    def _start(self) -> None:
        """Fresh rings (NUM, BASE, ADDR, CALL, KICK, ENABLE, ERR), then DRIVER_OK."""
        for ring in self.rings.values():
            self.put(ring.desc, bytes(desc_table_size(QSIZE)))
            self.put(ring.avail, bytes(avail_ring_size(QSIZE)))
            self.put(ring.used, bytes(used_ring_size(QSIZE)))
            ring.avail_idx = ring.slots = ring.first = ring.count = 0
            bringup.start_vring(self.frontend, ring.index, QSIZE, ring.desc, ring.avail, ring.used)
            self.frontend.set_vring_err(ring.index)
        bringup.driver_ok(self.frontend)

    def stop(self) -> None:
        """VHOST_USER_RESET_DEVICE: the back-end stops every ring before it answers."""
        if not self.stopped:
            self.frontend.reset_device()
            self.frontend.status = 0
            self.stopped = True

    def restart(self) -> None:
        """Set the device up again after :meth:`stop` (the memory table and protocol features stay)."""
        self.stop()
        self.frontend.deferring = True
        try:
            self.frontend.set_features(self.features)
            self._start()
        finally:
            self.frontend.deferring = False
        self.frontend.flush()
        self.stopped = False

    def close(self) -> None:
        """Disconnect (the guest memory goes with the front-end)."""
        self.frontend.close()

    # -- guest memory ------------------------------------------------------------------
    def put(self, addr: int, data: bytes) -> None:
        """Write guest memory and the shadow."""
        end = addr + len(data)
        self.shadow[addr:end] = data
        self.view[addr:end] = data

    def refill(self) -> None:
        """The canary pattern over the part of the data area the last round used or let the device write."""
        if self.stale_end > self.data:
            self.put(self.data, PATTERN[: self.stale_end - self.data])
        self.stale_end = self.data

    def clear_table(self, ring: Ring) -> None:
        """Zero the ring's descriptor table."""
        self.put(ring.desc, bytes(desc_table_size(QSIZE)))

    # -- the ring ----------------------------------------------------------------------------
    def publish(self, ring: Ring, heads: list[int], jump: int = 0) -> None:
        """Heads into the avail ring, ``used_event`` at the round's end, then the avail idx (2.7.13)."""
        idx = ring.first = ring.avail_idx
        ring.count = len(heads)
        for head in heads:
            self.put(ring.avail + 4 + 2 * (idx % QSIZE), U16.pack(head))
            idx = (idx + 1) & 0xFFFF
        ring.avail_idx = (idx + jump) & 0xFFFF
        if self.event_idx:
            # Notify when the used idx reaches the avail idx (2.7.7.2).
            self.put(ring.avail + 4 + 2 * QSIZE, U16.pack((ring.avail_idx - 1) & 0xFFFF))
        self.put(ring.avail + 2, U16.pack(ring.avail_idx))

    def used_idx(self, ring: Ring) -> int:
        """The device's used idx."""
        return U16.unpack_from(self.view, ring.used + 2)[0]

    def wait(self, ring: Ring, quiet: float) -> str:
        """``done`` (used idx = avail idx), ``refused`` (the err eventfd fired) or ``quiet`` (no progress)."""
        call, err = self.frontend.call_fds[ring.index], self.frontend.err_fds[ring.index]
        last = self.used_idx(ring)
        deadline = time.monotonic() + quiet
        while True:
            used = self.used_idx(ring)
            if used == ring.avail_idx:
                return "refused" if select.select([err], [], [], 0)[0] else "done"
            if used != last:
                last, deadline = used, time.monotonic() + quiet
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return "quiet"
            ready = select.select([call, err], [], [], min(timeout, POLL))[0]
            if err in ready:
                return "refused"
            if call in ready:
                os.eventfd_read(call)

    # -- the checks --------------------------------------------------------------------------
    def check(self, rings: list[Ring], what: str, problems: list[dict[str, str]]) -> bool:
        """Guest memory changed only in device-writable buffers and used rings; True if other rings were hit.

        The shadow is guest memory as the fuzzer wrote it; afterwards it is
        guest memory again.
        """
        shadow, view = self.shadow, self.view
        # Beyond the descriptors the round wrote, the shadow's tables are zero: nothing to follow there.
        ranges, tables = _writable(shadow, [(ring.desc, ring.slots) for ring in rings])
        tables += [(ring.desc, QSIZE) for ring in rings]
        if any(shadow[a : a + 16 * n] != view[a : a + 16 * n] for a, n in tables):
            # A buffer overlaps a table: the device may follow either.
            ranges += _writable(view, [(ring.desc, QSIZE) for ring in rings])[0]
        ranges += [(ring.used, ring.used + used_ring_size(QSIZE)) for ring in rings]
        merged = _merge(ranges)
        for start, end in merged:
            shadow[start:end] = view[start:end]
        self.stale_end = max([self.stale_end] + [min(e, self.data + DATA) for s, e in merged if e > self.data])
        if shadow != view:
            bad = _first_difference(shadow, view)
            problems.append({"kind": "wild-write", "detail": (
                f"{what}: the device wrote guest byte {bad:#x} ({shadow[bad]:#x} -> {view[bad]:#x}), "
                f"outside every device-writable buffer")})
            shadow[:] = view
            self.stale_end = self.data + DATA
            return True
        used = {(ring.used, ring.used + used_ring_size(QSIZE)) for ring in rings}
        # A writable buffer over another ring's memory: that ring is garbage now; start afresh.
        return any(s < self.data and (s, e) not in used for s, e in merged)


class ChainFuzzer:
    """One worker: blk rounds, net transmit rounds and net receive rounds."""

    def __init__(self, slot: Slot, index: int) -> None:
        self.net_a, self.net_b = slot.net[0], slot.net[1]
        self.blk_path, self.image = slot.blk[0]
        self.mac_b = bytes([0x02, 0xF0, 0, 0, index >> 8 & 0xFF, index & 0xFF])
        # Port a's source MACs, one per frame of a batch: the worker's own (shared ones would move between ports).
        self.macs_a = [bytes([0x02, 0xF1, index >> 8 & 0xFF, index & 0xFF, i >> 8, i & 0xFF]) for i in range(QSIZE)]
        self.devices: dict[str, Device | None] = {"blk": None, "a": None, "b": None}
        self.image_bytes = b""
        self.rng = random.Random(0)
        self.pool = b""
        self.counters: collections.Counter[str] = collections.Counter()
        self.last: collections.deque[str] = collections.deque(maxlen=LAST)
        self.problems: list[dict[str, str]] = []

    # -- campaign entry points ---------------------------------------------------------
    def run(self, seed: int, count: int) -> dict[str, Any]:
        """Post ``count`` chains from ``seed``; every device is disconnected at the end."""
        self.rng = random.Random(seed)
        self.pool = self.rng.randbytes(POOL)
        self.counters = collections.Counter()
        self.problems = []
        self.last.clear()
        chains = 0
        try:
            while chains < count and self.counters["connect_failed"] < 5 and len(self.problems) < 5:
                kind = self.rng.choice(("blk", "blk", "tx", "tx", "rx"))
                try:
                    chains += self._round(kind, count - chains)
                except (OSError, EOFError, TimeoutError, BackendClosedError, ReplyTimeoutError) as exc:
                    # The server closed or refused a connection (it may be restarting).
                    self.counters["connect_failed"] += 1
                    self.last.append(f"{kind}: {type(exc).__name__}: {exc}")
                    self._drop_all()
                    time.sleep(0.05)
        finally:
            self._drop_all()
        return {"units": chains, "counters": dict(self.counters), "last": list(self.last), "problems": self.problems}

    def close(self) -> None:
        """Disconnect every device."""
        self._drop_all()

    def _drop_all(self) -> None:
        for key in self.devices:
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
            if key == "blk":
                self.image_bytes = _read_image(self.image)
        return dev

    # -- one round -------------------------------------------------------------------------
    def _round(self, kind: str, most: int) -> int:
        rng = self.rng
        key, qi = {"blk": ("blk", 0), "tx": ("a", 1), "rx": ("b", 0)}[kind]
        dev = self._device(key)
        if kind == "rx":
            dev.frontend.deferring = True  # its ack is read after the round
            dev.frontend.send_rarp(self.mac_b)  # b's MAC is at port b (a reset port forgets it)
            dev.frontend.deferring = False
        ring = dev.rings[qi]
        dev.refill()
        dev.clear_table(ring)
        n = rng.randrange(1, SMALL_ROUND + 1) if rng.random() < SMALL_SHARE else rng.randrange(SMALL_ROUND, BIG_ROUND + 1)
        chains, meta = self._chains(kind, dev, min(n, most))
        n = len(chains)
        mutation = self._mutate(chains, dev, ring) if rng.random() < MUTATE else ""
        # A mutated address moves a header: the device reads it where the first descriptor points.
        meta += [(first, bufs) for (descs, indirect), (header, bufs) in zip(chains, meta)
                 if (first := indirect[1][0][0] if indirect is not None else descs[0][0]) != header]
        pack = DESC.pack
        heads = []
        table: list[bytes] = []
        for descs, indirect in chains:
            if indirect is not None:
                dev.put(indirect[0], b"".join([pack(*d) for d in indirect[1]]))
            heads.append(len(table))
            table += [pack(*d) for d in descs]
        dev.put(ring.desc, b"".join(table))
        ring.slots = len(table)
        if mutation == "head-oob":
            heads[-1] = rng.choice((QSIZE, QSIZE + 1, 0xFFFF))
        jump = rng.choice((QSIZE + 1, 0x8000, 0xFFFF)) if mutation == "avail-jump" else 0
        dev.publish(ring, heads, jump)
        self.counters["mutated"] += bool(mutation)
        self.last.append(f"{kind} round: {n} chains, heads {heads[:4]}..{heads[-1]}, "
                         f"last {chains[-1]}, mutation={mutation or 'none'}")
        dev.frontend.kick(qi)
        outcome = self._receive(dev, ring, n) if kind == "rx" else dev.wait(ring, QUIET)
        dev.frontend.flush()
        self.counters[f"{kind}_{outcome}"] += 1
        if outcome != "done":
            dev.stop()  # nothing runs while the round is checked
        what = f"{kind} round (mutation {mutation or 'none'})"
        if kind == "blk":
            self._check_image(meta, dev, what)
        if dev.check([ring], what, self.problems) or outcome != "done":
            dev.restart()
            self.counters["resets"] += 1
        return n

    def _receive(self, b: Device, ring: Ring, n: int) -> str:
        """Frames from port a to b's MAC until b's round is used up (or a few batches went in vain)."""
        frames, sizes = n, FRAME_SIZES
        for _ in range(RX_BATCHES):
            self._send_frames(frames, sizes)
            outcome = b.wait(ring, RX_QUIET)
            if outcome != "quiet":
                return outcome
            # Buffers left over: smaller than the frame at the head of b's backlog, which blocks.
            # (At most n: a used idx the device overwrote through a buffer on its ring says anything.)
            frames, sizes = min(max((ring.avail_idx - b.used_idx(ring)) & 0xFFFF, 1), n), (MIN_FRAME,)
        return "quiet"

    def _send_frames(self, n: int, sizes: tuple[int, ...]) -> None:
        """``n`` valid frames of ``sizes`` from port a to b's MAC (a receive round's traffic)."""
        a = self._device("a")
        ring = a.rings[1]
        a.refill()
        a.clear_table(ring)
        rng = self.rng
        table = []
        for i in range(n):
            size = rng.choice(sizes)
            frame = self.mac_b + self.macs_a[i] + b"\x88\xb5" + self._random_bytes(size - 14)
            addr = a.data + i * 2048
            a.put(addr, NET_HDR + frame)
            table.append(DESC.pack(addr, 12 + len(frame), 0, 0))
        a.put(ring.desc, b"".join(table))
        ring.slots = n
        a.stale_end = a.data + n * 2048
        a.publish(ring, list(range(n)))
        a.frontend.kick(1)
        self.counters["rx_frames"] += n
        outcome = a.wait(ring, QUIET)
        if outcome != "done":
            a.stop()
        if a.check([ring], "frames for a receive round", self.problems) or outcome != "done":
            self.counters[f"frames_{outcome}"] += 1
            a.restart()

    # -- chains ------------------------------------------------------------------------------
    def _random_bytes(self, n: int) -> bytes:
        """``n`` random bytes: a slice of the epoch's pool at a random offset (cheaper than ``randbytes``)."""
        start = self.rng.randrange(POOL - n)
        return self.pool[start : start + n]

    def _chains(self, kind: str, dev: Device, n: int) -> tuple[list[Chain], list[Meta]]:
        """``n`` plausible chains (ring descriptors, optional indirect table) and per chain (header addr, buffer addrs)."""
        rng = self.rng
        cur = dev.data
        end = dev.data + DATA - RESERVE
        chains: list[Chain] = []
        meta: list[Meta] = []
        slot = 0
        while len(chains) < n and cur < end and slot + 6 <= QSIZE:
            bufs: list[tuple[int, int, int]] = []  # addr, len, flags
            header = cur
            if kind == "blk":
                rtype = rng.choice(BLK_TYPES)
                if rtype < 0:
                    rtype = rng.randrange(256)
                sector = rng.randrange(520) if rng.random() < 0.95 else rng.choice((2**63, U64_MAX, 2**55))
                dev.put(cur, HEADER.pack(rtype, 0, sector))
                bufs.append((cur, 16, 0))
                cur += 16
                for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
                    size = rng.choice((512, 1024, 4096, 512, 1, 511, 0, 8192))
                    if rtype in SEGMENTED:
                        dev.put(cur, SEGMENT.pack(rng.randrange(520), rng.choice((1, 8, 16, 0, 0xFFFFFFFF)), 0))
                        size = 16
                    bufs.append((cur, size, VIRTQ_DESC_F_WRITE if rtype in READS else 0))
                    cur += max(size, 1)
                bufs.append((cur, 1, VIRTQ_DESC_F_WRITE))
                cur += 16
            elif kind == "tx":
                size = rng.choice((60, 64, 100, 1514, 9000, 14, 13))
                dst = rng.choice((b"\xff" * 6, rng.randbytes(6), bytes([2, 0xF2, 0, 0, 0, 1])))
                src = bytes([2, 0xF3]) + rng.randbytes(4)  # never b's MAC
                hdr = NET_HDR if rng.random() < 0.9 else rng.randbytes(12)
                dev.put(cur, hdr + dst + src + self._random_bytes(max(size - 12, 0)))
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
            last = len(bufs) - 1
            if rng.random() < 0.2:
                table_addr = cur
                table = [(a, ln, f | (VIRTQ_DESC_F_NEXT if k < last else 0), k + 1 if k < last else 0)
                         for k, (a, ln, f) in enumerate(bufs)]
                cur += 16 * len(table)
                chains.append(([(table_addr, 16 * len(table), VIRTQ_DESC_F_INDIRECT, 0)], (table_addr, table)))
                slot += 1
            else:
                descs = [(a, ln, f | (VIRTQ_DESC_F_NEXT if k < last else 0), slot + k + 1 if k < last else 0)
                         for k, (a, ln, f) in enumerate(bufs)]
                chains.append((descs, None))
                slot += len(descs)
        dev.stale_end = max(dev.stale_end, cur)
        return chains, meta

    def _mutate(self, chains: list[Chain], dev: Device, ring: Ring) -> str:
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
                                     ring.desc, ring.avail, ring.used)) & U64_MAX, length, flags, nxt)
        elif name == "len":
            target[k] = (addr, rng.choice((0, 1, 0xFFFFFFFF, 0x80000000, MEMORY, MEMORY + 1, DATA)), flags, nxt)
        elif name == "flags":
            target[k] = (addr, length, rng.getrandbits(16), nxt)
        elif name == "write-flip":
            target[k] = (addr, length, flags ^ VIRTQ_DESC_F_WRITE, nxt)
        elif name == "indirect-bad":
            table_addr = indirect[0] if indirect is not None else dev.data + DATA - PAGE
            if indirect is None:
                dev.put(table_addr, rng.randbytes(PAGE))
                dev.stale_end = dev.data + DATA
            length = rng.choice((0, 8, 17, 16 * QSIZE * 2, 0xFFFFFFF0, 16 * (QSIZE + 1)))
            flags = VIRTQ_DESC_F_INDIRECT | rng.choice((0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE))
            descs[0] = (table_addr, length, flags, descs[0][3])
            if indirect is not None and rng.random() < 0.5:
                t = indirect[1]
                t[0] = (table_addr, 16 * len(t), VIRTQ_DESC_F_INDIRECT | t[0][2], t[0][3])  # nested
        return name

    # -- checks -----------------------------------------------------------------------------
    def _check_image(self, meta: list[Meta], dev: Device, what: str) -> None:
        """The image changed only in the ranges the round's write requests name (headers before or after)."""
        old, new = self.image_bytes, _read_image(self.image)
        self.image_bytes = new
        if old == new:
            return
        ranges = {r for mem in (dev.shadow, dev.view) for header, bufs in meta for r in _write_ranges(mem, header, bufs)}
        if _image_outside(old, new, ranges) is not None:
            # A mutated chain reads its header or segments elsewhere (e.g. its next names another chain's
            # buffers): walk every chain of the round as the device does, in memory before and after.
            ring = dev.rings[0]
            ranges |= {r for mem in (dev.shadow, dev.view) for r in _device_write_ranges(mem, ring)}
        bad = _image_outside(old, new, ranges)
        if bad is not None:
            self.problems.append({"kind": "image-write", "detail": (
                f"{what}: image byte {bad:#x} changed outside the ranges the round's write requests name")})


def _writable(mem: bytearray | memoryview, roots: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Ranges a device may write (WRITE descriptors of the tables and the indirect tables they name), and the tables."""
    out: list[tuple[int, int]] = []
    tables: list[tuple[int, int]] = []
    seen = set()
    stack = list(roots)
    while stack:
        addr, count = stack.pop()
        if addr in seen or not 0 <= addr < MEMORY:
            continue
        seen.add(addr)
        count = min(count, (MEMORY - addr) // 16)
        tables.append((addr, count))
        for d_addr, d_len, d_flags, _ in DESC.iter_unpack(mem[addr : addr + 16 * count]):
            if d_flags & DESC_BITS:
                if d_flags & VIRTQ_DESC_F_INDIRECT:
                    stack.append((d_addr, min(d_len // 16, 4096)))
                if d_flags & VIRTQ_DESC_F_WRITE:
                    out.append((d_addr, d_addr + d_len))
    return out, tables


def _merge(ranges: Iterable[tuple[int, int]], limit: int = MEMORY) -> list[tuple[int, int]]:
    """The union of ``ranges`` within ``[0, limit)``, sorted."""
    out: list[tuple[int, int]] = []
    last = -1
    for start, end in sorted(ranges):
        if end > limit:
            end = limit
        if start < 0:
            start = 0
        if start >= end:
            continue
        if start <= last:
            if end > last:
                out[-1] = (out[-1][0], end)
                last = end
        else:
            out.append((start, end))
            last = end
    return out


def _first_difference(a: bytearray, b: bytes | memoryview) -> int:
    """The first offset where ``a`` and ``b`` (equal lengths) differ."""
    lo, hi = 0, len(a)
    while hi - lo > PAGE:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])


def _image_outside(old: bytes, new: bytes, ranges: Iterable[tuple[int, int]]) -> int | None:
    """The first image offset that changed outside ``ranges``, or ``None``."""
    expected = bytearray(old)
    source = memoryview(new)
    for start, end in _merge(ranges, len(old)):
        expected[start:end] = source[start:end]
    return None if expected == new else _first_difference(expected, new)


def _chain(mem: bytearray | memoryview, ring: Ring, head: int) -> list[tuple[int, int, int]]:
    """(addr, len, flags) of the chain at ``head`` as a device follows it (next, one indirect table: 2.7.5)."""
    if not 0 <= head < QSIZE:
        return []
    base, size, i = ring.desc, QSIZE, head
    addr, length, flags, _ = DESC.unpack_from(mem, base + 16 * i)
    if flags & VIRTQ_DESC_F_INDIRECT:
        if not 0 <= addr <= MEMORY - 16:
            return []
        base, size, i = addr, min(length // 16, (MEMORY - addr) // 16), 0
    out = []
    for _ in range(size):  # a loop ends here
        if i >= size:
            break
        addr, length, flags, i = DESC.unpack_from(mem, base + 16 * i)
        out.append((addr, length, flags))
        if not flags & VIRTQ_DESC_F_NEXT:
            break
    return out


def _gather(mem: bytearray | memoryview, bufs: list[tuple[int, int]], size: int) -> bytes:
    """Up to ``size`` bytes of ``bufs`` in order (stops at a buffer outside memory: the device fails there)."""
    out = bytearray()
    for addr, length in bufs:
        take = min(length, size - len(out))
        if take <= 0 or not 0 <= addr <= len(mem) - take:
            break
        out += mem[addr : addr + take]
    return bytes(out)


def _device_write_ranges(mem: bytearray | memoryview, ring: Ring) -> list[tuple[int, int]]:
    """Image ranges the round's chains may write, read as the device reads them (header: the first 16 readable bytes)."""
    out = []
    for k in range(ring.count):
        head = U16.unpack_from(mem, ring.avail + 4 + 2 * ((ring.first + k) % QSIZE))[0]
        readable = [(addr, length) for addr, length, flags in _chain(mem, ring, head) if not flags & VIRTQ_DESC_F_WRITE]
        header = _gather(mem, readable, 16)
        if len(header) < 16:
            continue
        rtype, _, sector = HEADER.unpack(header)
        data_len = sum(length for _, length in readable) - 16
        if rtype == VIRTIO_BLK_T_OUT:
            out.append((sector * SECTOR, sector * SECTOR + data_len))
        elif rtype in SEGMENTED:
            data = _gather(mem, readable, 16 + min(data_len, MEMORY))[16:]
            for off in range(0, len(data) - 15, 16):
                seg_sector, num, _ = SEGMENT.unpack_from(data, off)
                out.append((seg_sector * SECTOR, (seg_sector + num) * SECTOR))
    return out


def _write_ranges(mem: bytearray | memoryview, header: int, bufs: list[int]) -> list[tuple[int, int]]:
    """Image ranges a request with its header at ``header`` may write (generous: any data it carries)."""
    if not 0 <= header <= len(mem) - 16:
        return []
    rtype, _, sector = HEADER.unpack_from(mem, header)
    if rtype == VIRTIO_BLK_T_OUT:
        return [(sector * SECTOR, sector * SECTOR + 16 * 8192)]
    if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        out = []
        for addr in bufs[1:]:
            if 0 <= addr <= len(mem) - 16:
                seg_sector, num, _ = SEGMENT.unpack_from(mem, addr)
                out.append((seg_sector * SECTOR, (seg_sector + num) * SECTOR))
        return out
    return []


def _read_image(path: str) -> bytes:
    with open(path, "rb") as image:
        return image.read()


def make(slot: Slot, index: int) -> ChainFuzzer:
    """The campaign's factory."""
    return ChainFuzzer(slot, index)
