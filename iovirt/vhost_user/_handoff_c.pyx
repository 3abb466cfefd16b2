# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The single-producer, single-consumer hand-off ring between two data-plane workers, in C.

The Cython twin of ``_handoff_py.py`` (the reference), chosen by
``handoff.py``.  Two indexes, each written by one side only: ``head`` by the
producer (the next slot it fills), ``tail`` by the consumer (the next slot it
takes).  No lock: the producer fills a slot and then publishes it by storing
``head``; the consumer takes a slot and then frees it by storing ``tail``.
Both are sequentially consistent atomics, so the producer's reading of
``tail`` right after its store of ``head`` tells it whether the consumer may
have seen the ring empty and gone to sleep (then it wakes it), with no lost
wake-up: either the consumer's last look saw the new ``head``, or the
producer's look sees the ``tail`` the consumer stored before that look.
Slots hold owned references (the producer's reference moves to the consumer).
"""

from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdlib cimport calloc, free

cdef extern from *:
    """
    static inline size_t iovirt_load(const size_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void iovirt_store(size_t *p, size_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    """
    size_t iovirt_load(const size_t *p) nogil
    void iovirt_store(size_t *p, size_t v) nogil

# What push returns (also the reference's values).
FULL = 0
PUSHED = 1
WAS_EMPTY = 2

cdef class HandoffRing:
    """A bounded SPSC ring of Python objects; ``capacity`` must be a power of two.

    :meth:`push` returns ``FULL`` (0, nothing taken), ``PUSHED`` (1) or
    ``WAS_EMPTY`` (2: the consumer may be asleep, wake it); :meth:`pop`
    returns the oldest item or ``None``.
    """

    cdef PyObject **slots
    cdef size_t mask
    # On their own cache lines: each side writes one, so they do not false-share.
    cdef size_t _pad0[8]
    cdef size_t head
    cdef size_t _pad1[8]
    cdef size_t tail
    cdef size_t _pad2[8]
    cdef readonly size_t capacity

    def __cinit__(self, size_t capacity):
        if capacity < 2 or capacity & (capacity - 1):
            raise ValueError(f"hand-off ring capacity must be a power of two of at least 2, got {capacity}")
        self.slots = <PyObject **> calloc(capacity, sizeof(PyObject *))
        if self.slots == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.mask = capacity - 1
        self.head = self.tail = 0

    def __dealloc__(self):
        cdef size_t i
        if self.slots != NULL:
            for i in range(self.capacity):
                Py_XDECREF(self.slots[i])
            free(self.slots)

    def push(self, object item):
        """Append ``item`` (producer side only); FULL, PUSHED or WAS_EMPTY."""
        cdef size_t head = self.head  # only this side writes it
        if head - iovirt_load(&self.tail) >= self.capacity:
            return FULL
        Py_INCREF(item)
        self.slots[head & self.mask] = <PyObject *> item
        iovirt_store(&self.head, head + 1)
        return WAS_EMPTY if iovirt_load(&self.tail) == head else PUSHED

    def pop(self):
        """The oldest item (consumer side only), or ``None`` when the ring is empty."""
        cdef size_t tail = self.tail  # only this side writes it
        cdef PyObject *p
        if tail == iovirt_load(&self.head):
            return None
        p = self.slots[tail & self.mask]
        self.slots[tail & self.mask] = NULL
        iovirt_store(&self.tail, tail + 1)
        item = <object> p  # a new reference ...
        Py_XDECREF(p)  # ... so the slot's one is given up
        return item

    def __len__(self):
        return iovirt_load(&self.head) - iovirt_load(&self.tail)
