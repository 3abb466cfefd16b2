"""The frames a virtio-net port holds while its driver has posted no receive buffers.

A switch batch that finds its receiver's ring empty, or short, leaves the
rest of its frames here, oldest first, up to a bound (tail drop beyond it);
the next buffers the driver posts take them first, so the frames keep their
order.  They are held in one ``datapath.Frames`` buffer (the C one where it
is built), not one Python object each: holding what a batch left is one
copy of its frames and writing them out is the batch data path, so a
receiver slower than its senders costs no Python step per frame (64 B port
to port fell to a quarter of Open vSwitch's rate when every frame held was a
``bytes`` object in a deque; ``benchmarks/RESULTS.md``, ninth session).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from iovirt.virtio.net import datapath

Csum = tuple[int, int] | None


class RxBacklog:
    """At most ``maxlen`` frames with their pending checksums, oldest first.

    It reads as a sequence of ``(frame, csum)`` pairs; :meth:`oldest` and
    :meth:`popleft` give the batch data path its frames without copies.
    """

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError(f"a receive backlog holds at least one frame, not {maxlen}")
        self.maxlen = maxlen
        self._frames: Any = datapath.Frames()
        self._first = 0  # frames [0, _first) went out already; kept until a compaction

    def __len__(self) -> int:
        return len(self._frames) - self._first

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, i: int) -> tuple[bytes, Csum]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"backlog index {i} out of range ({n} frames held)")
        at = self._first + (i % n)
        return self._frames.frame(at), self._frames.csum(at)

    def __iter__(self) -> Iterator[tuple[bytes, Csum]]:
        for at in range(self._first, len(self._frames)):
            yield self._frames.frame(at), self._frames.csum(at)

    @property
    def room(self) -> int:
        """How many more frames fit."""
        return self.maxlen - len(self)

    def clear(self) -> None:
        """Drop every frame held."""
        self._frames.clear()
        self._first = 0

    def append(self, frame: bytes, csum: Csum) -> bool:
        """Hold one more frame; False (nothing held) when full."""
        if not self.room:
            return False
        self._compact()
        self._frames.append(frame, csum)
        return True

    def extend(self, frames: Any, indexes: Sequence[int]) -> int:
        """Hold copies of frames ``indexes`` of ``frames`` (a ``datapath.Frames``) while room lasts; how many."""
        take = min(len(indexes), self.room)
        if take:
            self._compact()
            self._frames.extend(frames, indexes[:take])
        return take

    def oldest(self, count: int) -> tuple[Any, list[int]]:
        """``(frames, indexes)``: the oldest ``count`` frames held (fewer if fewer are), for the batch data path.

        The indexes stay valid until the backlog changes.
        """
        return self._frames, list(range(self._first, self._first + min(count, len(self))))

    def popleft(self, count: int = 1) -> None:
        """Forget the oldest ``count`` frames (they went out)."""
        if not 0 <= count <= len(self):
            raise ValueError(f"cannot forget {count} of {len(self)} frames held")
        self._first += count
        if self._first == len(self._frames):
            self.clear()

    def _compact(self) -> None:
        """Copy the frames held to a fresh buffer once as many went out as may be held, so it stays bounded."""
        if self._first >= self.maxlen:
            self._frames = self._frames.subset(range(self._first, len(self._frames)))
            self._first = 0
