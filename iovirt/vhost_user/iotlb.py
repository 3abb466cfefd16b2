"""The device IOTLB of a vhost-user back-end (vhost-user.rst "IOMMU support").

With ``VIRTIO_F_ACCESS_PLATFORM`` (``VIRTIO_F_IOMMU_PLATFORM``) negotiated,
every ring and buffer address is an IOVA ("Memory access": guest addresses
are translated to user addresses via the IOTLB).  The front-end fills the
IOTLB with ``VHOST_USER_IOTLB_MSG`` UPDATE (iova, size, user address,
permissions) and empties it with INVALIDATE; the back-end asks for what it
lacks with a MISS on the back-end channel (``VHOST_USER_BACKEND_IOTLB_MSG``)
and reports a denied access with ACCESS_FAIL.

:class:`DeviceIotlb` is a :class:`~iovirt.memory.Translator`: a device
reaches guest memory through ``memory.with_translator(iotlb)`` and never
knows.  A translation it lacks sends a MISS (once per page while it is
outstanding) and raises :class:`~iovirt.memory.TranslationPending`: the ring
code leaves the chain available, and the owner re-kicks its queues when the
UPDATE arrives (``on_resolved``).

Entries are kept as sorted, non-overlapping IOVA ranges: an UPDATE replaces
whatever it overlaps, an INVALIDATE may cut an entry in pieces.  As Linux's
vhost (``max_iotlb_entries``), the table is bounded and the oldest entry is
retired to make room, except entries the owner pins (rings in use).

A buffer translation is trusted only while the request that asked for it is
in flight (:meth:`DeviceIotlb.forget_unpinned`, called through
:class:`CompletionFence` after every completion): a driver unmaps a buffer
once the device has used it, and may then reuse its IOVA for another page
without the back-end ever hearing of it.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from iovirt.errors import IovirtError
from iovirt.memory import Access, TranslationFault, TranslationPending
from iovirt.vhost_user.memtable import GuestMemoryTable, MemoryTableError
from iovirt.vhost_user.messages import IotlbMsg, IotlbPerm, IotlbType
from iovirt.virtio.queue import QueueWrapper

log = logging.getLogger("iovirt.vhost_user")

PAGE_SIZE = 4096
"""Granularity of outstanding misses (the guest IOMMU's smallest page)."""

MAX_ENTRIES = 2048
"""Entries kept before the oldest is retired (Linux vhost's default ``max_iotlb_entries``)."""

MAX_MISSES_PER_ACCESS = 16
"""Pages asked for at once for one access; a longer buffer asks again after the answer."""

_U64_END = 1 << 64

SendIotlbMsg = Callable[[IotlbMsg], bool]
"""Sends a back-end IOTLB message; False when it could not be sent."""


class IotlbError(IovirtError):
    """An UPDATE or INVALIDATE the IOTLB refuses; ``iova``, ``size`` and ``reason`` say why."""

    def __init__(self, kind: str, iova: int, size: int, reason: str) -> None:
        super().__init__(f"IOTLB {kind} [{iova:#x}, +{size:#x}): {reason}")
        self.iova = iova
        self.size = size
        self.reason = reason


@dataclass(frozen=True)
class IotlbEntry:
    """One mapping: IOVAs ``[iova, end)`` to front-end user addresses from ``uaddr``."""

    iova: int
    end: int
    uaddr: int
    perm: int

    def piece(self, start: int, end: int) -> "IotlbEntry":
        """The part of this entry covering ``[start, end)``."""
        return IotlbEntry(start, end, self.uaddr + (start - self.iova), self.perm)


class DeviceIotlb:
    """IOVA → user address → guest-physical translation for one front-end connection.

    ``table`` is the front-end's memory table (it maps user addresses to
    guest-physical ones); ``send`` puts an IOTLB message on the
    back-end channel (``None``: there is none, a miss is a fault).
    """

    def __init__(self, table: GuestMemoryTable, send: SendIotlbMsg | None, label: str = "",
                 max_entries: int = MAX_ENTRIES) -> None:
        self.table = table
        self.send = send
        self.label = label
        self.max_entries = max_entries
        self.on_resolved: Callable[[], None] | None = None
        """Called after an UPDATE that answered an outstanding miss."""
        self.pinned: Callable[[], Iterable[tuple[int, int]]] = tuple
        """IOVA ranges ``(start, end)`` whose entries must not be retired or forgotten (running rings)."""
        self._starts: list[int] = []
        self._entries: dict[int, IotlbEntry] = {}  # by iova, oldest first
        self._outstanding: dict[int, int] = {}  # page -> perm asked for
        self.stats = {"translations": 0, "misses_sent": 0, "access_fails": 0, "updates": 0, "invalidates": 0, "retired": 0}

    # -- the table ------------------------------------------------------------------
    @property
    def entries(self) -> list[IotlbEntry]:
        """The entries, sorted by IOVA."""
        return [self._entries[s] for s in self._starts]

    @property
    def outstanding(self) -> dict[int, int]:
        """Pages with a MISS sent and no answer yet, and the permissions asked for."""
        return dict(self._outstanding)

    def update(self, iova: int, size: int, uaddr: int, perm: int) -> bool:
        """Apply an UPDATE; returns whether it answered an outstanding miss.

        Raises :class:`IotlbError` for a zero size, a range wrapping 2^64,
        no permission, or user addresses outside the memory table (the spec:
        "Addresses and size must be within vhost memory regions").
        """
        _check_range("UPDATE", iova, size)
        if uaddr + size > _U64_END:
            raise IotlbError("UPDATE", iova, size, f"user address {uaddr:#x} + size wraps 2^64")
        if perm not in (IotlbPerm.VHOST_ACCESS_RO, IotlbPerm.VHOST_ACCESS_WO, IotlbPerm.VHOST_ACCESS_RW):
            raise IotlbError("UPDATE", iova, size, f"permissions {perm} grant no access (expected RO, WO or RW)")
        try:
            self.table.user_pieces(uaddr, size)
        except MemoryTableError as exc:
            raise IotlbError("UPDATE", iova, size, str(exc)) from None
        self._remove(iova, iova + size)
        self._insert(IotlbEntry(iova, iova + size, uaddr, int(perm)))
        self.stats["updates"] += 1
        answered = [p for p in self._outstanding if iova <= p * PAGE_SIZE + PAGE_SIZE - 1 and p * PAGE_SIZE < iova + size]
        for page in answered:
            del self._outstanding[page]
        self._retire()
        if answered and self.on_resolved is not None:
            self.on_resolved()
        return bool(answered)

    def invalidate(self, iova: int, size: int) -> bool:
        """Apply an INVALIDATE: no IOVA of ``[iova, iova+size)`` translates afterwards.

        A size of 0, or a range past 2^64, invalidates up to the end of the
        address space, as Linux's vhost does (``vhost_iotlb_del_range(iova,
        iova + size - 1)`` wraps).  QEMU sends exactly that for a whole
        device-TLB flush: its ``addr_mask + 1`` overflows to 0, and a guest in
        the default lazy mode flushes that way.  Invalidating too much is
        always safe; too little would leave stale translations.
        Returns whether any entry was touched.
        """
        end = iova + size if size and iova + size <= _U64_END else _U64_END
        self.stats["invalidates"] += 1
        return self._remove(iova, end)

    def clear(self) -> None:
        """Drop every entry and forget outstanding misses."""
        self._starts.clear()
        self._entries.clear()
        self._outstanding.clear()

    def _find(self, addr: int) -> IotlbEntry | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            entry = self._entries[self._starts[i]]
            if addr < entry.end:
                return entry
        return None

    def _next_start(self, addr: int) -> int:
        i = bisect.bisect_right(self._starts, addr)
        return self._starts[i] if i < len(self._starts) else _U64_END

    def _insert(self, entry: IotlbEntry) -> None:
        bisect.insort(self._starts, entry.iova)
        self._entries[entry.iova] = entry

    def _remove(self, lo: int, hi: int) -> bool:
        """Remove ``[lo, hi)`` from every entry, keeping the parts outside it."""
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        hit = [self._entries[s] for s in self._starts[i:] if s < hi and self._entries[s].end > lo]
        for entry in hit:
            self._starts.remove(entry.iova)
            del self._entries[entry.iova]
            if entry.iova < lo:
                self._insert(entry.piece(entry.iova, lo))
            if entry.end > hi:
                self._insert(entry.piece(hi, entry.end))
        return bool(hit)

    def forget_unpinned(self) -> None:
        """Drop every entry that no running ring part overlaps: the buffer translations.

        Called after the device completed requests (:class:`CompletionFence`).
        Once the driver sees a request used it may unmap its buffers and map
        their IOVAs to other pages, and a front-end need not say so: QEMU
        7.2's vIOMMU (caching mode, device-iotlb=on) forwards no invalidation
        for many of a Linux guest's unmaps.  A translation asked for by a
        request still in flight stays good (the driver may not unmap a buffer
        the device holds), so only a completion forgets.  An entry kept past
        one would serve the next request that reuses the IOVA with the old
        page: a header, an indirect table or data read from, or written to,
        memory that now holds something else.  Ring parts stay: a driver
        does not move a running ring.
        """
        pinned = list(self.pinned())
        keep = {start: entry for start, entry in self._entries.items()
                if any(entry.iova < end and lo < entry.end for lo, end in pinned)}
        if len(keep) != len(self._entries):
            self._entries = keep  # still oldest first
            self._starts = sorted(keep)

    def _retire(self) -> None:
        if len(self._entries) <= self.max_entries:
            return
        pinned = list(self.pinned())
        for start in list(self._entries):
            if len(self._entries) <= self.max_entries:
                return
            entry = self._entries[start]
            if any(entry.iova < end and lo < entry.end for lo, end in pinned):
                continue
            self._starts.remove(start)
            del self._entries[start]
            self.stats["retired"] += 1

    # -- translation (the Translator protocol) -------------------------------------------
    def translate(self, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        """Guest-physical pieces of IOVAs ``[addr, addr+length)`` for ``access``.

        Raises :class:`TranslationPending` after asking for missing pages,
        :class:`TranslationFault` when an entry denies ``access`` (after
        sending ACCESS_FAIL) or when no miss can be asked for.
        """
        pieces: list[tuple[int, int]] = []
        missing: list[int] = []
        pos, end = addr, addr + length
        while pos < end:
            entry = self._find(pos)
            if entry is None:
                page = pos // PAGE_SIZE
                missing.append(page)
                if len(missing) >= MAX_MISSES_PER_ACCESS:
                    break
                pos = min((page + 1) * PAGE_SIZE, self._next_start(pos), end)
                continue
            if access & ~entry.perm:
                self._access_fail(pos, access, entry)
            n = min(entry.end, end) - pos
            if not missing:
                try:
                    pieces += self.table.user_pieces(entry.uaddr + (pos - entry.iova), n)
                except MemoryTableError as exc:
                    # The memory table changed under the entry since its UPDATE.
                    raise TranslationFault(addr, length, access, str(exc)) from None
            pos += n
        if missing:
            self._miss(addr, length, access, missing)
        self.stats["translations"] += 1
        return pieces

    def _miss(self, addr: int, length: int, access: Access, pages: list[int]) -> None:
        if self.send is None:
            raise TranslationFault(addr, length, access, "no IOTLB entry, and no back-end channel to ask for one")
        perm = int(access) & IotlbPerm.VHOST_ACCESS_RW
        for page in pages:
            asked = self._outstanding.get(page, 0)
            if asked & perm == perm:
                continue  # already asked; wait for the answer
            want = asked | perm
            iova = max(addr, page * PAGE_SIZE)
            if self.send(IotlbMsg(iova, 0, 0, IotlbPerm(want), IotlbType.VHOST_IOTLB_MISS)):
                self._outstanding[page] = want
                self.stats["misses_sent"] += 1
        raise TranslationPending(addr, length, access)

    def _access_fail(self, iova: int, access: Access, entry: IotlbEntry) -> None:
        perm = int(access) & IotlbPerm.VHOST_ACCESS_RW
        self.stats["access_fails"] += 1
        log.warning("%s: IOTLB denies %s at IOVA %#x (entry [%#x, %#x) allows %s)",
                    self.label, access.name, iova, entry.iova, entry.end, IotlbPerm(entry.perm).name)
        if self.send is not None:
            self.send(IotlbMsg(iova, 0, 0, IotlbPerm(perm), IotlbType.VHOST_IOTLB_ACCESS_FAIL))
        raise TranslationFault(iova, 1, access, f"IOTLB entry allows {IotlbPerm(entry.perm).name} only")


class CompletionFence(QueueWrapper):
    """A device queue after whose completions the IOTLB forgets its buffer translations.

    Installed by the back-end around every queue of a device behind an IOMMU
    (see :meth:`DeviceIotlb.forget_unpinned`): the device pops and pushes
    through it and cannot tell.  A chain popped after a push is translated
    afresh, whether in the same handler run or a later one.
    """

    def __init__(self, inner: Any, forget: Callable[[], None]) -> None:
        self.inner = inner
        self._forget = forget

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def push(self, head: int, length: int) -> None:
        """Complete one chain, then forget the buffer translations."""
        self.inner.push(head, length)
        self._forget()

    def push_batch(self, batch: Any, coalesce: bool = False) -> None:
        """Complete a batch, then forget the buffer translations."""
        self.inner.push_batch(batch, coalesce)
        self._forget()


def _check_range(kind: str, iova: int, size: int) -> None:
    if size == 0:
        raise IotlbError(kind, iova, size, "size is 0 (expected at least one byte)")
    if iova + size > _U64_END:
        raise IotlbError(kind, iova, size, "range wraps 2^64")
