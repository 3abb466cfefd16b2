"""virtio-vsock constants and the packet header (virtio 1.2 section 5.10)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

VIRTIO_ID_VSOCK = 19

# 5.10.2 Virtqueues
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

# 5.10.3 Feature bits
VIRTIO_VSOCK_F_STREAM = 0
VIRTIO_VSOCK_F_SEQPACKET = 1
VIRTIO_VSOCK_F_NO_IMPLIED_STREAM = 2  # virtio 1.3: streams only when STREAM is negotiated

# 5.10.4 Device configuration layout: struct virtio_vsock_config { le64 guest_cid; }
CONFIG = struct.Struct("<Q")

# 5.10.6 Device Operation: well-known CIDs.  The host is CID 2; CIDs 0, 1 and
# 0xffffffff are reserved and never a guest's (5.10.4: only the lower 32 bits are used).
VMADDR_CID_HOST = 2
RESERVED_CIDS = frozenset({0, 1, 2, 0xFFFFFFFF})
VMADDR_CID_MAX = 0xFFFFFFFF

# 5.10.6: struct virtio_vsock_hdr, 44 bytes:
#   le64 src_cid, le64 dst_cid, le32 src_port, le32 dst_port, le32 len,
#   le16 type, le16 op, le32 flags, le32 buf_alloc, le32 fwd_cnt
HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size

# type
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_TYPE_SEQPACKET = 2

# op
VIRTIO_VSOCK_OP_INVALID = 0
VIRTIO_VSOCK_OP_REQUEST = 1
VIRTIO_VSOCK_OP_RESPONSE = 2
VIRTIO_VSOCK_OP_RST = 3
VIRTIO_VSOCK_OP_SHUTDOWN = 4
VIRTIO_VSOCK_OP_RW = 5
VIRTIO_VSOCK_OP_CREDIT_UPDATE = 6
VIRTIO_VSOCK_OP_CREDIT_REQUEST = 7
OP_NAMES = {
    VIRTIO_VSOCK_OP_INVALID: "INVALID", VIRTIO_VSOCK_OP_REQUEST: "REQUEST", VIRTIO_VSOCK_OP_RESPONSE: "RESPONSE",
    VIRTIO_VSOCK_OP_RST: "RST", VIRTIO_VSOCK_OP_SHUTDOWN: "SHUTDOWN", VIRTIO_VSOCK_OP_RW: "RW",
    VIRTIO_VSOCK_OP_CREDIT_UPDATE: "CREDIT_UPDATE", VIRTIO_VSOCK_OP_CREDIT_REQUEST: "CREDIT_REQUEST",
}

# 5.10.6.6 Stream Sockets: flags of OP_SHUTDOWN
VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE = 1
VIRTIO_VSOCK_SHUTDOWN_F_SEND = 2
VIRTIO_VSOCK_SHUTDOWN_MASK = VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE | VIRTIO_VSOCK_SHUTDOWN_F_SEND

# 5.10.6.7 Device Events: struct virtio_vsock_event { le32 id; }
EVENT = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

MAX_PKT_PAYLOAD = 64 << 10
"""The largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE); a longer len is refused."""


@dataclass
class Header:
    """One struct virtio_vsock_hdr (5.10.6), field by field as the spec names them."""

    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> "Header":
        """Parse the first :data:`HDR_SIZE` bytes of ``data``."""
        return cls(*HDR.unpack_from(data))

    def pack(self) -> bytes:
        """The 44 bytes on the wire (little-endian)."""
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                        self.op, self.flags, self.buf_alloc, self.fwd_cnt)

    def __str__(self) -> str:
        op = OP_NAMES.get(self.op, f"op {self.op}")
        return f"{op} {self.src_cid}:{self.src_port} -> {self.dst_cid}:{self.dst_port} len {self.len}"
