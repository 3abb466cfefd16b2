"""A translation cache and a translator base class: the readable reference.

The accelerated twin is ``_iotlb_c.pyx`` (the same API, looked up in C without
the GIL by the accelerated ring); :mod:`iovirt.virtio.iotlb` picks one.  Both
keep entries of one 4 KiB page or one 2 MiB / 1 GiB leaf (VT-d super-pages,
spec 3.7.1), drop a whole leaf when any part of it is invalidated, and empty
themselves when an insert finds them full.
"""

from __future__ import annotations

from iovirt.memory import Access

IMPLEMENTATION = "python"

#: Leaf sizes an entry may have: 4 KiB, 2 MiB, 1 GiB.
PAGE_SIZES = (1 << 12, 1 << 21, 1 << 30)
DEFAULT_CAPACITY = 4096
_U64_MAX = (1 << 64) - 1


class IotlbCache:
    """IOVA page -> (GPA page, permission) entries (see the accelerated twin for the API)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"IOTLB capacity {capacity} must be at least 1")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        # (iova base, size) -> (gpa base, perm)
        self._entries: dict[tuple[int, int], tuple[int, int]] = {}

    def _find(self, iova: int) -> tuple[int, int, int, int] | None:
        for size in PAGE_SIZES:  # smallest leaf first, as the accelerated twin
            base = iova & ~(size - 1)
            entry = self._entries.get((base, size))
            if entry is not None:
                return base, size, entry[0], entry[1]
        return None

    def insert(self, iova: int, gpa: int, size: int, perm: int) -> None:
        """Cache one leaf: ``[iova, iova+size)`` -> ``[gpa, gpa+size)`` with ``perm``."""
        if size not in PAGE_SIZES:
            raise ValueError(f"IOTLB entry size {size:#x} is not 4 KiB, 2 MiB or 1 GiB")
        if iova & (size - 1) or gpa & (size - 1):
            raise ValueError(f"IOTLB entry {iova:#x} -> {gpa:#x} is not aligned to its size {size:#x}")
        if perm & ~3:
            raise ValueError(f"IOTLB permission {perm:#x} has bits other than READ|WRITE")
        if not 0 <= iova <= _U64_MAX or not 0 <= gpa <= _U64_MAX:
            raise OverflowError(f"IOTLB entry {iova:#x} -> {gpa:#x} is not a 64-bit address pair")
        if len(self._entries) >= self.capacity and self._find(iova) is None:
            self._entries.clear()
        self._entries[(iova, size)] = (gpa, perm)

    def lookup(self, iova: int, length: int = 1, access: int = 1) -> tuple[int, int, int] | None:
        """``(gpa, run, perm)`` for the run of ``[iova, iova+length)`` that hits, or ``None``.

        The run is contiguous in GPA and every entry in it allows ``access``.
        """
        if length <= 0 or iova + length - 1 > _U64_MAX:
            raise ValueError(f"lookup range [{iova:#x}, +{length:#x}) is empty or wraps")
        need = int(access) & 3
        hit = self._find(iova)
        if hit is None or hit[3] & need != need:
            self.misses += 1
            return None
        base, size, gbase, perm = hit
        gpa = gbase + (iova - base)
        run = min(base + size - iova, length)
        while run < length:
            nxt = iova + run
            hit = self._find(nxt)
            if hit is None or hit[3] & need != need or hit[2] + (nxt - hit[0]) != gpa + run:
                break
            run += min(hit[0] + hit[1] - nxt, length - run)
            perm &= hit[3]
        self.hits += 1
        return gpa, run, perm

    def invalidate(self, iova: int, size: int) -> None:
        """Drop every entry overlapping ``[iova, iova+size)`` (a large leaf goes whole)."""
        if size <= 0:
            return
        last = min(iova + size - 1, _U64_MAX)
        for key in [k for k in self._entries if k[0] <= last and k[0] + k[1] - 1 >= iova]:
            del self._entries[key]

    def invalidate_all(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def entries(self) -> list[tuple[int, int, int, int]]:
        """Every entry as ``(iova, gpa, size, perm)``, sorted by IOVA."""
        return sorted((iova, gpa, size, perm) for (iova, size), (gpa, perm) in self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)


class CachedTranslator:
    """A translator with an :class:`IotlbCache` in front of a miss handler, ``fill``.

    Subclasses implement ``fill(iova, length, access)``: translate, insert
    what was learnt into ``self.cache``, return ``[(gpa, len), ...]`` or raise
    ``TranslationFault`` / ``TranslationPending``.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.cache = IotlbCache(capacity)

    def fill(self, iova: int, length: int, access: Access) -> list[tuple[int, int]]:
        """The miss handler: subclasses translate, cache and return the pieces."""
        raise NotImplementedError(f"{type(self).__name__} must implement fill(iova, length, access)")

    def translate(self, addr: int, length: int, access: Access) -> list[tuple[int, int]]:
        """Guest-physical pieces of ``[addr, addr+length)``: cached runs, then ``fill`` from the first miss."""
        if length <= 0 or addr < 0 or addr + length > _U64_MAX + 1:
            return self.fill(addr, length, access)
        pieces: list[tuple[int, int]] = []
        pos, end = addr, addr + length
        while pos < end:
            hit = self.cache.lookup(pos, end - pos, int(access))
            if hit is None:
                pieces.extend(self.fill(pos, end - pos, access))
                break
            pieces.append((hit[0], hit[1]))
            pos += hit[1]
        return pieces
