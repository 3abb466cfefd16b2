# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A device's IOTLB-miss handler in C: the accelerated twin of ``_dma_py.py``; :mod:`iovirt.vtd.dma` picks one.

The reference sends every miss of the device's C-level IOTLB to
:meth:`iovirt.vtd.dma.DmaRemapper.translate`, the model of record.  This
one serves the common miss itself, with the same steps on the same state:
translation on, the source id's context entry in the unit's context cache
(multi-level, the range within AW), each page from the unit's IOTLB dict or,
on an IOTLB miss, from the C page walk (:mod:`iovirt.vtd._walk_c`) inserted
into that dict as ``DmaRemapper._fill`` inserts it, the permission check,
and the copy into the device's C-level IOTLB.  Anything else (translation
off, a context-cache miss, pass-through, a fault of any kind, a range that
is not plain) goes to ``DmaRemapper.translate`` from the start.  What this
path did before handing over is what the reference does on the same pages
(it inserts pages that translated, which the reference then finds as
hits), so the unit's caches and the fault log end as the reference leaves
them.

Everything here runs under the GIL, as the reference does, and calls no
Python code on the common path.  The unit's dicts are the remapper's own
(they are only ever mutated, never replaced).
"""

from libc.stdint cimport uint64_t

from iovirt.virtio._iotlb_c cimport CachedTranslator, IotlbCache
from iovirt.vtd._walk_c cimport TableWalker, WalkResult

from iovirt.vtd.regs import PAGE_SHIFT as _PAGE_SHIFT
from iovirt.vtd.tables import TT_DEVICE_TLB as _TT_DEVICE_TLB, TT_MULTI_LEVEL as _TT_MULTI_LEVEL

cdef int PAGE_SHIFT = _PAGE_SHIFT
cdef uint64_t PAGE_OFFSET = ((<uint64_t> 1) << PAGE_SHIFT) - 1
cdef int TT_MULTI_LEVEL = _TT_MULTI_LEVEL
cdef int TT_DEVICE_TLB = _TT_DEVICE_TLB
# IotlbSlot.tag's size class for a 4 KiB entry (see iovirt/virtio/_iotlb_c.pxd).
cdef uint64_t TAG_4K = 1

IMPLEMENTATION = "cython"


cdef class DmaTranslatorBase(CachedTranslator):
    """A device translator's state (``source_id``, ``did``) and its miss handler ``fill``.

    ``did`` is the domain whose entries ``cache`` holds (``None``: none yet).
    Subclasses implement ``forget()`` (drop the cache, clear ``did``).
    """

    cdef readonly object _remapper
    cdef public object source_id
    cdef public object did
    cdef dict _contexts
    cdef dict _iotlb
    cdef object _iotlb_model
    cdef Py_ssize_t _iotlb_capacity
    cdef TableWalker _walker

    def __init__(self, remapper, source_id):
        super().__init__(remapper.iotlb.capacity)
        self._remapper = remapper
        self.source_id = source_id
        self.did = None
        self._contexts = remapper.context_cache.entries
        self._iotlb_model = remapper.iotlb
        self._iotlb = remapper.iotlb.entries
        self._iotlb_capacity = remapper.iotlb.capacity
        self._walker = TableWalker(remapper.memory)

    def fill(self, iova, length, access):
        """Translate through the unit (see :meth:`DmaRemapper.translate`), copying the entries used."""
        pieces = self._fill_common(iova, length, access)
        if pieces is None:
            return self._remapper.translate(self.source_id, iova, length, access, self)
        return pieces

    cdef object _fill_common(self, object iova, object length, object access):
        """``DmaRemapper.translate``'s pieces for the common case, or ``None``: ask it instead."""
        cdef uint64_t addr, n, end, limit, vpn, next_page, leaf_mask, leaf_start, page_gpa, perm, acc
        cdef int tt, levels
        cdef WalkResult walked
        cdef dict iotlb = self._iotlb
        cdef tuple ctx, entry
        if not self._remapper._enabled:
            return None
        try:
            addr = iova
            n = length
            acc = access
        except (OverflowError, TypeError):
            return None
        ctx = self._contexts.get(self.source_id)
        if ctx is None or n == 0:
            return None
        did = ctx[0]
        tt = ctx[1]
        if tt != TT_MULTI_LEVEL and tt != TT_DEVICE_TLB:
            return None
        levels = ctx[2]
        # levels_width(levels): a request beyond the domain's address width faults (spec 3.7).
        limit = (<uint64_t> 1) << (PAGE_SHIFT + 9 * levels)
        if n > limit or addr > limit - n:
            return None
        end = addr + n
        if self.did is not did and self.did != did:
            self.forget()
            self.did = did
        pieces = []
        while addr < end:
            vpn = addr >> PAGE_SHIFT
            key = (did, vpn)
            entry = iotlb.get(key)
            if entry is None:
                if self._walker._walk(ctx[3], levels, addr, &walked) or not walked.perm:
                    return None
                # As DmaRemapper._fill: the 4 KiB piece of the leaf, bounded by the whole leaf.
                leaf_mask = ((<uint64_t> 1) << walked.shift) - 1
                leaf_start = addr & ~leaf_mask
                page_gpa = walked.leaf + (addr & leaf_mask & ~PAGE_OFFSET)
                perm = walked.perm
                entry = (page_gpa, perm, leaf_start, leaf_start + leaf_mask + 1)
                if len(iotlb) >= self._iotlb_capacity:
                    self._iotlb_model.insert(did, vpn, entry)  # evicts the oldest, reporting the drop
                else:
                    iotlb[key] = entry
            else:
                page_gpa = entry[0]
                perm = entry[1]
            if perm & acc != acc:
                return None
            self._copy(vpn << PAGE_SHIFT, page_gpa, perm)
            next_page = (vpn + 1) << PAGE_SHIFT
            n = (end if end < next_page else next_page) - addr
            pieces.append((page_gpa | (addr & PAGE_OFFSET), n))
            addr += n
        return pieces

    cdef int _copy(self, uint64_t iova, uint64_t gpa, uint64_t perm) except -1:
        """``self.cache.insert(iova, gpa, 4 KiB, perm)`` through the cache's C interface."""
        cdef IotlbCache cache = self.cache
        if cache._count >= cache.capacity and cache._find(iova) == NULL:
            cache.invalidate_all()  # as insert does: a full cache empties first
        cache._write_begin()
        cache._put(iova | TAG_4K, gpa | perm)
        cache._write_end()
        return 0
