"""virtio-net's batch data path in Python: the readable reference of ``_datapath_c.pyx``.

The same functions with the same results, one chain at a time through the
queue's public API (``DescChain``, ``read_chain``, ``write_chain``), so they
run on either queue implementation and on either :class:`Frames`:

- :func:`tx_gather` copies each transmit chain's ``virtio_net_hdr`` + frame
  into :class:`Frames`, checking the header (virtio 1.2 5.1.6.2) and cutting
  host TSO frames into segments;
- :func:`rx_scatter` writes frames into receive chains, one chain each, with
  their ``virtio_net_hdr`` (5.1.6.3, 5.1.6.4);
- :func:`complete_pending` fills in partial checksums (NEEDS_CSUM) in place.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from iovirt.virtio.chain import DescChain, read_chain, write_chain
from iovirt.virtio.net.csum import complete_checksum, l4_checksum_valid
from iovirt.virtio.net.defs import (
    ETH_HLEN,
    MAX_FRAME,
    NET_HDR_SIZE,
    TX_CSUM,
    TX_GSO,
    TX_LONG,
    TX_SHORT,
    VIRTIO_NET_HDR_F_DATA_VALID,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV6,
    NetHdr,
)
from iovirt.virtio.net.gso import GsoError, tso_segments

__all__ = ["Frames", "tx_gather", "rx_scatter", "complete_pending", "l4_checksum_valid"]

Csum = tuple[int, int] | None


class FrameSource(Protocol):
    """What :func:`rx_scatter` reads of a batch of frames (either twin's :class:`Frames`)."""

    def frame(self, i: int) -> bytes: ...

    def csum(self, i: int) -> Csum: ...


class Frames:
    """Ethernet frames with their pending checksums (``(csum_start, csum_offset)`` or ``None``).

    ``errors`` counts the chains :func:`tx_gather` rejected, by reason
    (short, long, gso, csum: the ``TX_*`` indexes in ``defs.py``).
    """

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._csums: list[Csum] = []
        self.errors = [0, 0, 0, 0]

    def __len__(self) -> int:
        return len(self._frames)

    def clear(self) -> None:
        """Forget every frame."""
        self._frames.clear()
        self._csums.clear()
        self.errors = [0, 0, 0, 0]

    def append(self, frame: bytes | bytearray | memoryview, csum: Csum = None) -> None:
        """Add one frame (at least 14 bytes) with its pending checksum or ``None``."""
        if len(frame) < ETH_HLEN:
            raise ValueError(f"frame of {len(frame)} bytes is shorter than an Ethernet header")
        self._frames.append(bytes(frame))
        self._csums.append(csum)

    def subset(self, indexes: Sequence[int]) -> "Frames":
        """A new :class:`Frames` holding frames ``indexes`` (with their checksums), in that order."""
        out = Frames()
        out.extend(self, indexes)
        return out

    def extend(self, other: "Frames", indexes: Sequence[int]) -> None:
        """Append frames ``indexes`` of ``other`` (with their checksums), in that order."""
        picked = list(indexes)
        for i in picked:
            other._check(i)
        self._frames.extend([other._frames[i] for i in picked])
        self._csums.extend([other._csums[i] for i in picked])

    def frame(self, i: int) -> bytes:
        """Frame ``i``."""
        self._check(i)
        return self._frames[i]

    def csum(self, i: int) -> Csum:
        """Frame ``i``'s pending checksum, or ``None``."""
        self._check(i)
        return self._csums[i]

    def flow(self, i: int) -> int:
        """Frame ``i``'s flow key: its destination and source MACs as one 96-bit integer."""
        return int.from_bytes(self.frame(i)[:12], "big")

    def macs(self) -> tuple[list[int], list[int]]:
        """``(destination MACs, source MACs)`` of every frame, as 48-bit integers."""
        return (
            [int.from_bytes(f[0:6], "big") for f in self._frames],
            [int.from_bytes(f[6:12], "big") for f in self._frames],
        )

    def total_bytes(self, indexes: Sequence[int] | None = None) -> int:
        """Bytes in the frames (all, or those at ``indexes``)."""
        if indexes is None:
            return sum(len(f) for f in self._frames)
        return sum(len(self.frame(i)) for i in indexes)

    def longer(self, limit: int, indexes: Sequence[int]) -> list[int]:
        """Those of frames ``indexes`` longer than ``limit`` bytes (a receiver's MTU check: usually none)."""
        return [i for i in indexes if len(self.frame(i)) > limit]

    def sources(self) -> list[int]:
        """The distinct source MACs of the frames, in first-seen order (what the switch learns from a batch)."""
        return list(dict.fromkeys(self.macs()[1]))

    def groups(self) -> list[tuple[int, list[int]]]:
        """``[(destination MAC, [frame indexes]), ...]``: the frames grouped by destination, in first-seen order."""
        groups: dict[int, list[int]] = {}
        for i, dst in enumerate(self.macs()[0]):
            groups.setdefault(dst, []).append(i)
        return list(groups.items())

    def fit(self, max_frames: int, max_bytes: int) -> tuple[int, int]:
        """``(count, bytes)`` of the longest run from frame 0 of at most ``max_frames`` frames and ``max_bytes`` bytes."""
        count = nbytes = 0
        for frame in self._frames[: max(max_frames, 0)]:
            if nbytes + len(frame) > max_bytes:
                break
            count += 1
            nbytes += len(frame)
        return count, nbytes

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` frames (all of them if there are fewer)."""
        if n < 0:
            raise ValueError(f"cannot keep {n} frames")
        del self._frames[n:]
        del self._csums[n:]

    def complete_checksum(self, i: int) -> None:
        """Fill in frame ``i``'s pending checksum in place."""
        csum = self.csum(i)
        if csum is None:
            return
        buf = bytearray(self._frames[i])
        complete_checksum(buf, *csum)
        self._frames[i], self._csums[i] = bytes(buf), None

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self._frames):
            raise IndexError(f"frame {i} not in {len(self._frames)}")


def tx_gather(batch: Any, queue: Any, hdr_len: int, out: Any, gso_mask: int = 0) -> int:
    """Gather the frames of transmit ``batch`` into ``out`` (appending); returns how many.

    Same checks as the C twin: a chain shorter than header + Ethernet header,
    longer than 64 KiB + 14, with NEEDS_CSUM offsets outside its frame, or
    with a GSO type not in ``gso_mask`` (the host TSO features negotiated),
    without NEEDS_CSUM or not segmentable is counted in ``out.errors``.
    """
    added = 0
    for chain in batch:
        total = chain.readable_len
        if total < hdr_len + ETH_HLEN:
            out.errors[TX_SHORT] += 1
            continue
        if total - hdr_len > MAX_FRAME:
            out.errors[TX_LONG] += 1
            continue
        data = read_chain(queue.memory, chain)
        hdr = NetHdr.unpack(data[:hdr_len].ljust(NET_HDR_SIZE, b"\0"))
        frame = data[hdr_len:]
        csum = None
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            csum = (hdr.csum_start, hdr.csum_offset)
            if hdr.csum_start >= len(frame) or sum(csum) + 2 > len(frame):
                out.errors[TX_CSUM] += 1
                continue
        if hdr.gso_type == VIRTIO_NET_HDR_GSO_NONE:
            out.append(frame, csum)
            added += 1
            continue
        # GSO needs NEEDS_CSUM (csum_start marks the TCP header) and a negotiated type.
        if hdr.gso_type >= 32 or not gso_mask >> hdr.gso_type & 1 or csum is None:
            out.errors[TX_GSO] += 1
            continue
        try:
            segments = tso_segments(frame, hdr.csum_start, hdr.gso_size, hdr.gso_type == VIRTIO_NET_HDR_GSO_TCPV6)
        except GsoError:
            out.errors[TX_GSO] += 1
            continue
        for segment in segments:
            out.append(segment)
        added += len(segments)
    return added


def complete_pending(frames: Frames, indexes: Sequence[int]) -> None:
    """Complete the pending checksum of every frame at ``indexes`` that has one."""
    for i in indexes:
        frames.complete_checksum(i)


def rx_scatter(
    queue: Any, frames: FrameSource, indexes: Sequence[int], hdr_len: int, guest_csum: bool, mergeable: bool
) -> tuple[int, int, int, int]:
    """Write frames ``indexes`` of ``frames`` into receive chains of ``queue``, one chain each.

    Returns ``(delivered, dropped, stopped_at, delivered_bytes)`` as the C
    twin does: it stops where chains ran out or, with ``mergeable``, at a
    frame that needs more than one chain (given back unused for the caller's
    multi-chain path).  Without MRG_RXBUF a frame too big for its chain is
    dropped, the chain returned empty (5.1.6.3.1).  With ``guest_csum`` a
    pending checksum becomes NEEDS_CSUM and a verified one DATA_VALID
    (5.1.6.4.1); without, the caller completed them.  One used idx update.
    """
    chains: list[DescChain] = list(queue.pop_batch(len(indexes)))
    stop = len(chains)
    delivered = dropped = nbytes = 0
    for j, chain in enumerate(chains):
        frame, csum = frames.frame(indexes[j]), frames.csum(indexes[j])
        if chain.writable_len < hdr_len + len(frame):
            if mergeable:
                stop = j
                break
            chain.used_len = 0
            dropped += 1
            continue
        if csum is not None and guest_csum:
            hdr = NetHdr(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=csum[0], csum_offset=csum[1], num_buffers=1)
        elif guest_csum and l4_checksum_valid(frame):
            hdr = NetHdr(flags=VIRTIO_NET_HDR_F_DATA_VALID, num_buffers=1)
        else:
            hdr = NetHdr(num_buffers=1)  # 5.1.6.4: 1 without MRG_RXBUF, and one chain here
        chain.used_len = write_chain(queue.memory, chain, hdr.pack(hdr_len) + frame)
        delivered += 1
        nbytes += len(frame)
    if stop < len(chains):
        queue.rewind(len(chains) - stop)
    queue.push_batch(chains[:stop])
    return delivered, dropped, stop, nbytes
