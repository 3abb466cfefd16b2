"""Translation caches: context cache, IOTLB, interrupt entry cache.

VT-d spec 6.2 (caching), 6.5 (invalidation).  Like the hardware, the caches
keep serving what they hold after the tables in memory change, until
software invalidates them.  Only successful translations are cached
(CAP.CM = 0: not-present and faulting entries are never cached).

The entries are plain ints in tuples in plain dicts so the hit path is one
dict lookup.  Data-plane threads fill the caches while the control thread
invalidates them, so every scan works on a snapshot (``list(dict)`` copies
under the GIL) and removes with ``pop(key, None)``.

The context cache and the IOTLB report every entry they drop (invalidation
or eviction) to an ``on_drop`` callback, so that copies of their entries
kept elsewhere (the devices' C-level IOTLBs, :mod:`iovirt.vtd.dma`) are
dropped with them.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from iovirt.vtd.regs import PAGE_SHIFT

V = TypeVar("V")

#: A context-cache entry: (did, tt, levels, slptptr, fpd).
ContextCacheEntry = tuple[int, int, int, int, bool]
#: An IOTLB entry for one 4 KiB page: (gpa_page, perm, leaf_start, leaf_end);
#: leaf_start/leaf_end bound the IOVA range of the (possibly 2M/1G) leaf it came from.
IotlbEntry = tuple[int, int, int, int]

#: ``on_drop(sid)`` of the context cache; ``None``: every source id.
ContextDropped = Callable[[int | None], None]
#: ``on_drop(did, vpn)`` of the IOTLB; ``vpn`` ``None``: the whole domain, ``did`` ``None``: everything.
IotlbDropped = Callable[[int | None, int | None], None]

#: Function-mask encodings: the source-id bits a device-selective invalidation ignores.
_FM_IGNORED_BITS = {0: 0, 1: 0b100, 2: 0b110, 3: 0b111}


class ContextCache:
    """Cached context entries by source id (spec 6.2.1)."""

    def __init__(self, on_drop: ContextDropped | None = None) -> None:
        self.entries: dict[int, ContextCacheEntry] = {}
        self._on_drop = on_drop

    def _drop(self, sid: int) -> None:
        self.entries.pop(sid, None)
        if self._on_drop is not None:
            self._on_drop(sid)

    def invalidate_global(self) -> None:
        """Drop every entry."""
        self.entries.clear()
        if self._on_drop is not None:
            self._on_drop(None)

    def invalidate_domain(self, did: int) -> None:
        """Drop the entries of domain ``did``."""
        for sid, entry in list(self.entries.items()):
            if entry[0] == did:
                self._drop(sid)

    def invalidate_device(self, sid: int, fm: int) -> None:
        """Drop the entries of ``sid``; FM masks its low function bits (spec 11.4.7.1).

        The DID the driver also supplies is not matched: this invalidates a
        superset, which the spec allows.
        """
        mask = 0xFFFF & ~_FM_IGNORED_BITS[fm & 3]
        for s in list(self.entries):
            if s & mask == sid & mask:
                self._drop(s)


class Iotlb:
    """Cached second-level translations keyed by ``(did, iova >> 12)`` (spec 6.2.2).

    Holds at most ``capacity`` 4 KiB entries; the oldest goes first when it
    is full.  Invalidation scans are bounded by the capacity.
    """

    def __init__(self, capacity: int = 4096, on_drop: IotlbDropped | None = None) -> None:
        self.capacity = capacity
        self.entries: dict[tuple[int, int], IotlbEntry] = {}
        self._on_drop = on_drop

    def insert(self, did: int, vpn: int, entry: IotlbEntry) -> None:
        """Cache one page's translation."""
        entries = self.entries
        if len(entries) >= self.capacity:
            oldest = next(iter(entries))
            entries.pop(oldest, None)
            if self._on_drop is not None:
                self._on_drop(*oldest)
        entries[(did, vpn)] = entry

    def invalidate_global(self) -> None:
        """Drop every entry."""
        self.entries.clear()
        if self._on_drop is not None:
            self._on_drop(None, None)

    def invalidate_domain(self, did: int) -> None:
        """Drop every entry of domain ``did``."""
        for key in list(self.entries):
            if key[0] == did:
                self.entries.pop(key, None)
        if self._on_drop is not None:
            self._on_drop(did, None)

    def invalidate_pages(self, did: int, addr: int, am: int) -> None:
        """Drop domain ``did``'s entries overlapping the 2^AM pages at ``addr`` (aligned down).

        A cached piece of a large leaf goes if any part of that leaf
        overlaps: hardware caches the leaf as one entry.
        """
        size = 1 << (PAGE_SHIFT + am)
        start = addr & ~(size - 1)
        end = start + size
        for key, entry in list(self.entries.items()):
            if key[0] == did and entry[2] < end and entry[3] > start:
                self.entries.pop(key, None)
                if self._on_drop is not None:
                    self._on_drop(*key)


class InterruptEntryCache(Generic[V]):
    """Cached, decoded interrupt-remapping table entries by index (spec 6.2.3)."""

    def __init__(self) -> None:
        self.entries: dict[int, V] = {}

    def invalidate_global(self) -> None:
        """Drop every entry."""
        self.entries.clear()

    def invalidate_index(self, index: int, im: int) -> None:
        """Drop the 2^IM entries at ``index`` aligned down (spec 6.5.2.7)."""
        count = 1 << im
        start = index & ~(count - 1)
        for i in list(self.entries):
            if start <= i < start + count:
                self.entries.pop(i, None)
