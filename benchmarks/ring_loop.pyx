# cython: language_level=3, boundscheck=False, wraparound=False
"""The ring benchmark's loop in C, over the Cython queue's C interface (benchmarks/ring.py).

``ring.py`` times the Cython split queue two ways: from Python (one
``pop_batch``, ``push_batch`` and ``need_notify`` call per batch, what a
device written in Python pays) and from this loop, which calls the same
queue through its C interface (``pop_into``, ``push_chains``,
``notify_needed`` in ``iovirt/virtio/_queue_c.pxd``): the ring's own cost,
the one to hold against the plain-C ceiling (``ring_ceiling.c``).  The
driver side is the same as there: the chains are re-posted by bumping avail
idx.  Compiled by ``ring.py`` at run time; not part of the package.
"""

from iovirt.virtio._queue_c cimport ChainBatch, SplitQueue


def run(SplitQueue q, ChainBatch b, unsigned short[::1] avail_idx, Py_ssize_t batch, Py_ssize_t rounds):
    """``rounds`` batches of up to ``batch`` chains popped, pushed used and checked for notifying; chains done."""
    cdef Py_ssize_t done = 0, n, r
    cdef unsigned short idx = avail_idx[0]
    for r in range(rounds):
        n = q.pop_into(b, batch)
        q.push_chains(b, False)
        q.notify_needed()
        done += n
        idx = <unsigned short> (idx + n)
        avail_idx[0] = idx
    return done
