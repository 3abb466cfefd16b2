# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""A worker's event loop in C: kicks whose queue has a kick job are served without the interpreter.

The C side of ``kickloop.py`` (which says when a job holds and what Python
does around it).  :meth:`KickLoop.run` waits on the worker's epoll set
with the GIL released; a kick of an armed ring runs its job
(``iovirt/virtio/kickjob.py``) and writes the call eventfds it asks for;
a job is armed on both its rings (a receiver posting buffers runs it too).
A job that waits on its other ring (``JOB_WAIT``) goes to Python if that
ring stays silent for ``WAIT_MS``.
Everything else (another fd, a ring not armed, a job that stops for
Python, an entry armed before the last :meth:`KickLoop.invalidate`) ends
the run and goes back to Python, as does the end of ``timeout_ms``.

The loop holds its mutex while it touches rings; :meth:`KickLoop.hold`
takes it (and invalidates every entry), so a thread that changes what the
worker serves (the control thread, under the worker's lock) never runs
beside a job.
"""

from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport realloc, free
from libc.string cimport memcpy, memset
from libc.errno cimport errno, EINTR

from iovirt.virtio import kickjob

cdef extern from "sys/epoll.h" nogil:
    ctypedef union epoll_data_t:
        int fd
        uint64_t u64
    cdef struct epoll_event:
        unsigned events
        epoll_data_t data
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "unistd.h" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "time.h" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_MONOTONIC

cdef extern from "pthread.h" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_destroy(pthread_mutex_t *m)

ctypedef int (*job_fn)(void *context, unsigned *notify) noexcept nogil

cdef int JOB_AGAIN = kickjob.JOB_AGAIN, JOB_PYTHON = kickjob.JOB_PYTHON, JOB_WAIT = kickjob.JOB_WAIT
cdef unsigned NOTIFY_KICKED = kickjob.NOTIFY_KICKED, NOTIFY_OTHER = kickjob.NOTIFY_OTHER

DEF MAX_EVENTS = 64
DEF WAIT_MS = 1  # how long a job may wait for its other ring (JOB_WAIT) before Python takes the ring

cdef enum:
    NONE = 0
    JOB = 1


cdef struct Entry:
    int kind
    uint64_t epoch  # armed in this epoch; any other: not armed
    job_fn run
    void *context
    int call_kicked, call_other  # eventfds the job's notifications go to
    int kicked_fd  # the kick fd of the job's kicked ring (this one, or the other ring's job): what Python serves
    bint again  # the job had more: it runs again without a kick
    long long wait_until  # JOB_WAIT since: Python takes the ring at this time (ms), unless the job moves; or 0
    bint listed  # in KickLoop.waiting
    uint64_t kicks, calls_kicked, calls_other
    unsigned failed  # notifications whose write failed (the eventfd full): Python sends them


cdef class KickLoop:
    """Kick jobs on the rings of one epoll set (a worker's), by fd; see the module docstring."""

    cdef int epfd
    cdef Entry *entries
    cdef int cap
    cdef uint64_t epoch
    cdef pthread_mutex_t mutex
    cdef int *again  # rings whose job had more to do: run again without a kick
    cdef int *todo  # run's copy of ``again``
    cdef int nagain
    cdef int *waiting  # rings whose job waits (JOB_WAIT); entries whose wait_until is 0 are dropped lazily
    cdef int nwaiting
    cdef readonly uint64_t runs  # job runs, all told (how much the C loop served)

    def __cinit__(self):
        self.entries = NULL
        self.again = NULL
        self.todo = NULL
        self.waiting = NULL
        self.cap = 0
        pthread_mutex_init(&self.mutex, NULL)

    def __init__(self, int epfd):
        self.epfd = epfd
        self.epoch = 1

    def __dealloc__(self):
        free(self.entries)
        free(self.again)
        free(self.todo)
        free(self.waiting)
        pthread_mutex_destroy(&self.mutex)

    cdef Entry *_entry(self, int fd) except NULL:
        cdef int cap = self.cap
        cdef void *p
        if fd >= cap:
            cap = max(fd + 1, 2 * cap, 64)
            p = realloc(self.entries, cap * sizeof(Entry))
            if p == NULL:
                raise MemoryError()
            self.entries = <Entry *> p
            memset(&self.entries[self.cap], 0, (cap - self.cap) * sizeof(Entry))
            p = realloc(self.again, cap * sizeof(int))
            if p == NULL:
                raise MemoryError()
            self.again = <int *> p
            p = realloc(self.todo, cap * sizeof(int))
            if p == NULL:
                raise MemoryError()
            self.todo = <int *> p
            p = realloc(self.waiting, cap * sizeof(int))
            if p == NULL:
                raise MemoryError()
            self.waiting = <int *> p
            self.cap = cap
        return &self.entries[fd]

    def arm_job(self, int fd, uintptr_t run, uintptr_t context, int call_kicked, int call_other, int kicked_fd):
        """Serve kicks of ring ``fd`` with the job at ``run(context, ...)`` until :meth:`invalidate`.

        ``kicked_fd``: the kick fd of the job's kicked ring (``fd`` itself,
        or the ring it waits on): the ring Python serves when the job stops.
        """
        cdef Entry *e = self._entry(fd)
        memset(e, 0, sizeof(Entry))
        e.kind, e.epoch, e.run, e.context = JOB, self.epoch, <job_fn> run, <void *> context
        e.call_kicked, e.call_other, e.kicked_fd = call_kicked, call_other, kicked_fd

    def again_now(self, int fd):
        """Run ring ``fd``'s job again on the next turn without a kick, if one is armed; whether one is."""
        if not 0 <= fd < self.cap:
            return False
        cdef Entry *e = &self.entries[fd]
        if e.kind != JOB or e.epoch != self.epoch:
            return False
        if not e.again:
            e.again = True
            self.again[self.nagain] = fd
            self.nagain += 1
        return True

    def invalidate(self):
        """Every entry stops holding (the caller runs on the worker, or holds the loop: :meth:`hold`)."""
        self.epoch += 1

    def hold(self):
        """Wait until the loop touches no ring, keep it so until :meth:`release`; every entry stops holding."""
        with nogil:
            pthread_mutex_lock(&self.mutex)
        self.invalidate()

    def release(self):
        """Let the loop run jobs again (after :meth:`hold`)."""
        pthread_mutex_unlock(&self.mutex)

    def take_counts(self, int fd):
        """``(kicks, calls to the kicked ring, calls to the other, failed notify bits)`` of ``fd`` since the last call."""
        if fd >= self.cap:
            return 0, 0, 0, 0
        cdef Entry *e = &self.entries[fd]
        answer = (e.kicks, e.calls_kicked, e.calls_other, e.failed)
        e.kicks = e.calls_kicked = e.calls_other = 0
        e.failed = 0
        return answer

    def take_again(self):
        """The rings whose job had more to do, or waited, when the loop stopped (no kick will come for it): Python's now."""
        cdef Entry *e
        fds = []
        for i in range(self.nagain):
            e = &self.entries[self.again[i]]
            e.again = False
            if e.kicked_fd not in fds:
                fds.append(e.kicked_fd)
        self.nagain = 0
        for i in range(self.nwaiting):
            e = &self.entries[self.waiting[i]]
            e.listed = False
            if e.wait_until:
                e.wait_until = 0
                if e.kicked_fd not in fds:
                    fds.append(e.kicked_fd)
        self.nwaiting = 0
        return fds

    def run(self, int timeout_ms):
        """Serve armed kicks until something is Python's, or ``timeout_ms`` ran out (-1: no end).

        Returns ``(fds, resume)``: fds that were ready and are not armed (for
        the caller to serve as it does), and rings whose job stopped for
        Python or stopped holding with work left (their kick was taken: the
        caller serves them without one).  Jobs with more to do when the
        time ran out are :meth:`take_again`'s.
        """
        cdef epoll_event events[MAX_EVENTS]
        cdef int out[MAX_EVENTS]
        cdef int resume[2 * MAX_EVENTS]
        cdef int n, i, fd, nout = 0, nresume = 0, wait, count
        cdef bint first = True
        cdef Entry *e
        cdef long long deadline = 0, left
        if timeout_ms >= 0:
            deadline = _now_ms() + timeout_ms
        with nogil:
            while True:
                wait = timeout_ms
                if timeout_ms >= 0:
                    left = deadline - _now_ms()
                    if left <= 0 and not first:
                        break
                    wait = <int> left if left > 0 else 0
                first = False
                if self.nagain:
                    wait = 0
                elif self.nwaiting:
                    left = self._next_wait() - _now_ms()
                    if left < 0:
                        left = 0
                    if wait < 0 or left < wait:
                        wait = <int> left
                n = epoll_wait(self.epfd, events, MAX_EVENTS, wait)
                if n < 0:
                    break  # EINTR: Python looks at its signals and comes back
                pthread_mutex_lock(&self.mutex)
                for i in range(n):
                    fd = events[i].data.fd
                    e = &self.entries[fd] if 0 <= fd < self.cap else NULL
                    if e == NULL or e.kind == NONE or e.epoch != self.epoch:
                        out[nout] = fd
                        nout += 1
                        continue
                    _drain(fd)
                    e.kicks += 1
                    if not e.again:
                        self._run_job(fd, e, resume, &nresume)
                # The jobs that had more, once each (those that have more again go back on the list).
                count = self.nagain
                memcpy(self.todo, self.again, count * sizeof(int))
                self.nagain = 0
                for i in range(count):
                    fd = self.todo[i]
                    e = &self.entries[fd]
                    e.again = False
                    if e.epoch != self.epoch:  # held meanwhile: Python serves the rest
                        _add(resume, &nresume, e.kicked_fd)
                        continue
                    self._run_job(fd, e, resume, &nresume)
                if self.nwaiting:
                    self._expire(resume, &nresume)
                pthread_mutex_unlock(&self.mutex)
                if nout or nresume:
                    break
        return [out[i] for i in range(nout)], [resume[i] for i in range(nresume)]

    cdef long long _next_wait(self) noexcept nogil:
        """The earliest time a waiting job's ring goes to Python (ms)."""
        cdef long long soonest = 0, until
        cdef int i
        for i in range(self.nwaiting):
            until = self.entries[self.waiting[i]].wait_until
            if until and (soonest == 0 or until < soonest):
                soonest = until
        return soonest if soonest else _now_ms() + 1000

    cdef void _expire(self, int *resume, int *nresume) noexcept nogil:
        """Rings whose job waited too long for its other ring (a receiver that posts no buffer): Python's."""
        cdef long long now = _now_ms()
        cdef int i = 0, fd
        cdef Entry *e
        while i < self.nwaiting:
            fd = self.waiting[i]
            e = &self.entries[fd]
            if e.wait_until and e.epoch == self.epoch and now < e.wait_until:
                i += 1
                continue
            if e.wait_until:  # expired, or held meanwhile
                e.epoch = 0
                _add(resume, nresume, e.kicked_fd)
            e.wait_until = 0
            e.listed = False
            self.nwaiting -= 1
            self.waiting[i] = self.waiting[self.nwaiting]

    cdef void _moved(self, void *context) noexcept nogil:
        """The job at ``context`` moved: no ring waits on it any more."""
        cdef int i
        for i in range(self.nwaiting):
            if self.entries[self.waiting[i]].context == context:
                self.entries[self.waiting[i]].wait_until = 0

    cdef void _run_job(self, int fd, Entry *e, int *resume, int *nresume) noexcept nogil:
        """Run ``e``'s job once: its notifications written; more to do: again; waiting: a deadline; stopped: Python's."""
        cdef unsigned notify = 0
        cdef int rc
        if e.epoch != self.epoch:
            return
        rc = e.run(e.context, &notify)
        self.runs += 1
        if rc == JOB_WAIT:
            if not e.wait_until:
                e.wait_until = _now_ms() + WAIT_MS + 1  # a whole WAIT_MS at least, whatever the clock's phase
            if not e.listed:
                e.listed = True
                self.waiting[self.nwaiting] = fd
                self.nwaiting += 1
        elif self.nwaiting:
            self._moved(e.context)
        if notify & NOTIFY_KICKED:
            if _signal(e.call_kicked):
                e.calls_kicked += 1
            else:
                e.failed |= NOTIFY_KICKED
        if notify & NOTIFY_OTHER:
            if _signal(e.call_other):
                e.calls_other += 1
            else:
                e.failed |= NOTIFY_OTHER
        if rc == JOB_AGAIN:
            e.again = True
            self.again[self.nagain] = fd
            self.nagain += 1
        elif rc == JOB_PYTHON:
            e.epoch = 0  # Python's now: until it arms the ring again
            _add(resume, nresume, e.kicked_fd)


cdef inline void _add(int *fds, int *n, int fd) noexcept nogil:
    """Add ``fd`` to the list ``fds`` of ``n[0]`` (at most 2 * MAX_EVENTS), once."""
    cdef int i
    for i in range(n[0]):
        if fds[i] == fd:
            return
    if n[0] < 2 * MAX_EVENTS:  # (more rings than that stopping in one turn: the rest are served on a later turn)
        fds[n[0]] = fd
        n[0] += 1


cdef inline long long _now_ms() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return now.tv_sec * 1000LL + now.tv_nsec // 1000000


cdef inline void _drain(int fd) noexcept nogil:
    cdef uint64_t value
    read(fd, &value, 8)  # EAGAIN: someone else drained it, fine


cdef inline bint _signal(int fd) noexcept nogil:
    cdef uint64_t one = 1
    return write(fd, &one, 8) == 8
