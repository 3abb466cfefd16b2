"""The frame channel between two workers (``_datapath_c.FrameChannel``; ``iovirt/virtio/net/crossing.py``).

A single-producer, single-consumer ring of batches: batches come out whole
and in order, a full channel takes nothing, the sender learns when the
receiver may sleep (the ring was empty), and a thread pushing while another
pops loses and reorders nothing.
"""

from __future__ import annotations

import threading

import pytest

from iovirt.virtio.net import datapath
from iovirt.virtio.net.defs import CHANNEL_FULL, CHANNEL_PUSHED, CHANNEL_WAS_EMPTY

pytestmark = pytest.mark.skipif(datapath.accel is None, reason="the frame channel is the C twin's")


def batch(first: int, n: int):
    frames = datapath.Frames()
    for i in range(first, first + n):
        frames.append(b"\x02" + bytes(5) + b"\x02" + bytes(5) + b"\x08\x00" + i.to_bytes(4, "big") + bytes(46),
                      (14, 16) if i % 2 else None)
    return frames


def seq(frames, start: int = 0) -> list[int]:
    return [int.from_bytes(frames.frame(i)[14:18], "big") for i in range(start, len(frames))]


def test_batches_come_out_whole_and_in_order_with_their_checksums():
    channel = datapath.accel.FrameChannel(4)
    source = batch(0, 8)
    assert channel.front() is None and len(channel) == 0
    assert channel.push(source, [1, 3, 5]) == CHANNEL_WAS_EMPTY
    assert channel.push(source, [0, 2]) == CHANNEL_PUSHED
    assert len(channel) == 2
    frames, start = channel.front()
    assert (seq(frames), start) == ([1, 3, 5], 0)
    assert [frames.csum(i) for i in range(3)] == [(14, 16)] * 3
    assert channel.pop() is False  # the sender did not ask to be told
    frames, _ = channel.front()
    assert seq(frames) == [0, 2] and frames.csum(0) is None
    channel.pop()
    assert channel.front() is None
    with pytest.raises(IndexError):
        channel.pop()


def test_a_full_channel_takes_nothing_and_a_slot_is_reused_once_freed():
    channel = datapath.accel.FrameChannel(2)
    assert channel.push(batch(0, 1), [0]) == CHANNEL_WAS_EMPTY
    assert channel.push(batch(1, 1), [0]) == CHANNEL_PUSHED
    assert channel.push(batch(2, 1), [0]) == CHANNEL_FULL
    assert len(channel) == 2
    channel.pop()
    assert channel.push(batch(3, 1), [0]) == CHANNEL_PUSHED  # not empty: the receiver is awake
    assert [seq(channel.front()[0])] == [[1]]
    channel.pop()
    assert seq(channel.front()[0]) == [3]


@pytest.mark.parametrize("capacity", [1, 3, 0])
def test_a_capacity_that_is_not_a_power_of_two_is_refused(capacity):
    with pytest.raises(ValueError, match="power of two"):
        datapath.accel.FrameChannel(capacity)


def test_a_sender_and_a_receiver_on_two_threads_lose_and_reorder_nothing():
    channel = datapath.accel.FrameChannel(8)
    total, got = 3000, []

    def send() -> None:
        sent = 0
        while sent < total:
            n = min(1 + sent % 7, total - sent)
            if channel.push(batch(sent, n), list(range(n))) != CHANNEL_FULL:
                sent += n

    def receive() -> None:
        while len(got) < total:
            item = channel.front()
            if item is None:
                continue
            got.extend(seq(item[0], item[1]))
            channel.pop()

    threads = [threading.Thread(target=send), threading.Thread(target=receive)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert got == list(range(total))
