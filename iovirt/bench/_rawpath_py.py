"""The bench port's raw data path, readable reference (the Cython twin is ``_rawpath_c.pyx``).

A bench port is the guest driver of a virtio-net device; these functions
are its per-frame work on the driver side of the split rings (virtio 1.2
2.7), done a batch at a time on a :class:`Window` over guest memory and the
bookkeeping of a :class:`~iovirt.virtio.driver.DriverQueue` (free
descriptors, in-flight chains, avail and last-used indexes):

* :func:`tx_post` writes frames with their header into transmit buffers,
  one descriptor each, and makes them available (not yet published);
* :func:`tx_reap` takes completed transmit chains back;
* :func:`rx_post` makes receive buffers available;
* :func:`publish` publishes the avail idx and says whether to notify;
* :func:`rx_harvest` takes used receive buffers and turns whole frames into
  :class:`RawFrame` objects (bytes; scapy dissection only on demand).

The device is not trusted (2.7.8): a used idx further ahead than the
chains in flight, a used id that is not an in-flight head, a used len
larger than the buffer or shorter than the header plus an Ethernet header
are reported as :class:`~iovirt.bench.errors.UsedRingError`.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Sequence

from iovirt.bench.errors import BenchError, UsedRingError
from iovirt.memory import Access, GuestMemory
from iovirt.virtio.defs import VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE, VIRTQ_USED_F_NO_NOTIFY, vring_need_event
from iovirt.virtio.net.defs import ETH_HLEN

IMPLEMENTATION = "python"

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
NUM_BUFFERS_OFFSET = 10
"""5.1.6: ``num_buffers`` is the le16 at byte 10 of the header (VERSION_1 or MRG_RXBUF forms)."""


def monotonic_ns() -> int:
    """The clock of ingress and egress timestamps (CLOCK_MONOTONIC, as the C twin reads it)."""
    return time.monotonic_ns()


class RawFrame:
    """One frame a device wrote to a bench port: bytes, dissected by scapy only when asked.

    ``hdr`` is the ``virtio_net_hdr`` the device wrote, ``data`` the
    Ethernet frame (without FCS), ``t_ns`` the egress timestamp
    (:func:`monotonic_ns` when the port took it from the used ring),
    ``buffer_lens`` the used len of every receive buffer it took.
    """

    __slots__ = ("hdr", "data", "t_ns", "buffer_lens", "_packet")

    def __init__(self, hdr: bytes, data: bytes, t_ns: int, buffer_lens: tuple[int, ...]) -> None:
        self.hdr = hdr
        self.data = data
        self.t_ns = t_ns
        self.buffer_lens = buffer_lens
        self._packet: Any = None

    @property
    def packet(self) -> Any:
        """``VirtioNetHdr* / Ether / ...`` (scapy), dissected on first use."""
        if self._packet is None:
            from iovirt.bench.layers import dissect  # scapy: off the raw path until asked for

            self._packet = dissect(self.hdr, self.data, self.t_ns)
        return self._packet

    def __bytes__(self) -> bytes:
        return self.data

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        return f"RawFrame({len(self.data)} bytes, t_ns={self.t_ns})"


class Window:
    """A writable view of guest memory ``[base, base+size)``, which must lie in one region."""

    def __init__(self, memory: GuestMemory, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self.view = memory.view(base, size, Access.WRITE)

    def _at(self, addr: int, length: int) -> int:
        off = addr - self.base
        if off < 0 or off + length > self.size:
            raise BenchError(f"guest range [{addr:#x}, +{length:#x}) is outside the bench's memory window")
        return off

    def read(self, addr: int, length: int) -> bytes:
        """Copy bytes out."""
        off = self._at(addr, length)
        return bytes(self.view[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        """Copy bytes in."""
        off = self._at(addr, len(data))
        self.view[off : off + len(data)] = data

    def read_u16(self, addr: int) -> int:
        """A le16."""
        return int(_U16.unpack_from(self.view, self._at(addr, 2))[0])

    def write_u16(self, addr: int, value: int) -> None:
        """A le16."""
        _U16.pack_into(self.view, self._at(addr, 2), value)

    def release(self) -> None:
        """Let go of the memory (before the region is closed)."""
        self.view.release()


def _post(win: Window, q: Any, desc: int, addr: int, length: int, flags: int) -> None:
    """One-descriptor chain ``desc`` into the next avail slot (2.7.13.1, 2.7.13.2)."""
    win.write(q.desc_addr + VIRTQ_DESC_SIZE * desc, _DESC.pack(addr, length, flags, 0))
    win.write_u16(q.avail_addr + 4 + 2 * (q.avail_idx % q.size), desc)
    q.avail_idx = (q.avail_idx + 1) & 0xFFFF


def publish(win: Window, q: Any) -> bool:
    """Publish the avail idx; return whether the device wants a notification (2.7.10, as ``DriverQueue.publish``)."""
    old, new = q._published_idx, q.avail_idx
    win.write_u16(q.avail_addr + 2, new)
    q._published_idx = new
    if q.event_idx:
        return vring_need_event(win.read_u16(q.used_addr + 4 + 8 * q.size), new, old)
    return not win.read_u16(q.used_addr) & VIRTQ_USED_F_NO_NOTIFY


def tx_post(
    win: Window, q: Any, frames: Sequence[bytes], start: int, hdr: bytes, tx_free: list[int],
    tx_by_head: dict[int, int], buf_size: int,
) -> int:
    """Make ``hdr + frames[i]`` available from ``i = start`` while descriptors and buffers last; returns how many."""
    count = 0
    for i in range(start, len(frames)):
        if not q._free or not tx_free:
            break
        frame = frames[i]
        length = len(hdr) + len(frame)
        if length > buf_size:
            raise BenchError(f"{len(frame)}-byte frame with header exceeds the {buf_size}-byte TX buffer")
        desc = q._free.pop()
        slot = tx_free.pop()
        win.write(slot, hdr)
        win.write(slot + len(hdr), bytes(frame))
        _post(win, q, desc, slot, length, 0)
        q._inflight[desc] = ([desc], [])
        tx_by_head[desc] = slot
        count += 1
    return count


def _pending(win: Window, q: Any) -> int:
    """How many new used entries there are, after checking the used idx is believable (2.7.8)."""
    in_flight = q.size - len(q._free)
    used_idx = win.read_u16(q.used_addr + 2)
    pending = (used_idx - q.last_used_idx) & 0xFFFF
    if pending > in_flight:
        raise UsedRingError(
            q.index,
            f"used idx {used_idx} is {pending} entries past the last one read ({q.last_used_idx}), "
            f"but only {in_flight} descriptors are in flight (2.7.8)",
        )
    return pending


def _next_used(win: Window, q: Any) -> tuple[int, int]:
    """The next used entry's ``(id, len)``."""
    head, length = _USED_ELEM.unpack(win.read(q.used_addr + 4 + 8 * (q.last_used_idx % q.size), 8))
    q.last_used_idx = (q.last_used_idx + 1) & 0xFFFF
    return head, length


def _not_in_flight(q: Any, head: int) -> UsedRingError:
    return UsedRingError(
        q.index, f"used id {head} is not an in-flight head (2.7.8: used id must be the head of an available chain)"
    )


def _used_event(win: Window, q: Any, taken: int) -> None:
    if taken and q.event_idx and q.interrupts:
        # As Linux's virtqueue_get_buf: ask for an interrupt at the next entry (2.7.10).
        win.write_u16(q.avail_addr + 4 + 2 * q.size, q.last_used_idx)


def tx_reap(win: Window, q: Any, tx_free: list[int], tx_by_head: dict[int, int]) -> int:
    """Take completed transmit chains, their buffers back to ``tx_free``; returns how many."""
    pending = _pending(win, q)
    for _ in range(pending):
        head, _length = _next_used(win, q)
        entry = q._inflight.pop(head, None)
        if entry is None:
            raise _not_in_flight(q, head)
        q._free.extend(reversed(entry[0]))
        tx_free.append(tx_by_head.pop(head))
    _used_event(win, q, pending)
    return pending


def rx_post(win: Window, q: Any, slots: Sequence[int], rx_by_head: dict[int, int], buf_size: int) -> None:
    """Make each receive buffer of ``slots`` available as a one-descriptor writable chain."""
    for slot in slots:
        desc = q._free.pop()
        _post(win, q, desc, slot, buf_size, VIRTQ_DESC_F_WRITE)
        q._inflight[desc] = ([desc], [(slot, buf_size)])
        rx_by_head[desc] = slot


def rx_harvest(
    win: Window, q: Any, rx_by_head: dict[int, int], buf_size: int, hdr_size: int, mergeable: bool,
    pending: list[tuple[int, bytes]], out: list[RawFrame],
) -> tuple[int, int]:
    """Take used receive buffers, post their chains again, append whole frames to ``out``.

    Buffers of a frame whose ``num_buffers`` (5.1.6.4) says more are coming
    wait in ``pending`` (with everything after them, to keep the order).
    Returns ``(buffers taken, buffers given back unwritten)``.
    """
    used: list[tuple[int, int, int]] = []
    seen = set()
    for _ in range(_pending(win, q)):
        head, length = _next_used(win, q)
        slot = rx_by_head.get(head)
        if slot is None or head in seen:
            raise _not_in_flight(q, head)
        seen.add(head)
        used.append((head, length, slot))
    _used_event(win, q, len(used))
    if not used:
        return 0, 0
    t_ns = monotonic_ns()
    for _head, length, slot in used:
        pending.append((length, win.read(slot, min(length, buf_size))))
    # Copied out: the same chains go back, each with its own buffer (rewritten, in case the device wrote it).
    for head, _length, slot in used:
        _post(win, q, head, slot, buf_size, VIRTQ_DESC_F_WRITE)
    for head, length, _slot in used:
        if length > buf_size:
            del pending[:]
            raise UsedRingError(q.index, f"used len {length} for head {head} exceeds its {buf_size}-byte buffer")
    empty = 0
    while pending:
        length, data = pending[0]
        if length == 0:
            # The device gave the buffer back unwritten: it dropped a frame
            # (iovirt does so for a non-mergeable buffer too small for it).
            del pending[0]
            empty += 1
            continue
        if length < hdr_size + ETH_HLEN:
            del pending[0]
            raise UsedRingError(
                q.index, f"used len {length} is shorter than the {hdr_size}-byte header plus an Ethernet header"
            )
        spans = int.from_bytes(data[NUM_BUFFERS_OFFSET : NUM_BUFFERS_OFFSET + 2], "little") if mergeable else 1
        if spans == 0:
            del pending[0]
            raise UsedRingError(q.index, "num_buffers is 0; with MRG_RXBUF it must be at least 1 (5.1.6.4)")
        if spans > len(pending):
            break  # the rest of the frame has not been written yet
        parts = pending[:spans]
        del pending[:spans]
        whole = b"".join(part for _n, part in parts)
        out.append(RawFrame(whole[:hdr_size], whole[hdr_size:], t_ns, tuple(n for n, _part in parts)))
    return len(used), empty
