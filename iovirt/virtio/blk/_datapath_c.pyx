# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""virtio-blk's batch data path in C: IN, OUT and FLUSH submitted from a popped batch, completed later.

The Cython twin of ``_datapath_py.py`` (virtio 1.2 5.2.6), chosen by
``datapath.py``, which gives the device what this leaves: request types
other than IN/OUT/FLUSH, and requests whose buffers have no host pointer
(they span regions or an IOMMU is in front) or whose layout is unusual (data
in the header's buffer).  Requests go to io_uring through liburing (one
``io_uring_submit`` per batch; ``-DIOVIRT_HAVE_LIBURING`` at build time,
``setup.py``; completions signal the device's eventfd), or to a thread pool (:class:`~iovirt.virtio.blk.aio.ThreadPool`)
whose workers run ``preadv`` / ``pwritev`` / ``fdatasync`` with the GIL
released, where io_uring is not built in or the kernel refuses it; for an
image in memory they are done at submission (``inline``), as copies to and
from the mapped image where it has no holes (:meth:`Engine.map_image`).  Every
request in flight holds a slot: its iovecs (pointing into guest memory), its
status byte, and its device-writable buffers, which the completion batch
carries to ``push_batch`` for dirty logging.  The module docstring of
``aio.py`` says why and how FLUSH is ordered.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, realloc, free
from libc.string cimport memcpy
from libc.errno cimport errno, EINVAL
from posix.uio cimport iovec, preadv, pwritev
from posix.types cimport off_t

import os

from iovirt.virtio._queue_c cimport ChainBatch
from iovirt.virtio.blk import defs
from iovirt.virtio.blk.aio import ENGINE_ENV, DIRECT_ALIGN, ThreadPool, io_uring_refused

cdef extern from "unistd.h" nogil:
    int fdatasync(int fd)

cdef extern from *:
    """
    #include <errno.h>
    #include <stdint.h>
    #include <stdlib.h>
    #include <sys/uio.h>
    #define IOVIRT_TAG_NONE UINT64_MAX
    #ifdef IOVIRT_HAVE_LIBURING
    #include <liburing.h>
    #define IOVIRT_URING_BUILT 1
    /* One ring, and the test hook's latency (a timeout linked before each request). */
    typedef struct { struct io_uring ring; struct __kernel_timespec delay; int delayed; } iovirt_uring;

    static iovirt_uring *iovirt_uring_new(unsigned entries, int eventfd, long long delay_ns, int *err) {
        iovirt_uring *u = calloc(1, sizeof *u);
        int rc;
        if (!u) { *err = ENOMEM; return NULL; }
        rc = io_uring_queue_init(entries, &u->ring, 0);
        if (rc < 0) { free(u); *err = -rc; return NULL; }
        /* Every completion signals (the _async variant skips those completed through task work,
           which nobody would reap then). */
        rc = io_uring_register_eventfd(&u->ring, eventfd);
        if (rc < 0) { io_uring_queue_exit(&u->ring); free(u); *err = -rc; return NULL; }
        u->delay.tv_sec = delay_ns / 1000000000LL;
        u->delay.tv_nsec = delay_ns % 1000000000LL;
        u->delayed = delay_ns > 0;
        return u;
    }

    /* op 0 read, 1 write, 2 flush (fdatasync; drained: it starts after every earlier request completed). */
    static int iovirt_uring_prep(iovirt_uring *u, int op, int fd, const struct iovec *iov, unsigned n,
                                 uint64_t off, uint64_t tag) {
        struct io_uring_sqe *sqe;
        unsigned drain = op == 2 ? IOSQE_IO_DRAIN : 0;
        if (io_uring_sq_space_left(&u->ring) < 2)
            io_uring_submit(&u->ring);  /* a linked pair goes in one submission */
        if (u->delayed && op != 2) {
            sqe = io_uring_get_sqe(&u->ring);
            if (!sqe) return -EBUSY;
            io_uring_prep_timeout(sqe, &u->delay, 0, IORING_TIMEOUT_ETIME_SUCCESS);
            io_uring_sqe_set_data64(sqe, IOVIRT_TAG_NONE);
            io_uring_sqe_set_flags(sqe, IOSQE_IO_LINK | drain);
            drain = 0;
        }
        sqe = io_uring_get_sqe(&u->ring);
        if (!sqe) return -EBUSY;
        if (op == 0) io_uring_prep_readv(sqe, fd, iov, n, off);
        else if (op == 1) io_uring_prep_writev(sqe, fd, iov, n, off);
        else io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        io_uring_sqe_set_data64(sqe, tag);
        io_uring_sqe_set_flags(sqe, drain);
        return 0;
    }

    static int iovirt_uring_submit(iovirt_uring *u) { return io_uring_submit(&u->ring); }

    /* Up to max completions, consumed: (tag, result) pairs. */
    static int iovirt_uring_reap(iovirt_uring *u, uint64_t *tags, int *res, int max) {
        struct io_uring_cqe *cqes[64];
        unsigned n, i;
        int got = 0;
        while (got < max) {
            n = io_uring_peek_batch_cqe(&u->ring, cqes, max - got < 64 ? (unsigned)(max - got) : 64);
            if (!n) break;
            for (i = 0; i < n; i++) { tags[got] = cqes[i]->user_data; res[got] = cqes[i]->res; got++; }
            io_uring_cq_advance(&u->ring, n);
        }
        return got;
    }

    static int iovirt_uring_wait(iovirt_uring *u) {
        struct io_uring_cqe *cqe;
        return io_uring_wait_cqe(&u->ring, &cqe);
    }

    /* Enter the ring for its events: runs completions owed to this thread as task work and flushes an
       overflowed completion queue into the ring. */
    static int iovirt_uring_poll(iovirt_uring *u) { return io_uring_get_events(&u->ring); }

    static void iovirt_uring_free(iovirt_uring *u) { io_uring_queue_exit(&u->ring); free(u); }
    #else
    #define IOVIRT_URING_BUILT 0
    typedef struct { int unused; } iovirt_uring;
    static iovirt_uring *iovirt_uring_new(unsigned e, int fd, long long d, int *err) { *err = ENOSYS; return NULL; }
    static int iovirt_uring_prep(iovirt_uring *u, int op, int fd, const struct iovec *iov, unsigned n,
                                 uint64_t off, uint64_t tag) { return -ENOSYS; }
    static int iovirt_uring_submit(iovirt_uring *u) { return -ENOSYS; }
    static int iovirt_uring_reap(iovirt_uring *u, uint64_t *tags, int *res, int max) { return 0; }
    static int iovirt_uring_wait(iovirt_uring *u) { return -ENOSYS; }
    static int iovirt_uring_poll(iovirt_uring *u) { return -ENOSYS; }
    static void iovirt_uring_free(iovirt_uring *u) { }
    #endif
    """
    ctypedef struct iovirt_uring:
        pass
    uint64_t IOVIRT_TAG_NONE
    int IOVIRT_URING_BUILT
    iovirt_uring *iovirt_uring_new(unsigned entries, int eventfd, long long delay_ns, int *err)
    int iovirt_uring_prep(iovirt_uring *u, int op, int fd, const iovec *iov, unsigned n, uint64_t off, uint64_t tag)
    int iovirt_uring_submit(iovirt_uring *u)
    int iovirt_uring_reap(iovirt_uring *u, uint64_t *tags, int *res, int maxn)
    int iovirt_uring_wait(iovirt_uring *u) nogil
    int iovirt_uring_poll(iovirt_uring *u) nogil
    void iovirt_uring_free(iovirt_uring *u)

cdef extern from *:
    """
    #include <errno.h>
    #include <setjmp.h>
    #include <signal.h>
    #include <string.h>
    #include <sys/uio.h>
    /* The copy of a mapped image: a page of the image or of guest memory that cannot be had (the file
       shrunk under the mapping, a memory file system full when a hole is touched) raises SIGBUS
       (mmap(2)). While a thread copies, the handler jumps back into the copy, which fails; any other
       SIGBUS goes to whoever handled it before, by giving the signal back to them and returning:
       the faulting access runs again and faults again. */
    static __thread sigjmp_buf *iovirt_bus_guard;
    static struct sigaction iovirt_bus_prev;
    static int iovirt_bus_installed;

    static void iovirt_on_bus(int sig, siginfo_t *info, void *context) {
        sigjmp_buf *guard = iovirt_bus_guard;
        (void)sig; (void)info; (void)context;
        if (guard != NULL) {
            iovirt_bus_guard = NULL;
            siglongjmp(*guard, 1);
        }
        sigaction(SIGBUS, &iovirt_bus_prev, NULL);
    }

    static int iovirt_bus_install(void) {
        struct sigaction sa;
        if (iovirt_bus_installed) return 0;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = iovirt_on_bus;
        /* NODEFER: the jump leaves the handler without sigreturn, so SIGBUS must not stay blocked. */
        sa.sa_flags = SA_SIGINFO | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &iovirt_bus_prev) != 0) return -errno;
        iovirt_bus_installed = 1;
        return 0;
    }

    /* Copy a request's buffers from (read) or into (write) the mapped image at off: 0, or -EFAULT
       where SIGBUS stopped it (the caller does the request through the fd instead). */
    static int iovirt_mapped_copy(unsigned char *map, uint64_t off, const struct iovec *iov, int niov,
                                  int write) {
        sigjmp_buf env;
        int i;
        if (sigsetjmp(env, 0)) return -EFAULT;
        iovirt_bus_guard = &env;
        for (i = 0; i < niov; i++) {
            if (write) memcpy(map + off, iov[i].iov_base, iov[i].iov_len);
            else memcpy(iov[i].iov_base, map + off, iov[i].iov_len);
            off += iov[i].iov_len;
        }
        iovirt_bus_guard = NULL;
        return 0;
    }
    """
    int iovirt_bus_install()
    int iovirt_mapped_copy(uint8_t *map, uint64_t off, const iovec *iov, int niov, int write) nogil

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, off_t offset)
    int munmap(void *addr, size_t length)
    void *MAP_FAILED
    int PROT_READ, PROT_WRITE, MAP_SHARED

URING_BUILT = bool(IOVIRT_URING_BUILT)
"""Whether liburing was found when this extension was built."""

cdef extern from "sys/vfs.h" nogil:
    ctypedef struct statfs_t "struct statfs":
        long f_type
    int fstatfs(int fd, statfs_t *buf)

cdef extern from "linux/magic.h":
    long TMPFS_MAGIC, RAMFS_MAGIC, HUGETLBFS_MAGIC


def memory_backed(int fd):
    """Whether ``fd``'s file lives in memory (tmpfs, ramfs, hugetlbfs): its reads and writes never wait for a device."""
    cdef statfs_t st
    if fstatfs(fd, &st) != 0:
        return False
    return st.f_type in (TMPFS_MAGIC, RAMFS_MAGIC, HUGETLBFS_MAGIC)

# The spec constants, from defs.py, as C values for the loop.
cdef uint32_t T_IN = defs.VIRTIO_BLK_T_IN, T_OUT = defs.VIRTIO_BLK_T_OUT, T_FLUSH = defs.VIRTIO_BLK_T_FLUSH
cdef int S_OK = defs.VIRTIO_BLK_S_OK, S_IOERR = defs.VIRTIO_BLK_S_IOERR
cdef uint64_t SECTOR = defs.SECTOR_SIZE
cdef uint32_t HDR = defs.REQ_HDR.size
cdef uint64_t ALIGN = DIRECT_ALIGN

cdef enum:
    OP_READ = 0
    OP_WRITE = 1
    OP_FLUSH = 2
    OP_NONE = 3  # completed at submission: ``result`` is the status

OP_NAMES = ("read", "write", "flush")


cdef struct Slot:
    int queue
    uint16_t head
    uint32_t used_len
    uint8_t *status
    int op
    int fd
    bint direct
    uint64_t offset
    uint64_t nbytes
    int result
    int niov, iov_cap
    iovec *iov
    # the chain's device-writable buffers, for the dirty log at push time
    uint32_t nbufs, buf_cap
    uint64_t *addrs
    uint32_t *lens
    uint8_t **hosts


cdef void *_grow(void *p, size_t nbytes) except NULL:
    cdef void *q = realloc(p, nbytes)
    if q == NULL:
        raise MemoryError()
    return q


cdef int _do_io(Slot *s) noexcept nogil:
    """One request, blocking (a thread-pool worker runs it): bytes moved, or -errno."""
    cdef Py_ssize_t got
    if s.op == OP_READ:
        got = preadv(s.fd, s.iov, s.niov, <off_t> s.offset)
    elif s.op == OP_WRITE:
        got = pwritev(s.fd, s.iov, s.niov, <off_t> s.offset)
    else:
        got = fdatasync(s.fd)
    return <int> (-errno if got < 0 else got)


cdef class Engine:
    """Requests in flight on one device's image: submitted from batches, completed into batches per queue.

    ``wake_fd`` is signalled as requests complete; ``slots`` bounds the
    requests in flight (the device pops no more than :attr:`free`);
    ``hook`` is an :class:`~iovirt.virtio.blk.aio.ImageHook` or ``None``;
    ``kind`` asks for ``"io_uring"`` or ``"threads"`` (default: the
    ``IOVIRT_BLK_ENGINE`` environment variable, else io_uring where it works
    and :func:`~iovirt.virtio.blk.aio.refuse_io_uring` was not called).
    """

    cdef Slot *slots
    cdef int nslots
    cdef int *free_list
    cdef int nfree
    cdef int *ready  # completed at submission, reaped by the next ``complete``
    cdef int nready
    cdef uint64_t *tags
    cdef int *results
    cdef iovirt_uring *uring
    cdef object pool
    cdef object hook_fail
    cdef int fallback_fd
    cdef list out  # per queue index: the ChainBatch of its completions
    cdef readonly str kind
    cdef readonly str reason
    cdef bint inline_io  # "inline": each request done at submission (a memory-backed image: a copy)
    cdef uint8_t *map  # the inline engine's image, mapped (map_image), or NULL: preadv / pwritev
    cdef uint64_t map_len

    def __cinit__(self):
        self.slots = NULL
        self.free_list = self.ready = self.results = NULL
        self.tags = NULL
        self.uring = NULL
        self.map = NULL

    def __init__(self, int wake_fd, int slots, hook=None, kind=None):
        cdef int i, err = 0
        self.nslots = slots
        self.slots = <Slot *> calloc(slots, sizeof(Slot))
        self.free_list = <int *> calloc(slots, sizeof(int))
        self.ready = <int *> calloc(slots, sizeof(int))
        self.tags = <uint64_t *> calloc(2 * slots, sizeof(uint64_t))
        self.results = <int *> calloc(2 * slots, sizeof(int))
        if not (self.slots and self.free_list and self.ready and self.tags and self.results):
            raise MemoryError()
        for i in range(slots):
            self.free_list[i] = slots - 1 - i
        self.nfree = slots
        self.nready = 0
        self.out = []
        self.fallback_fd = -1
        delay = 0.0 if hook is None else hook.delay
        self.hook_fail = None if hook is None else hook.fail
        kind = kind or os.environ.get(ENGINE_ENV) or "io_uring"
        if kind not in ("io_uring", "threads", "inline"):
            raise ValueError(f"blk engine {kind!r}: expected io_uring, threads or inline")
        self.reason = "asked for"
        if kind == "inline":
            if delay:
                raise ValueError("blk engine 'inline' cannot add the test hook's latency")
            self.kind, self.inline_io = "inline", True
            self.reason = "the image is in memory: each request is a copy, done when submitted"
            return
        if kind == "io_uring":
            if io_uring_refused() is not None:
                self.reason = io_uring_refused()
            elif not IOVIRT_URING_BUILT:
                self.reason = "liburing was not found when the extension was built"
            else:
                # Two entries per request: the test hook's timeout goes linked before it.
                self.uring = iovirt_uring_new(2 * slots, wake_fd, <long long> (delay * 1e9), &err)
                if self.uring == NULL:
                    self.reason = f"io_uring refused: {os.strerror(err)}"
                else:
                    self.kind, self.reason = "io_uring", "liburing"
                    return
        self.kind = "threads"
        self.pool = ThreadPool(self._run, wake_fd, delay=delay)

    def __dealloc__(self):
        cdef int i
        if self.uring != NULL:
            iovirt_uring_free(self.uring)
        if self.map != NULL:
            munmap(self.map, self.map_len)
        if self.slots != NULL:
            for i in range(self.nslots):
                free(self.slots[i].iov)
                free(self.slots[i].addrs)
                free(self.slots[i].lens)
                free(self.slots[i].hosts)
        free(self.slots)
        free(self.free_list)
        free(self.ready)
        free(self.tags)
        free(self.results)

    @property
    def in_flight(self):
        """Requests submitted and not completed (pushed) yet."""
        return self.nslots - self.nfree

    @property
    def free(self):
        """How many more requests may be submitted now."""
        return self.nfree

    @property
    def mapped(self):
        """Whether requests are copies to and from the mapped image (:meth:`map_image`)."""
        return self.map != NULL

    def map_image(self, int fd, uint64_t size, bint writable):
        """Map ``size`` bytes of image ``fd`` so that the inline engine's requests are copies, not system calls.

        For an image in memory (tmpfs, ramfs): a ``preadv`` of 4 KiB spends
        more in the system call and the page-cache lookup than in the copy
        (``benchmarks/RESULTS.md``, the ninth and eleventh sessions).  Only
        the inline engine maps; False where the kernel refuses the mapping
        (a hugetlbfs size that is not whole huge pages) or SIGBUS cannot be
        caught: requests then stay system calls.  A copy that meets SIGBUS
        (the file shrunk under the mapping, or a hole touched on a full file
        system) goes through the fd instead, so a request's outcome is the
        system call's either way.
        """
        cdef void *p
        if not self.inline_io or self.map != NULL or size == 0:
            return self.map != NULL
        if iovirt_bus_install() != 0:
            return False
        p = mmap(NULL, size, PROT_READ | (PROT_WRITE if writable else 0), MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            return False
        self.map = <uint8_t *> p
        self.map_len = size
        self.reason = "the image is in memory and mapped: each request is a copy, done when submitted"
        return True

    def close(self):
        """Stop the workers, if any (after :meth:`complete` took every request), and unmap the image."""
        if self.pool is not None:
            self.pool.close()
        if self.map != NULL:
            munmap(self.map, self.map_len)
            self.map = NULL

    def _run(self, int index):
        cdef int result
        with nogil:
            result = _do_io(&self.slots[index])
        return result

    def submit(self, ChainBatch b, int queue, int fd, int direct_fd, uint64_t capacity, bint read_only):
        """Start the IN/OUT/FLUSH requests of batch ``b`` of queue ``queue`` on image ``fd`` (``direct_fd``: -1 or O_DIRECT).

        Returns ``(left, nbytes, reads, writes, flushes)``: ``left`` lists
        the chains for the Python path; ``nbytes`` the data bytes asked for.
        Requests that need no I/O (out of range, not whole sectors, a write
        to a read-only image, no data) complete at the next :meth:`complete`.
        """
        cdef Py_ssize_t i, k, first, last
        cdef uint32_t rtype, writable_len, nw
        cdef uint64_t sector, nbytes, total = 0, reads = 0, writes = 0, flushes = 0
        cdef const uint8_t *h
        cdef Slot *s
        cdef int idx, niov, op, rc
        cdef bint aligned, submitted = False
        left = []
        for i in range(b.n):
            first, last = b.first[i], b.first[i + 1]
            # The header alone in the first (readable) buffer, the status byte
            # at the end of the last (writable) one: the layout every driver uses.
            if (last - first < 2 or b.writable[first] or b.lens[first] != HDR or b.hosts[first] == NULL
                    or not b.writable[last - 1] or b.lens[last - 1] < 1 or b.hosts[last - 1] == NULL):
                left.append(i)
                continue
            h = b.hosts[first]
            memcpy(&rtype, h, 4)
            memcpy(&sector, h + 8, 8)
            if rtype != T_IN and rtype != T_OUT and rtype != T_FLUSH:
                left.append(i)
                continue
            for k in range(first + 1, last):
                if b.hosts[k] == NULL:
                    break
            else:
                k = -1
            if k >= 0:
                left.append(i)
                continue
            if self.nfree == 0:
                raise RuntimeError("blk engine: more requests popped than slots free")
            self.nfree -= 1
            idx = self.free_list[self.nfree]
            s = &self.slots[idx]
            if s.iov_cap < last - first:
                s.iov = <iovec *> _grow(s.iov, (last - first) * sizeof(iovec))
                s.addrs = <uint64_t *> _grow(s.addrs, (last - first) * sizeof(uint64_t))
                s.lens = <uint32_t *> _grow(s.lens, (last - first) * sizeof(uint32_t))
                s.hosts = <uint8_t **> _grow(s.hosts, (last - first) * sizeof(uint8_t *))
                s.iov_cap = last - first
            writable_len = 0
            niov = 0
            nw = 0
            nbytes = 0
            aligned = direct_fd >= 0
            for k in range(first + 1, last):
                if b.writable[k]:
                    writable_len += b.lens[k]
                    s.addrs[nw] = b.addrs[k]
                    s.lens[nw] = b.lens[k]
                    s.hosts[nw] = b.hosts[k]
                    nw += 1
                if (rtype == T_IN) != (b.writable[k] != 0):
                    continue  # OUT takes the readable data, IN the writable
                s.iov[niov].iov_base = b.hosts[k]
                s.iov[niov].iov_len = b.lens[k]
                nbytes += b.lens[k]
                niov += 1
            if rtype == T_IN:
                # The last writable buffer ends with the status byte.
                s.iov[niov - 1].iov_len -= 1
                nbytes -= 1
                if s.iov[niov - 1].iov_len == 0:
                    niov -= 1
            for k in range(niov):
                if <uint64_t> s.iov[k].iov_base % ALIGN or s.iov[k].iov_len % ALIGN:
                    aligned = False
            s.queue = queue
            s.head = b.heads[i]
            s.used_len = writable_len
            s.status = b.hosts[last - 1] + b.lens[last - 1] - 1
            s.niov = niov
            s.nbufs = nw
            s.nbytes = nbytes
            s.offset = sector * SECTOR
            s.direct = aligned
            s.fd = direct_fd if aligned else fd
            self.fallback_fd = fd
            if rtype == T_IN:
                reads += 1
                op = OP_READ
            elif rtype == T_OUT:
                writes += 1
                op = OP_WRITE
            else:
                flushes += 1
                op = OP_FLUSH
                s.fd = fd
                s.direct = False
            s.op = op
            if op == OP_FLUSH:
                if read_only:
                    self._done_now(idx, S_OK)
                    continue
            elif nbytes % SECTOR or sector > capacity or nbytes // SECTOR > capacity - sector:
                self._done_now(idx, S_IOERR)
                continue
            elif op == OP_WRITE and read_only:
                self._done_now(idx, S_IOERR)  # 5.2.6.2: a read-only device fails writes
                continue
            elif nbytes == 0:
                self._done_now(idx, S_OK)
                continue
            total += nbytes
            if self._start(idx):
                submitted = True
        if submitted:
            iovirt_uring_submit(self.uring)
        return left, total, reads, writes, flushes

    cdef void _done_now(self, int idx, int status):
        self.slots[idx].op = OP_NONE
        self.slots[idx].result = status
        self.ready[self.nready] = idx
        self.nready += 1

    cdef bint _start(self, int idx) except -1:
        """Hand slot ``idx`` to the engine; True if it waits in the io_uring for a submit."""
        cdef Slot *s = &self.slots[idx]
        if self.inline_io:
            if self.map != NULL and s.op != OP_FLUSH and s.offset + s.nbytes <= self.map_len and \
                    iovirt_mapped_copy(self.map, s.offset, s.iov, s.niov, s.op == OP_WRITE) == 0:
                s.result = <int> s.nbytes  # a copy of at most size_max x seg_max bytes: the GIL kept
            else:
                with nogil:
                    s.result = _do_io(s)
            self.ready[self.nready] = idx  # completed: the next ``complete`` takes it
            self.nready += 1
            return False
        if self.uring == NULL:
            self.pool.submit(idx, s.op == OP_FLUSH)
            return False
        if iovirt_uring_prep(self.uring, s.op, s.fd, s.iov, s.niov, s.offset, idx) != 0:
            self._done_now(idx, S_IOERR)
            return False
        return True

    def wait(self):
        """Block until a request completed (call only with requests in flight)."""
        cdef int rc
        if self.nready:
            return
        if self.uring != NULL:
            with nogil:
                rc = iovirt_uring_wait(self.uring)
        elif self.pool is not None:
            self.pool.wait()

    def poll(self):
        """Make completions the kernel holds back visible to :meth:`complete` (io_uring: enter the ring).

        Called from the thread that submits, now and then while requests
        are in flight: a completion owed to that thread as task work, or
        one in an overflowed queue, otherwise waits until something enters
        the ring (``VirtioBlk._poke``).
        """
        if self.uring != NULL:
            with nogil:
                iovirt_uring_poll(self.uring)

    cdef ChainBatch _out_batch(self, int queue):
        cdef ChainBatch b
        while len(self.out) <= queue:
            b = ChainBatch()
            b._reserve_chains(1)
            b.first[0] = 0
            self.out.append(b)
        return <ChainBatch> self.out[queue]

    def complete(self):
        """Take the completed requests: write their status bytes, gather them per queue.

        Returns a list of ``(queue, batch, read_bytes, written_bytes, errors)``,
        ``batch`` a :class:`~iovirt.virtio._queue_c.ChainBatch` with used
        lengths and device-writable buffers set, valid until the next call.
        An ``O_DIRECT`` request the file system refused (EINVAL) goes again
        through the buffered fd instead of completing.
        """
        cdef int n = 0, i, j, idx, status, queue
        cdef Slot *s
        cdef ChainBatch b
        cdef Py_ssize_t c, k0
        cdef uint32_t k
        cdef bint resubmitted = False
        cdef list finished = []
        for i in range(self.nready):
            finished.append(self.ready[i])
        self.nready = 0
        if self.uring != NULL:
            n = iovirt_uring_reap(self.uring, self.tags, self.results, 2 * self.nslots)
            for i in range(n):
                if self.tags[i] != IOVIRT_TAG_NONE:
                    self.slots[self.tags[i]].result = self.results[i]
                    finished.append(<int> self.tags[i])
        elif self.pool is not None and self.pool.in_flight:
            for idx, result in self.pool.reap():
                self.slots[idx].result = result
                finished.append(idx)
        if not finished:
            return []
        for b in self.out:
            b.n = 0
            b.nbufs = 0
        stats = {}
        for idx in finished:
            s = &self.slots[idx]
            if s.op == OP_NONE:
                status = s.result
            else:
                if s.direct and s.result == -EINVAL:
                    s.direct = False
                    s.fd = self.fallback_fd
                    resubmitted |= self._start(idx)
                    continue
                ok = s.result == <int> s.nbytes if s.op != OP_FLUSH else s.result == 0
                if ok and self.hook_fail is not None and self.hook_fail(OP_NAMES[s.op], s.offset, s.nbytes):
                    ok = False
                status = S_OK if ok else S_IOERR
            s.status[0] = <uint8_t> status
            queue = s.queue
            b = self._out_batch(queue)
            c = b.n
            b._reserve_chains(c + 1)
            k0 = b.first[c]
            b._reserve_bufs(k0 + s.nbufs)
            b.heads[c] = s.head
            b.used_lens[c] = s.used_len
            for k in range(s.nbufs):
                b.addrs[k0 + k] = s.addrs[k]
                b.lens[k0 + k] = s.lens[k]
                b.writable[k0 + k] = 1
                b.hosts[k0 + k] = s.hosts[k]
            b.first[c + 1] = k0 + s.nbufs
            b.nbufs = k0 + s.nbufs
            b.n = c + 1
            counts = stats.get(queue)
            if counts is None:
                counts = stats[queue] = [0, 0, 0]
            if status != S_OK:
                counts[2] += 1
            elif s.op == OP_READ:
                counts[0] += s.nbytes
            elif s.op == OP_WRITE:
                counts[1] += s.nbytes
            self.free_list[self.nfree] = idx
            self.nfree += 1
        if resubmitted:
            iovirt_uring_submit(self.uring)
        return [(q, self.out[q], n0, n1, n2) for q, (n0, n1, n2) in stats.items()]
