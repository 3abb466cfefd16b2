"""The device-state stream (iovirt/vhost_user/devstate.py): round trips, every refusal, the pipe transfer."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib

import pytest
from hypothesis import given, strategies as st

from iovirt.vhost_user.devstate import (
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MAX_STATE_BYTES,
    DeviceStateError,
    Problem,
    Transfer,
    check_channel,
    decode,
    encode,
)
from iovirt.vhost_user.messages import TransferDirection

NET, BLK = 1, 2
SAVE, LOAD = TransferDirection.SAVE, TransferDirection.LOAD

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
states = st.dictionaries(st.text(max_size=12), json_values, max_size=6)


def stream(payload: bytes, *, magic=MAGIC, version=FORMAT_VERSION, device_id=NET, reserved=0, length=None, crc=None):
    length = len(payload) if length is None else length
    crc = zlib.crc32(payload) if crc is None else crc
    return HEADER.pack(magic, version, device_id, reserved, length, crc) + payload


def refused(data: bytes, device_id: int = NET) -> DeviceStateError:
    with pytest.raises(DeviceStateError) as info:
        decode(data, device_id)
    return info.value


@given(states, st.integers(1, 0xFFFF))
def test_round_trip(state, device_id):
    assert decode(encode(device_id, state), device_id) == state


@given(states, st.data())
def test_every_truncation_is_refused_as_truncated(state, data):
    full = encode(NET, state)
    cut = data.draw(st.integers(0, len(full) - 1))
    assert refused(full[:cut]).problem is Problem.TRUNCATED


@given(states, st.data())
def test_a_flipped_payload_bit_is_refused_as_corrupt(state, data):
    full = bytearray(encode(NET, state))
    bit = data.draw(st.integers(HEADER.size * 8, len(full) * 8 - 1))
    full[bit // 8] ^= 1 << bit % 8
    assert refused(bytes(full)).problem is Problem.CORRUPT


def test_header_is_24_bytes_little_endian():
    data = encode(BLK, {"a": 1})
    assert data[:8] == b"IOVIRTDS"
    assert struct.unpack_from("<HHIII", data, 8) == (FORMAT_VERSION, BLK, 0, len(data) - 24, zlib.crc32(data[24:]))


@pytest.mark.parametrize(
    "data, problem, words",
    [
        (b"", Problem.TRUNCATED, "0 bytes"),
        (stream(b'{"a":1}', magic=b"NOTSTATE"), Problem.CORRUPT, "magic"),
        (stream(b'{"a":1}', crc=1), Problem.CORRUPT, "CRC-32"),
        (stream(b'{"a":'), Problem.CORRUPT, "JSON"),
        (stream(b"\xff\xfe"), Problem.CORRUPT, "UTF-8"),
        (stream(b"[1, 2]"), Problem.CORRUPT, "not an object"),
        (stream(b'{"a":1}', version=0), Problem.CORRUPT, "version 0"),
        (stream(b'{"a":1}', reserved=1), Problem.CORRUPT, "reserved"),
        (stream(b'{"a":1}') + b"x", Problem.CORRUPT, "after"),
        (stream(b'{"a":1}', length=MAX_STATE_BYTES + 1), Problem.CORRUPT, "limit"),
        (stream(b'{"a":1}', length=100), Problem.TRUNCATED, "header says 100"),
        (stream(b'{"a":1}', device_id=BLK), Problem.DEVICE_TYPE, "virtio ID 2"),
        (stream(b'{"a":1}', version=FORMAT_VERSION + 1), Problem.VERSION, f"version {FORMAT_VERSION + 1}"),
    ],
)
def test_refusals_name_the_problem(data, problem, words):
    error = refused(data)
    assert error.problem is problem
    assert words in str(error) and problem.value in str(error)


def test_a_newer_version_is_refused_before_its_payload_is_read():
    # A newer format may lay its payload out differently: nothing past the header is judged.
    assert refused(stream(b"\0not json", version=FORMAT_VERSION + 1, crc=0)).problem is Problem.VERSION


# -- the transfer --------------------------------------------------------------------------


def read_all(fd: int, timeout: float = 5.0) -> bytes:
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise AssertionError("no end of file")


def test_check_channel_refuses_the_wrong_end():
    r, w = os.pipe()
    try:
        check_channel(w, SAVE)
        check_channel(r, LOAD)
        with pytest.raises(DeviceStateError, match="not writable"):
            check_channel(r, SAVE)
        with pytest.raises(DeviceStateError, match="not readable"):
            check_channel(w, LOAD)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(DeviceStateError, match="fd"):
        check_channel(r, LOAD)


def test_a_small_save_finishes_without_a_thread():
    r, w = os.pipe()
    before = threading.active_count()
    transfer = Transfer(w, SAVE, b"state")
    transfer.start()
    assert transfer.wait(0) and transfer.error is None
    assert threading.active_count() == before
    assert read_all(r) == b"state"
    os.close(r)


def test_a_save_bigger_than_the_pipe_goes_through_the_helper_thread():
    data = os.urandom(MAX_STATE_BYTES)
    r, w = os.pipe()
    transfer = Transfer(w, SAVE, data)
    transfer.start()
    assert not transfer.wait(0)  # a pipe holds 64 KiB: the rest waits for the reader
    assert read_all(r) == data
    os.close(r)
    assert transfer.wait(5) and transfer.error is None


def test_a_save_whose_reader_goes_away_fails():
    r, w = os.pipe()
    transfer = Transfer(w, SAVE, os.urandom(1 << 20))
    transfer.start()
    os.read(r, 1000)
    os.close(r)
    assert transfer.wait(5)
    assert "closed the channel after" in transfer.error


def test_load_reads_to_end_of_file():
    data = os.urandom(300_000)
    r, w = os.pipe()
    transfer = Transfer(r, LOAD)
    transfer.start()
    os.write(w, data[:1000])
    assert not transfer.wait(0.05)
    writer = threading.Thread(target=lambda: (os.write(w, data[1000:]), os.close(w)))
    writer.start()
    assert transfer.wait(5) and transfer.error is None
    writer.join()
    assert bytes(transfer.received) == data


def test_load_gives_up_on_a_front_end_that_never_closes():
    r, w = os.pipe()
    transfer = Transfer(r, LOAD, timeout=0.3)
    transfer.start()
    assert transfer.wait(5)
    assert "did not close its end" in transfer.error
    with pytest.raises(OSError):
        os.fstat(r)  # the transfer closed its end
    os.close(w)


def test_load_refuses_an_endless_stream():
    r, w = os.pipe()
    transfer = Transfer(r, LOAD)
    transfer.start()
    chunk = b"\0" * (1 << 16)
    try:
        while not transfer.wait(0):
            os.write(w, chunk)
    except BrokenPipeError:
        pass
    assert transfer.wait(5)
    assert "more than" in transfer.error
    os.close(w)


def test_cancel_ends_the_helper_thread_and_closes_the_channel():
    r, w = os.pipe()
    transfer = Transfer(r, LOAD)
    transfer.start()
    transfer.cancel()
    assert transfer.wait(5)
    assert "cancelled" in transfer.error
    os.close(w)


def test_json_payload_is_plain_and_sorted():
    data = encode(NET, {"b": 1, "a": [True, None]})
    assert json.loads(data[HEADER.size:]) == {"a": [True, None], "b": 1}
    assert data[HEADER.size:] == b'{"a":[true,null],"b":1}'
