"""virtio-blk constants and request layouts (virtio 1.2 section 5.2)."""

from __future__ import annotations

import struct

VIRTIO_ID_BLOCK = 2

# 5.2.3 Feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# 5.2.6 request types and status
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20  # GET_ID: the serial, zero-padded
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512  # 5.2.6: sector numbers are in 512-byte units whatever blk_size says
REQ_HDR = struct.Struct("<IIQ")  # struct virtio_blk_req's header: type, reserved, sector
DISCARD_SEG = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes: sector, num_sectors, flags
