"""A vhost-user protocol fuzzer: mutated messages from the real message classes, over real sockets.

Each message starts as a plausible one: a payload object of the class
:data:`iovirt.vhost_user.protocol.REQUEST_RULES` names for its code, with
values that fit this connection (the ring addresses and the memfd of its
guest memory), and the fds its rule asks for.  Then, with small
probabilities, it is mutated: payload fields replaced by boundary values
(0, 1, 2^k +- 1, 2^63, 2^64 - 1), header code, flags and size changed, bytes
flipped, the payload cut or padded, the fds dropped, multiplied or replaced by
the wrong kind (pipes, /dev/null, /dev/zero, sockets, memfds of odd sizes, a
memfd shrunk after it was sent, blocking eventfds, an eventfd whose counter is
one below its maximum).  Sequences: a connection plays the bring-up steps
shuffled, repeated, dropped and interleaved with random messages and kicks.

Messages are framed with :func:`iovirt.vhost_user.framing.build_message` and
batched: every message without fds joins the ``sendmsg`` of the one before
(fds travel with the first byte of a ``sendmsg``, so a message with fds
starts a new one).  Replies are drained without parsing; fds they carry are
closed.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import mmap
import os
import random
import select
import socket
import struct
import time
from typing import Any, Callable

from fuzz_harness import Slot
from iovirt.vhost_user.frontend import USER_ADDR_BASE
from iovirt.vhost_user.framing import build_message
from iovirt.vhost_user.messages import (
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_VERSION,
    Config,
    DeviceStateTransfer,
    FrontendRequest as R,
    Inflight,
    IotlbMsg,
    Log,
    MemoryTable,
    MemRegion,
    Rarp,
    SingleMemRegion,
    U64,
    VringAddr,
    VringFile,
    VringState,
)
from iovirt.vhost_user.protocol import REQUEST_RULES, FdRule

MEMORY = 1 << 20
RING_SIZE = 64
SEND_TIMEOUT = 1.0
BATCH = 32
LAST = 24
U64_MAX = (1 << 64) - 1

INTERESTING = [0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x101, 0xFFF, 0x1000, 0x1001, 0xFFFF, 0x10000,
               MEMORY - 1, MEMORY, MEMORY + 1, USER_ADDR_BASE, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1,
               2**63 - 1, 2**63, 2**63 + 1, 2**64 - 2, 2**64 - 1]

FD_KINDS = ["eventfd", "eventfd-blocking", "eventfd-full", "pipe-r", "pipe-w", "devnull", "devzero", "socket",
            "memfd-0", "memfd-1", "memfd-4095", "memfd-4096", "memfd-64k", "memfd-main", "memfd-shrunk"]


def boundary(rng: random.Random, bits: int) -> int:
    """A value of ``bits`` bits, biased to the edges: 0, 1, 2^k +- 1, the interesting list, all ones."""
    roll = rng.random()
    if roll < 0.4:
        value = rng.choice(INTERESTING)
    elif roll < 0.8:
        value = (1 << rng.randrange(bits)) + rng.choice((-1, 0, 1))
    else:
        value = rng.getrandbits(bits)
    return value & ((1 << bits) - 1)


class ProtocolFuzzer:
    """One worker: fuzzes the net and blk sockets of its slot, one connection at a time."""

    def __init__(self, slot: Slot, index: int) -> None:
        self.paths = list(slot.net) + [sock for sock, _image in slot.blk]
        self.index = index
        self.memfd = os.memfd_create(f"fuzz-guest-{index}", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, MEMORY)
        self.memory = mmap.mmap(self.memfd, MEMORY)
        self.sock: socket.socket | None = None
        self.kick_fds: dict[int, int] = {}
        self.shrink: list[int] = []
        self.last: collections.deque[str] = collections.deque(maxlen=LAST)
        self.counters: collections.Counter[str] = collections.Counter()
        self.rng = random.Random(0)
        self.path_index = 0
        self.mute = False
        self.offers: dict[str, tuple[int, int]] = {}
        self.offered = (0, 0)  # (features, protocol features) of the connected device
        self.ring: int | None = None  # the vring a bring-up sequence sets up

    # -- campaign entry points ---------------------------------------------------------
    def run(self, seed: int, count: int) -> dict[str, Any]:
        """Send ``count`` messages from ``seed``; the connection is closed at the end."""
        self.rng = random.Random(seed)
        self.counters = collections.Counter()
        self.last.clear()
        sent = 0
        batch: list[tuple[bytes, list[int]]] = []
        refused = 0
        self._connect()
        # A server that stopped reading makes every send stall: give the epoch up (the canary tells why).
        while sent < count and refused < 10 and self.counters["send_stalls"] < 3:
            if self.sock is None or self.rng.random() < 0.002:
                self._disconnect()
                if not self._connect():
                    refused += 1
                    time.sleep(0.05)
                    continue
            for data, fds in self._next_messages():
                if fds and batch:
                    self._flush(batch)
                    batch = []
                batch.append((data, fds))
                sent += 1
                if len(batch) >= BATCH:
                    self._flush(batch)
                    batch = []
        if batch:
            self._flush(batch)
        self._disconnect()
        return {"units": sent, "counters": dict(self.counters), "last": list(self.last)}

    def close(self) -> None:
        """Free the guest memory."""
        self._disconnect()
        self.memory.close()
        os.close(self.memfd)

    # -- connection ----------------------------------------------------------------------
    def _connect(self) -> bool:
        path = self.paths[self.path_index % len(self.paths)]
        self.path_index += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(SEND_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            self.counters["connect_failed"] += 1
            return False
        self.sock = sock
        if path not in self.offers and not self._ask_offers(path):
            self._drop()
            return False
        self.offered = self.offers[path]
        self.mute = self.rng.random() < 0.001  # a front-end that never reads its replies
        self.counters["connections"] += 1
        if self.rng.random() < 0.3:
            self.memory[: 4 * 4096] = self.rng.randbytes(4 * 4096)  # garbage rings
        else:
            self.memory[: 4 * 4096] = bytes(4 * 4096)
        return True

    def _ask_offers(self, path: str) -> bool:
        """GET_FEATURES and GET_PROTOCOL_FEATURES once per socket, so bring-ups set what is offered."""
        assert self.sock is not None
        flags = VHOST_USER_VERSION
        try:
            self.sock.sendall(build_message(R.VHOST_USER_GET_FEATURES, flags)
                              + build_message(R.VHOST_USER_GET_PROTOCOL_FEATURES, flags))
            data = b""
            while len(data) < 40:
                chunk = self.sock.recv(40 - len(data))
                if not chunk:
                    return False
                data += chunk
        except OSError:
            return False
        self.offers[path] = (U64.unpack(data[12:20]).value, U64.unpack(data[32:40]).value)
        return True

    def _disconnect(self) -> None:
        """Close after the server has read everything (so it is quiet when the harness measures it)."""
        sock, self.sock = self.sock, None
        for fd in self.kick_fds.values():
            os.close(fd)
        self.kick_fds.clear()
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + SEND_TIMEOUT
            while time.monotonic() < deadline:
                data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 16)
                _close(fds)
                if not data:
                    break
            else:
                self.counters["send_stalls"] += 1  # the server did not read to our end in time
        except OSError:
            pass
        sock.close()

    def _flush(self, batch: list[tuple[bytes, list[int]]]) -> None:
        data = b"".join(d for d, _ in batch)
        fds = batch[0][1]
        try:
            if self.sock is None:
                return
            if fds:
                sent = socket.send_fds(self.sock, [data], fds)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
            self._drain()
        except socket.timeout:
            self.counters["send_stalls"] += 1
            self._disconnect()
        except OSError:
            self.counters["server_closed"] += 1
            self._drop()
        finally:
            _close(fds)
        for fd in self.shrink:
            os.ftruncate(fd, self.rng.choice((0, 4096)))
            os.close(fd)
        self.shrink = []

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _drain(self) -> None:
        if self.mute or self.sock is None:
            return
        while select.select([self.sock], [], [], 0)[0]:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 65536, 16)
            _close(fds)
            if not data:
                self.counters["server_closed"] += 1
                self._drop()
                return

    # -- messages ------------------------------------------------------------------------
    def _next_messages(self) -> list[tuple[bytes, list[int]]]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.05 and self.kick_fds:
            self._kick()
            return []
        if roll < 0.35:
            # Negotiation first (mostly), so the rest reaches the states it needs; the rest in any order.
            codes = list(BRINGUP)
            if rng.random() < 0.2:
                rng.shuffle(codes)
            elif rng.random() < 0.5:
                rest = codes[len(NEGOTIATION):]
                rng.shuffle(rest)
                codes = codes[: len(NEGOTIATION)] + rest
            codes = [c for c in codes if rng.random() < 0.9]
            codes += [rng.choice(codes or BRINGUP) for _ in range(rng.randrange(3))]
            self.ring = rng.randrange(2)
            try:
                return [self._message(code) for code in codes]
            finally:
                self.ring = None
        return [self._message(rng.choice(CODES))]

    def _kick(self) -> None:
        index, fd = self.rng.choice(sorted(self.kick_fds.items()))
        # Non-blocking for our own accesses only (the flag is the file's, shared with the server):
        # a kick fd may be one whose counter is full, and the server may drain it first.
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            os.eventfd_write(fd, 1)
            self.counters["kicks"] += 1
            if self.rng.random() < 0.3:
                os.eventfd_read(fd)  # drain it again, as a front-end racing the back-end's read would
        except BlockingIOError:
            pass
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)

    def _message(self, code: int) -> tuple[bytes, list[int]]:
        rng = self.rng
        rule = REQUEST_RULES.get(R(code)) if code in R._value2member_map_ else None
        payload = PAYLOADS[code](self, code) if code in PAYLOADS else None
        if payload is not None and not isinstance(payload, bytes) and rng.random() < 0.15:
            payload = _mutate_fields(rng, payload)
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if rng.random() < 0.5 else 0)
        fd_kinds = self._fd_kinds(code, rule.fds if rule else FdRule.NONE, payload)
        body = b"" if payload is None else payload if isinstance(payload, bytes) else payload.pack()
        if rng.random() < 0.03:
            body = _mutate_bytes(rng, body)
        header_roll = rng.random()
        if header_roll < 0.01:
            code = boundary(rng, 32) if rng.random() < 0.5 else rng.randrange(64)
        elif header_roll < 0.02:
            flags = boundary(rng, 32)
        data = build_message(code, flags, body)
        if header_roll > 0.995:
            # A size that lies: small lies desync the stream, big ones are fatal.
            size = rng.choice((0, len(body) + 1, max(len(body) - 1, 0), 0x1000, 0x1001, boundary(rng, 32)))
            data = data[:8] + struct.pack("=I", size) + data[12:]
        fds = [self._make_fd(kind, code) for kind in fd_kinds]
        self.counters["messages"] += 1
        name = R(code).name.removeprefix("VHOST_USER_") if code in R._value2member_map_ else str(code)
        self.last.append(f"{name} flags={flags:#x} body={body.hex()[:160]} fds={fd_kinds}")
        return data, fds

    def _fd_kinds(self, code: int, fd_rule: FdRule, payload: object) -> list[str]:
        rng = self.rng
        if fd_rule is FdRule.PER_REGION:
            n = len(payload.regions) if isinstance(payload, MemoryTable) else 1
            kinds = ["memfd-main"] * n
        elif fd_rule is FdRule.VRING_FILE:
            no_fd = isinstance(payload, VringFile) and payload.invalid_fd
            kinds = [] if no_fd else [rng.choice(("eventfd",) * 12 + ("eventfd-blocking", "eventfd-full"))]
        elif fd_rule is FdRule.ONE:
            natural = {R.VHOST_USER_SET_BACKEND_REQ_FD: "socket", R.VHOST_USER_SET_DEVICE_STATE_FD: "pipe-w"}
            # Memory-like fds, often the wrong size or kind (/dev/zero maps fine, then faults past its end).
            kinds = [natural.get(R(code), rng.choice(("memfd-64k", "memfd-64k", "memfd-main", "devzero", "memfd-4096",
                                                      "memfd-shrunk")))]
        else:
            kinds = []
        roll = rng.random()
        if roll < 0.05:
            kinds = []
        elif roll < 0.10:
            kinds = [rng.choice(FD_KINDS) for _ in range(rng.randrange(1, 11))]
        elif roll < 0.2 and kinds:
            kinds[rng.randrange(len(kinds))] = rng.choice(FD_KINDS)
        return kinds

    def _make_fd(self, kind: str, code: int) -> int:
        if kind.startswith("eventfd"):
            fd = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if kind == "eventfd" else 0))
            if kind == "eventfd-full":
                os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
            if code == R.VHOST_USER_SET_VRING_KICK:
                index = self.rng.randrange(2)
                old = self.kick_fds.pop(index, None)
                if old is not None:
                    os.close(old)
                self.kick_fds[index] = os.dup(fd)
            return fd
        if kind.startswith("pipe"):
            r, w = os.pipe2(os.O_CLOEXEC)
            keep, other = (r, w) if kind == "pipe-r" else (w, r)
            os.close(other)
            return keep
        if kind in ("devnull", "devzero"):
            return os.open("/dev/null" if kind == "devnull" else "/dev/zero", os.O_RDWR | os.O_CLOEXEC)
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        if kind == "memfd-main":
            return os.dup(self.memfd)
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        size = {"memfd-0": 0, "memfd-1": 1, "memfd-4095": 4095, "memfd-4096": 4096, "memfd-64k": 65536}.get(kind, MEMORY)
        os.ftruncate(fd, size)
        if kind == "memfd-shrunk":
            self.shrink.append(os.dup(fd))
        return fd

    # -- plausible payloads ------------------------------------------------------------------
    def _index(self) -> int:
        if self.ring is not None and self.rng.random() < 0.9:
            return self.ring
        return self.rng.choice((0, 0, 1, 1, 2, 3, 255)) if self.rng.random() < 0.95 else boundary(self.rng, 32)

    def _addr(self) -> int:
        rng = self.rng
        if rng.random() < 0.9:
            return USER_ADDR_BASE + rng.choice((0, 0x1000, 0x2000, 0x3000, rng.randrange(0, MEMORY, 2)))
        return boundary(rng, 64)

    def _region(self) -> MemRegion:
        rng = self.rng
        size = MEMORY if rng.random() < 0.8 else rng.choice((4096, MEMORY // 2, MEMORY * 2, boundary(rng, 64)))
        offset = 0 if rng.random() < 0.8 else rng.choice((4096, MEMORY, boundary(rng, 64)))
        gpa = 0 if rng.random() < 0.7 else rng.choice((MEMORY, MEMORY // 2, boundary(rng, 64)))
        uaddr = (USER_ADDR_BASE + gpa) & U64_MAX if rng.random() < 0.9 else boundary(rng, 64)
        return MemRegion(gpa, size, uaddr, offset)


def _features(fuzzer: ProtocolFuzzer, code: int) -> U64:
    rng = fuzzer.rng
    if code == R.VHOST_USER_SET_FEATURES:
        # What was offered, mostly without ACCESS_PLATFORM (bit 33: rings would wait for IOTLB updates).
        offered = fuzzer.offered[0]
        value = rng.choice((offered & ~(1 << 33), offered & ~(1 << 33), offered, offered & rng.getrandbits(64),
                            rng.getrandbits(64)))
    elif code == R.VHOST_USER_SET_PROTOCOL_FEATURES:
        offered = fuzzer.offered[1]
        value = rng.choice((offered, offered, offered & rng.getrandbits(20), rng.getrandbits(20)))
    elif code == R.VHOST_USER_SET_STATUS:
        value = rng.choice((0, 1, 3, 0xB, 0xF, 0x40, 0x80))
    else:  # NET_SET_MTU
        value = rng.choice((68, 1500, 9000, 65535, 67, 65536))
    return U64(value)


def _vring_state(fuzzer: ProtocolFuzzer, code: int) -> VringState:
    rng = fuzzer.rng
    if code == R.VHOST_USER_SET_VRING_NUM:
        num = RING_SIZE if rng.random() < 0.8 else rng.choice((1, 2, 256, 32768, 0, 3, 65535, 65536))
    elif code == R.VHOST_USER_SET_VRING_BASE:
        num = 0 if rng.random() < 0.8 else rng.choice((1, RING_SIZE, 65535, 65536, 0x8000))
    else:
        num = 1 if rng.random() < 0.8 else rng.choice((0, 2))
    return VringState(fuzzer._index(), num)


def _vring_addr(fuzzer: ProtocolFuzzer, code: int) -> VringAddr:
    rng = fuzzer.rng
    index = fuzzer._index()
    base = USER_ADDR_BASE + 0x2000 * (index & 1)
    desc, avail, used = base, base + 16 * RING_SIZE, base + 0x1000
    parts = [desc, used, avail]
    if rng.random() < 0.2:
        parts[rng.randrange(3)] = fuzzer._addr()
    return VringAddr(index, rng.choice((0, 0, 0, 1)), parts[0], parts[1], parts[2], rng.choice((0, 0x3000)))


def _memory_table(fuzzer: ProtocolFuzzer, code: int) -> MemoryTable:
    rng = fuzzer.rng
    n = 1 if rng.random() < 0.7 else rng.randrange(0, 9)
    return MemoryTable(tuple(fuzzer._region() for _ in range(n)))


def _config(fuzzer: ProtocolFuzzer, code: int) -> Config:
    rng = fuzzer.rng
    size = rng.choice((1, 4, 6, 8, 60, 256, 0))
    return Config(rng.choice((0, 0, 8, 20, 255, 256, 1 << 31)), rng.choice((0, 0, 1)), rng.randbytes(size))


def _inflight(fuzzer: ProtocolFuzzer, code: int) -> Inflight:
    rng = fuzzer.rng
    size = 65536 if rng.random() < 0.7 else rng.choice((0, 4096, 2**63, 2**64 - 1))
    offset = 0 if rng.random() < 0.7 else rng.choice((4096, 65536, 2**63))
    queues = rng.choice((1, 2)) if rng.random() < 0.8 else rng.choice((0, 256, 0xFFFF))
    return Inflight(size, offset, queues, RING_SIZE if rng.random() < 0.7 else rng.choice((1, 16, 256, 0, 0xFFFF)))


def _iotlb(fuzzer: ProtocolFuzzer, code: int) -> bytes:
    rng = fuzzer.rng
    msg = IotlbMsg(rng.choice((0, 0x10_0000_0000, boundary(rng, 64))), rng.choice((MEMORY, 4096, 0, boundary(rng, 64))),
                   fuzzer._addr(), rng.randrange(4), rng.randrange(1, 5))  # type: ignore[arg-type]
    return msg.pack()


PAYLOADS: dict[int, Callable[[ProtocolFuzzer, int], Any]] = {
    R.VHOST_USER_SET_FEATURES: _features,
    R.VHOST_USER_SET_PROTOCOL_FEATURES: _features,
    R.VHOST_USER_SET_STATUS: _features,
    R.VHOST_USER_NET_SET_MTU: _features,
    R.VHOST_USER_SET_MEM_TABLE: _memory_table,
    R.VHOST_USER_SET_LOG_BASE: lambda f, c: Log(f.rng.choice((4096, 0, 2**63)), f.rng.choice((0, 4096, 2**63))),
    R.VHOST_USER_SET_VRING_NUM: _vring_state,
    R.VHOST_USER_SET_VRING_BASE: _vring_state,
    R.VHOST_USER_GET_VRING_BASE: _vring_state,
    R.VHOST_USER_SET_VRING_ENABLE: _vring_state,
    R.VHOST_USER_SET_VRING_ENDIAN: _vring_state,
    R.VHOST_USER_VRING_KICK: _vring_state,
    R.VHOST_USER_SET_VRING_ADDR: _vring_addr,
    R.VHOST_USER_SET_VRING_KICK: lambda f, c: VringFile(f._index() & 0xFF, f.rng.random() < 0.05),
    R.VHOST_USER_SET_VRING_CALL: lambda f, c: VringFile(f._index() & 0xFF, f.rng.random() < 0.1),
    R.VHOST_USER_SET_VRING_ERR: lambda f, c: VringFile(f._index() & 0xFF, f.rng.random() < 0.1),
    R.VHOST_USER_SEND_RARP: lambda f, c: Rarp(f.rng.randbytes(6)),
    R.VHOST_USER_IOTLB_MSG: _iotlb,
    R.VHOST_USER_GET_CONFIG: _config,
    R.VHOST_USER_SET_CONFIG: _config,
    R.VHOST_USER_GET_INFLIGHT_FD: _inflight,
    R.VHOST_USER_SET_INFLIGHT_FD: _inflight,
    R.VHOST_USER_ADD_MEM_REG: lambda f, c: SingleMemRegion(f._region()),
    R.VHOST_USER_REM_MEM_REG: lambda f, c: SingleMemRegion(f._region()),
    R.VHOST_USER_SET_DEVICE_STATE_FD: lambda f, c: DeviceStateTransfer(f.rng.randrange(2), 0),  # type: ignore[arg-type]
}

CODES = [int(code) for code in R]
NEGOTIATION = [int(c) for c in (
    R.VHOST_USER_GET_FEATURES, R.VHOST_USER_SET_FEATURES, R.VHOST_USER_GET_PROTOCOL_FEATURES,
    R.VHOST_USER_SET_PROTOCOL_FEATURES, R.VHOST_USER_SET_OWNER,
)]
BRINGUP = NEGOTIATION + [int(c) for c in (
    R.VHOST_USER_SET_MEM_TABLE, R.VHOST_USER_GET_QUEUE_NUM,
    R.VHOST_USER_SET_VRING_NUM, R.VHOST_USER_SET_VRING_ADDR, R.VHOST_USER_SET_VRING_BASE, R.VHOST_USER_SET_VRING_CALL,
    R.VHOST_USER_SET_VRING_ERR, R.VHOST_USER_SET_VRING_KICK, R.VHOST_USER_SET_VRING_ENABLE,
    R.VHOST_USER_GET_INFLIGHT_FD, R.VHOST_USER_SET_INFLIGHT_FD, R.VHOST_USER_SET_STATUS, R.VHOST_USER_VRING_KICK,
)]


def _mutate_fields(rng: random.Random, payload: Any) -> Any:
    """The payload with one integer field replaced by a boundary value of its width (re-packed raw if it overflows)."""
    ints = [f.name for f in dataclasses.fields(payload) if isinstance(getattr(payload, f.name), int)]
    if not ints:
        return payload
    name = rng.choice(ints)
    value = boundary(rng, rng.choice((8, 16, 32, 64)))
    try:
        mutated = dataclasses.replace(payload, **{name: value})
        return mutated.pack()
    except (struct.error, ValueError, OverflowError):
        return payload


def _mutate_bytes(rng: random.Random, body: bytes) -> bytes:
    data = bytearray(body)
    roll = rng.random()
    if roll < 0.3:
        return bytes(data[: rng.randrange(len(data) + 1)])
    if roll < 0.5:
        return bytes(data) + rng.randbytes(rng.choice((1, 4, 8, 32)))
    for _ in range(rng.randrange(1, 4)):
        if data:
            data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x80, 0x7F, rng.randrange(256)))
    return bytes(data)


def _close(fds: list[int] | tuple[int, ...]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def make(slot: Slot, index: int) -> ProtocolFuzzer:
    """The campaign's factory."""
    return ProtocolFuzzer(slot, index)
