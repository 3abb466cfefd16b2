"""Reading pcap and pcapng files, and writing pcapng with the port and direction of every frame.

Reading (:func:`read_frames`) takes the classic libpcap format (microsecond
or nanosecond magic, either byte order) and pcapng (Section Header,
Interface Description, Enhanced and Simple Packet Blocks; other blocks are
skipped), Ethernet link type only.  A file is untrusted: a truncated
header, a bad magic, a truncated record, a captured length larger than the
snapshot length or the original length, or a link type other than Ethernet
raise :class:`PcapError` naming the file, the byte offset and what was
expected, before any frame is replayed.

Writing (:class:`PcapNgWriter`) follows the pcapng draft
(draft-ietf-opsawg-pcapng, "PCAP Now Generic"): one Interface Description
Block per bench port (section 4.2, ``if_name`` and ``if_tsresol`` 9 for
nanosecond timestamps) and one Enhanced Packet Block per frame (section
4.3) whose ``epb_flags`` option (section 4.3.1) carries the direction in its
two low bits: 1 inbound (the device delivered the frame to the port), 2
outbound (the port sent it into the device).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

from iovirt.bench.errors import BenchError

LINKTYPE_ETHERNET = 1
"""The only link type the bench replays and writes (pcap LINKTYPE_ETHERNET, DLT_EN10MB)."""

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_HEADER = 24
PCAP_RECORD = 16

PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_IDB = 0x00000001
PCAPNG_SPB = 0x00000003
PCAPNG_EPB = 0x00000006
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
OPT_ENDOFOPT = 0
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2

DIRECTION_INBOUND = 1
DIRECTION_OUTBOUND = 2
"""``epb_flags`` bits 0-1 (pcapng section 4.3.1): 01 inbound, 10 outbound."""

MAX_SNAPLEN = 262144
"""The largest record a reader here accepts (tcpdump's maximum snapshot length)."""


class PcapError(BenchError):
    """A capture file that cannot be replayed: ``path``, the byte ``offset`` of the problem, and what was wrong."""

    def __init__(self, path: str, offset: int, message: str) -> None:
        super().__init__(f"{path}: at byte {offset}: {message}")
        self.path = path
        self.offset = offset


@dataclass(frozen=True)
class Record:
    """One frame from a capture file: when it was captured (ns since the epoch) and its bytes."""

    t_ns: int
    data: bytes


def read_frames(path: str | os.PathLike) -> list[Record]:
    """Every frame of the pcap or pcapng file at ``path``, in file order.

    Raises :class:`PcapError` for a malformed file and ``OSError`` for one
    that cannot be read.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise PcapError(name, 0, f"{len(data)} bytes: too short for a pcap or pcapng header")
    if struct.unpack_from("<I", data)[0] == PCAPNG_SHB:
        return _read_pcapng(name, data)
    return _read_pcap(name, data)


def _read_pcap(path: str, data: bytes) -> list[Record]:
    for order in "<>":
        magic = struct.unpack_from(order + "I", data)[0]
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            break
    else:
        raise PcapError(
            path, 0, f"bad magic {data[:4].hex()}: not a pcap (a1b2c3d4 or a1b23c4d, either byte order) or pcapng file"
        )
    if len(data) < PCAP_HEADER:
        raise PcapError(path, len(data), f"truncated file header: {len(data)} of {PCAP_HEADER} bytes")
    scale = 1000 if magic == PCAP_MAGIC_US else 1
    _magic, _major, _minor, _zone, _sigfigs, snaplen, linktype = struct.unpack_from(order + "IHHiIII", data)
    if linktype & 0xFFFF != LINKTYPE_ETHERNET:
        raise PcapError(path, 20, f"link type {linktype & 0xFFFF}: only Ethernet ({LINKTYPE_ETHERNET}) can be replayed")
    limit = min(snaplen or MAX_SNAPLEN, MAX_SNAPLEN)
    out = []
    pos = PCAP_HEADER
    while pos < len(data):
        if len(data) - pos < PCAP_RECORD:
            raise PcapError(path, pos, f"truncated record header: {len(data) - pos} of {PCAP_RECORD} bytes")
        sec, frac, caplen, origlen = struct.unpack_from(order + "IIII", data, pos)
        if caplen > limit:
            raise PcapError(path, pos, f"record of {caplen} bytes exceeds the snapshot length {limit}")
        if caplen > origlen:
            raise PcapError(path, pos, f"record of {caplen} bytes exceeds its original length {origlen}")
        if len(data) - pos - PCAP_RECORD < caplen:
            raise PcapError(path, pos, f"truncated record: {len(data) - pos - PCAP_RECORD} of {caplen} bytes")
        start = pos + PCAP_RECORD
        out.append(Record(sec * 1_000_000_000 + frac * scale, data[start : start + caplen]))
        pos = start + caplen
    return out


def _read_pcapng(path: str, data: bytes) -> list[Record]:
    out: list[Record] = []
    order = "<"
    ifaces: list[tuple[int, int]] = []  # (snaplen, ns per timestamp unit) per interface of this section
    pos = 0
    while pos < len(data):
        if len(data) - pos < 12:
            raise PcapError(path, pos, f"truncated block header: {len(data) - pos} of 12 bytes")
        btype = struct.unpack_from(order + "I", data, pos)[0]
        if btype == PCAPNG_SHB:
            if len(data) - pos < 16:
                raise PcapError(path, pos, "truncated section header block")
            for order in "<>":
                if struct.unpack_from(order + "I", data, pos + 8)[0] == PCAPNG_BYTE_ORDER_MAGIC:
                    break
            else:
                raise PcapError(path, pos + 8, f"bad byte-order magic {data[pos + 8 : pos + 12].hex()} (1a2b3c4d)")
            ifaces = []
        blen = struct.unpack_from(order + "I", data, pos + 4)[0]
        if blen < 12 or blen % 4:
            raise PcapError(path, pos, f"block length {blen}: must be a multiple of 4 and at least 12")
        if len(data) - pos < blen:
            raise PcapError(path, pos, f"truncated block: {len(data) - pos} of {blen} bytes")
        body = data[pos + 8 : pos + blen - 4]
        if btype == PCAPNG_IDB:
            ifaces.append(_interface(path, pos, order, body))
        elif btype == PCAPNG_EPB:
            out.append(_enhanced(path, pos, order, body, ifaces))
        elif btype == PCAPNG_SPB:
            out.append(_simple(path, pos, order, body, ifaces))
        pos += blen
    return out


def _interface(path: str, pos: int, order: str, body: bytes) -> tuple[int, int]:
    if len(body) < 8:
        raise PcapError(path, pos, "truncated interface description block")
    linktype, _reserved, snaplen = struct.unpack_from(order + "HHI", body)
    if linktype != LINKTYPE_ETHERNET:
        raise PcapError(path, pos, f"interface link type {linktype}: only Ethernet ({LINKTYPE_ETHERNET}) can be replayed")
    unit_ns = 1000  # if_tsresol absent: microseconds (section 4.2)
    opt = 8
    while opt + 4 <= len(body):
        code, length = struct.unpack_from(order + "HH", body, opt)
        if code == OPT_ENDOFOPT:
            break
        if code == IF_TSRESOL and length >= 1 and opt + 5 <= len(body):
            res = body[opt + 4]
            exp = res & 0x7F
            if exp > 30:
                raise PcapError(path, pos, f"if_tsresol {res:#x}: unsupported resolution")
            unit_ns = 10**9 // (2**exp if res & 0x80 else 10**exp) or 1
        opt += 4 + (length + 3) // 4 * 4
    return min(snaplen or MAX_SNAPLEN, MAX_SNAPLEN), unit_ns


def _enhanced(path: str, pos: int, order: str, body: bytes, ifaces: list[tuple[int, int]]) -> Record:
    if len(body) < 20:
        raise PcapError(path, pos, "truncated enhanced packet block")
    iface, high, low, caplen, origlen = struct.unpack_from(order + "IIIII", body)
    if iface >= len(ifaces):
        raise PcapError(path, pos, f"interface id {iface}, but only {len(ifaces)} interfaces were described")
    snaplen, unit_ns = ifaces[iface]
    _check_len(path, pos, caplen, origlen, snaplen, len(body) - 20)
    return Record(((high << 32) | low) * unit_ns, bytes(body[20 : 20 + caplen]))


def _simple(path: str, pos: int, order: str, body: bytes, ifaces: list[tuple[int, int]]) -> Record:
    if len(body) < 4 or not ifaces:
        raise PcapError(path, pos, "simple packet block without an interface or its length")
    origlen = struct.unpack_from(order + "I", body)[0]
    caplen = min(origlen, ifaces[0][0], len(body) - 4)
    return Record(0, bytes(body[4 : 4 + caplen]))


def _check_len(path: str, pos: int, caplen: int, origlen: int, snaplen: int, room: int) -> None:
    if caplen > snaplen:
        raise PcapError(path, pos, f"record of {caplen} bytes exceeds the snapshot length {snaplen}")
    if caplen > origlen:
        raise PcapError(path, pos, f"record of {caplen} bytes exceeds its original length {origlen}")
    if caplen > room:
        raise PcapError(path, pos, f"truncated record: {room} of {caplen} bytes in its block")


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad(value)


def _block(btype: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", btype, length) + body + struct.pack("<I", length)


class PcapNgWriter:
    """A pcapng file: one interface per bench port, each frame with its direction (little-endian, ns timestamps)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file: BinaryIO = open(self.path, "wb")
        self.interfaces: list[str] = []
        self.count = 0
        # Section Header Block (section 4.1): version 1.0, section length unknown (-1).
        self._file.write(_block(PCAPNG_SHB, struct.pack("<IHHq", PCAPNG_BYTE_ORDER_MAGIC, 1, 0, -1) + _option(OPT_ENDOFOPT, b"")))

    def add_interface(self, name: str) -> int:
        """Describe one port (section 4.2); returns its interface id for :meth:`write`."""
        options = _option(IF_NAME, name.encode()) + _option(IF_TSRESOL, bytes([9])) + _option(OPT_ENDOFOPT, b"")
        self._file.write(_block(PCAPNG_IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0) + options))
        self.interfaces.append(name)
        return len(self.interfaces) - 1

    def write(self, interface: int, wall_ns: int, frame: bytes, direction: int) -> None:
        """One Enhanced Packet Block (section 4.3): ``frame`` seen on ``interface`` at ``wall_ns``, inbound or outbound."""
        if not 0 <= interface < len(self.interfaces):
            raise ValueError(f"interface {interface} was not added")
        if direction not in (DIRECTION_INBOUND, DIRECTION_OUTBOUND):
            raise ValueError(f"direction must be DIRECTION_INBOUND or DIRECTION_OUTBOUND, got {direction}")
        head = struct.pack("<IIIII", interface, wall_ns >> 32, wall_ns & 0xFFFFFFFF, len(frame), len(frame))
        options = _option(EPB_FLAGS, struct.pack("<I", direction)) + _option(OPT_ENDOFOPT, b"")
        self._file.write(_block(PCAPNG_EPB, head + _pad(bytes(frame)) + options))
        self.count += 1

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()

    def __enter__(self) -> "PcapNgWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
