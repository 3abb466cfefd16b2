"""virtio-net's batch data path: the Cython twin where it can run, else the Python reference.

``_datapath_c`` (Cython) and ``_datapath_py`` (the readable reference) have
the same functions with the same results; :mod:`iovirt._accel` decides
whether the C one loads (``accel`` is it, or ``None``).  The C functions read
the Cython queue's flat batches and the C :class:`Frames`, so each call here
picks the C twin only for such a queue (:func:`~iovirt.virtio.queue.is_accelerated`)
and frames; with the reference queue the Python twin runs even when the
extension is built.
"""

from __future__ import annotations

from typing import Any, Sequence

from iovirt import _accel
from iovirt.virtio.net import _datapath_py
from iovirt.virtio.queue import SplitQueue, is_accelerated

__all__ = [
    "Frames", "IMPLEMENTATION", "accel", "tx_gather", "rx_scatter", "complete_pending", "forward", "forward_job",
    "send_job", "receive_job",
]

accel: Any = _accel.load("iovirt.virtio.net._datapath_c")
IMPLEMENTATION = "cython" if accel is not None else "python"

Frames: Any = accel.Frames if accel is not None else _datapath_py.Frames
"""The frames buffer of the twin that runs (both twins take either)."""


def _c_frames(frames: object) -> bool:
    return accel is not None and isinstance(frames, accel.Frames)


def tx_gather(batch: Any, queue: Any, hdr_len: int, frames: Any, gso_mask: int) -> int:
    """Append the frames of transmit ``batch`` (popped from ``queue``) to ``frames``; returns how many.

    Chains with a short or long frame, bad checksum offsets or a GSO type
    not in ``gso_mask`` are counted in ``frames.errors`` (by ``TX_*`` reason).
    """
    if is_accelerated(queue) and _c_frames(frames):
        return accel.tx_gather(batch, queue, hdr_len, frames, gso_mask)
    return _datapath_py.tx_gather(batch, queue, hdr_len, frames, gso_mask)


def complete_pending(frames: Any, indexes: Sequence[int]) -> None:
    """Fill in the pending checksum (NEEDS_CSUM) of frames ``indexes``, in place (5.1.6.3)."""
    if _c_frames(frames):
        accel.complete_pending(frames, list(indexes))
    else:
        _datapath_py.complete_pending(frames, indexes)


def rx_scatter(
    queue: Any, frames: Any, indexes: list[int], hdr_len: int, guest_csum: bool, mergeable: bool, batch: Any
) -> tuple[int, int, int, int]:
    """Write frames ``indexes`` into receive chains of ``queue``, one chain each, with one used idx update.

    Returns ``(delivered, dropped, stopped_at, delivered_bytes)``: from
    ``stopped_at`` on, the caller delivers the frames (chains ran out, or
    with ``mergeable`` a frame needs several chains).  ``batch`` is a
    reusable :class:`~iovirt.virtio.queue.ChainBatch` for the C twin.
    """
    if is_accelerated(queue) and _c_frames(frames):
        return accel.rx_scatter(queue, frames, indexes, hdr_len, guest_csum, mergeable, batch)
    return _datapath_py.rx_scatter(queue, frames, indexes, hdr_len, guest_csum, mergeable)


Forwarded = tuple[int, int, int, int, int, int, int, int, int, bool, bool]
"""``forward``'s answer: (stopped, batches, tx_frames, tx_bytes, delivered, rx_bytes, dropped, over_mtu, stop,
tx_notify, rx_notify)."""


def _fast_ring(queue: Any) -> bool:
    """Whether the C loops (:func:`forward` and the kick jobs) may take ``queue``: the Cython split queue, C twin loaded."""
    return accel is not None and is_accelerated(queue) and type(queue) is SplitQueue


def _forwards(tx: Any, rx: Any, frames: Any) -> bool:
    """Whether :func:`forward` runs between ``tx`` and ``rx``: both :func:`_fast_ring`, ``frames`` C ones."""
    return _fast_ring(tx) and _fast_ring(rx) and _c_frames(frames)


def forward(
    tx: Any, tx_batch: Any, frames: Any, hdr_len: int, gso_mask: int, src: int, dst: int, rx: Any, rx_batch: Any,
    rx_hdr_len: int, guest_csum: bool, mergeable: bool, max_len: int, max_chains: int, max_batches: int,
) -> Forwarded | None:
    """The whole batch loop of one flow in C, with the GIL released: transmit queue ``tx`` straight into ``rx``.

    Batches of up to ``max_chains`` chains are popped from ``tx``, gathered
    into ``frames`` (as :func:`tx_gather`) and returned; while every frame
    of a batch is from ``src`` to ``dst`` (48-bit MACs) they are written into
    ``rx`` (as :func:`rx_scatter`), up to ``max_batches`` batches.  See
    ``_datapath_c.forward`` for the answer and where it stops (``defs.FORWARD_*``).

    ``None`` where only the caller's own loop can: without the C twin, or
    for a queue that is not the Cython split queue (packed, the reference,
    or a wrapped one).  That loop is the reference: the same batches, the
    same frames delivered and counted, the same notifications.
    """
    if not _forwards(tx, rx, frames):
        return None
    answer: Forwarded = accel.forward(
        tx, tx_batch, frames, hdr_len, gso_mask, src, dst, rx, rx_batch, rx_hdr_len, guest_csum, mergeable,
        max_len, max_chains, max_batches,
    )
    return answer


def forward_job(
    tx: Any, tx_batch: Any, frames: Any, hdr_len: int, gso_mask: int, src: int, dst: int, rx: Any, rx_batch: Any,
    rx_hdr_len: int, guest_csum: bool, mergeable: bool, max_len: int, max_chains: int, max_batches: int,
) -> Any:
    """:func:`forward` on every kick of ``tx``, as a kick job (``iovirt/virtio/kickjob.py``), or None where it does not run.

    ``_datapath_c.ForwardJob``: each run is one :func:`forward` call with
    these arguments; ``take()`` gives what the runs did and where the last
    one stopped.  None, as :func:`forward` answers None, and when a ring is
    not one it serves now (``ready()``).
    """
    if not _forwards(tx, rx, frames):
        return None
    job = accel.ForwardJob(
        tx, tx_batch, frames, hdr_len, gso_mask, src, dst, rx, rx_batch, rx_hdr_len, guest_csum, mergeable,
        max_len, max_chains, max_batches,
    )
    return job if job.ready() else None


def send_job(
    tx: Any, tx_batch: Any, frames: Any, channel: Any, hdr_len: int, gso_mask: int, src: int, dst: int,
    max_chains: int, max_batches: int,
) -> Any:
    """The transmit loop of one flow whose port another worker serves, as a kick job, or None where it does not run.

    ``_datapath_c.SendJob``: batches of frames from ``src`` to ``dst`` go
    from ``tx`` into ``channel`` (a ``FrameChannel``,
    ``iovirt/virtio/net/crossing.py``); None without the C twin, or for a
    queue or frames :func:`forward` would not take, or a ring it does not
    serve now.
    """
    if not (_fast_ring(tx) and _c_frames(frames)):
        return None
    job = accel.SendJob(tx, tx_batch, frames, channel, hdr_len, gso_mask, src, dst, max_chains, max_batches)
    return job if job.ready() else None


def receive_job(
    channel: Any, rx: Any, rx_batch: Any, rx_hdr_len: int, guest_csum: bool, mergeable: bool, max_len: int,
    max_chains: int, max_batches: int,
) -> Any:
    """Receive queue ``rx`` taking the batches of ``channel`` as a kick job (``_datapath_c.ReceiveJob``), or None.

    None where it does not run: without the C twin, for a queue that is
    not the Cython split queue, or a ring it does not serve now.
    """
    if not _fast_ring(rx):
        return None
    job = accel.ReceiveJob(channel, rx, rx_batch, rx_hdr_len, guest_csum, mergeable, max_len, max_chains, max_batches)
    return job if job.ready() else None
