"""The entropy device (virtio 1.2 section 5.4): requests filled from os.urandom, a file or a FIFO.

Sources (``source=``):

* ``None``: ``os.urandom``, never short;
* a FIFO: opened read-write and non-blocking, so it never reads as ended
  (writers such as ``rngd`` may come and go) and the data plane never waits
  on it.  A request that finds no data is given back to the ring and
  retried :data:`RETRY_S` later; one that finds some is completed with what
  there is (5.4.6.2: "one or more random bytes");
* a regular file (or any other path): read in order.  When it ends the
  device has nothing more to give, and an entropy device must not make bytes
  up: the end is logged once and the device marks itself as needing a reset
  (2.1.2; vhost-user: the err eventfds), rather than leaving the guest's
  reads to hang without a word.

``rate=`` limits the bytes served per second with the QoS token bucket
(:class:`iovirt.virtio.qos.TokenBucket`, a burst of 0.1 s of the rate, at
least one byte); a request waits in the ring until the bucket holds enough to
fill it (or one burst, for a request larger than the burst), like one that
finds a FIFO empty.  The queue is served again by a data-plane timer
(:attr:`VirtioDevice.call_later`, as blk's QoS does); a transport without a
data plane serves it again at the next kick.

A request that holds a device-readable buffer breaks 5.4.6.1 ("The driver
MUST NOT place driver-readable buffers into the queue"): it is completed
with used length 0, unwritten, and logged once (counted in ``bad_requests``).
"""

from __future__ import annotations

import os
import stat
import time

from iovirt.virtio.chain import write_chain
from iovirt.virtio.device import COMMON_FEATURES, VirtioDevice
from iovirt.virtio.qos import TokenBucket
from iovirt.virtio.queue import SplitQueue
from iovirt.virtio.rng.defs import REQUESTQ, VIRTIO_ID_ENTROPY

RETRY_S = 0.01
"""How soon a request that found a FIFO empty is tried again."""


class SourceEnded(Exception):
    """The entropy file ended: nothing more to serve."""


class EntropySource:
    """Where bytes come from: ``read(n)`` gives at most ``n`` bytes, ``b""`` when none are ready now."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.fd: int | None = None
        self.is_fifo = False
        if path is not None:
            self.is_fifo = stat.S_ISFIFO(os.stat(path).st_mode)
            # O_RDWR on a FIFO (Linux): open never waits for a writer, and reads never see EOF.
            flags = (os.O_RDWR if self.is_fifo else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC
            self.fd = os.open(path, flags)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` if a FIFO has none yet; :class:`SourceEnded` at a file's end."""
        if self.fd is None:
            return os.urandom(n)
        try:
            data = os.read(self.fd, n)
        except BlockingIOError:
            return b""
        if not data and not self.is_fifo:
            raise SourceEnded(f"entropy source {self.path} ended")
        return data

    def close(self) -> None:
        """Close the file or FIFO."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __str__(self) -> str:
        return self.path or "os.urandom"


class VirtioRng(VirtioDevice):
    """An entropy device: every request gets bytes from ``source`` (5.4.6.2), at most ``rate`` bytes/s."""

    device_id = VIRTIO_ID_ENTROPY
    name = "virtio-rng"

    def __init__(self, source: str | None = None, rate: float | None = None, label: str = "rng0",
                 queue_max_size: int = 256) -> None:
        super().__init__(num_queues=1, queue_max_size=queue_max_size, label=label)
        self.source = EntropySource(source)
        self.bucket = TokenBucket(rate) if rate else None
        self._wake_at = 0.0  # when the timer set last fires: one at a time
        self.served_bytes = 0
        self.bad_requests = 0

    def device_features(self) -> int:
        """5.4.3: no device-specific feature bits."""
        return COMMON_FEATURES

    def config_space(self) -> bytes:
        """5.4.4: no configuration space."""
        return b""

    def process_queue(self, index: int, queue: SplitQueue) -> None:
        """Fill every available request with what the source and the rate limit allow now."""
        if index != REQUESTQ or not self.enabled[index]:
            return  # vhost-user "Ring states": a disabled ring has no side effects
        served = 0
        while (chain := queue.pop()) is not None:
            if chain.readable:
                self._bad_request(chain.head, chain.readable_len)
                queue.push(chain.head, 0)
                served += 1
                continue
            want = chain.writable_len
            if self.bucket is not None:
                # Wait until the bucket can fill this request (or one burst), not for a byte at a time.
                need = min(want, int(self.bucket.burst))
                held = int(self.bucket.refill())
                if held < need:
                    queue.rewind(1)
                    self._wake_in(self.bucket.wait_time(need))
                    break
                want = min(want, held)
            try:
                data = self.source.read(want)
            except SourceEnded as exc:
                queue.rewind(1)
                self._signal_served(served)
                self.fail(exc)
                return
            if not data:  # a FIFO with nothing yet; 5.4.6.2 wants at least one byte: try again soon
                queue.rewind(1)
                self._wake_in(RETRY_S)
                break
            if self.bucket is not None:
                self.bucket.take(len(data))
            queue.push(chain.head, write_chain(queue.memory, chain, data))
            self.served_bytes += len(data)
            served += 1
        self._signal_served(served)

    def _signal_served(self, served: int) -> None:
        if served:
            self.signal(REQUESTQ)

    def _bad_request(self, head: int, readable: int) -> None:
        if not self.bad_requests:
            self.log.warning("%s: request %d has %d device-readable bytes (5.4.6.1: the driver must not place "
                             "driver-readable buffers): completed with length 0", self.label, head, readable)
        self.bad_requests += 1

    def _wake_in(self, delay: float) -> None:
        """Serve the queue again in ``delay`` seconds, on the data plane (one timer at a time)."""
        call_later, now = self.call_later, time.monotonic()
        # Past its time (a timer lost to a reset), the next wait sets another.
        if call_later is not None and now >= self._wake_at:
            self._wake_at = now + delay
            call_later(delay, self._wake)

    def _wake(self) -> None:
        """The timer: serve the queue again (a request waited for tokens or FIFO data)."""
        self._wake_at = 0.0
        self.kick(REQUESTQ)
