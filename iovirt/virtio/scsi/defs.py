"""virtio-scsi constants and layouts (virtio 1.2 section 5.6), and the SCSI ones its target speaks.

The SCSI values (operation codes, status, sense keys, additional sense codes)
are those of SAM-5, SPC-4 and SBC-3, named as those standards (and Linux's
``scsi_proto.h``) name them.
"""

from __future__ import annotations

import struct

VIRTIO_ID_SCSI = 8

# 5.6.2 Virtqueues: controlq, eventq, then the request queues.
CONTROLQ = 0
EVENTQ = 1
REQUESTQ_BASE = 2

# 5.6.3 Feature bits (none offered by iovirt; named for the checks)
VIRTIO_SCSI_F_INOUT = 0
VIRTIO_SCSI_F_HOTPLUG = 1
VIRTIO_SCSI_F_CHANGE = 2
VIRTIO_SCSI_F_T10_PI = 3

# 5.6.4 Device configuration layout: struct virtio_scsi_config
CONFIG = struct.Struct("<IIIIIIIHHI")
"""num_queues, seg_max, max_sectors, cmd_per_lun, event_info_size, sense_size, cdb_size, max_channel, max_target, max_lun."""
CONFIG_SENSE_SIZE_OFFSET = 20  # the two fields the driver may write (5.6.4)
CONFIG_CDB_SIZE_OFFSET = 24
VIRTIO_SCSI_SENSE_DEFAULT_SIZE = 96  # 5.6.4: the initial sense_size and cdb_size
VIRTIO_SCSI_CDB_DEFAULT_SIZE = 32
VIRTIO_SCSI_SENSE_MAX_SIZE = 256  # the largest sense_size / cdb_size the driver may set here (as QEMU's)
VIRTIO_SCSI_CDB_MAX_SIZE = 256

# 5.6.6 Device operation: request queues.  struct virtio_scsi_req_cmd without T10_PI:
# device-readable lun[8], id, task_attr, prio, crn, cdb[cdb_size], dataout[];
# device-writable sense_len, residual, status_qualifier, status, response, sense[sense_size], datain[].
REQ_CMD_HDR = struct.Struct("<8sQBBB")
"""lun, id, task_attr, prio, crn: the request header before the CDB."""
RESP_CMD_HDR = struct.Struct("<IIHBB")
"""sense_len, residual, status_qualifier, status, response: the response before the sense buffer."""

# 5.6.6.1 response codes (request queues), 5.6.6.2 (control queue)
VIRTIO_SCSI_S_OK = 0
VIRTIO_SCSI_S_FUNCTION_COMPLETE = 0
VIRTIO_SCSI_S_OVERRUN = 1
VIRTIO_SCSI_S_ABORTED = 2
VIRTIO_SCSI_S_BAD_TARGET = 3
VIRTIO_SCSI_S_RESET = 4
VIRTIO_SCSI_S_BUSY = 5
VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6
VIRTIO_SCSI_S_TARGET_FAILURE = 7
VIRTIO_SCSI_S_NEXUS_FAILURE = 8
VIRTIO_SCSI_S_FAILURE = 9
VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10
VIRTIO_SCSI_S_FUNCTION_REJECTED = 11
VIRTIO_SCSI_S_INCORRECT_LUN = 12

# 5.6.6.1 task attributes
VIRTIO_SCSI_S_SIMPLE = 0
VIRTIO_SCSI_S_ORDERED = 1
VIRTIO_SCSI_S_HEAD = 2
VIRTIO_SCSI_S_ACA = 3

# 5.6.6.2 control queue: request types and task management functions
VIRTIO_SCSI_T_TMF = 0
VIRTIO_SCSI_T_AN_QUERY = 1
VIRTIO_SCSI_T_AN_SUBSCRIBE = 2
VIRTIO_SCSI_T_TMF_ABORT_TASK = 0
VIRTIO_SCSI_T_TMF_ABORT_TASK_SET = 1
VIRTIO_SCSI_T_TMF_CLEAR_ACA = 2
VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET = 3
VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET = 4
VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5
VIRTIO_SCSI_T_TMF_QUERY_TASK = 6
VIRTIO_SCSI_T_TMF_QUERY_TASK_SET = 7
CTRL_TYPE = struct.Struct("<I")  # the le32 type every control request starts with
CTRL_TMF_REQ = struct.Struct("<II8sQ")  # struct virtio_scsi_ctrl_tmf: type, subtype, lun, id (then u8 response)
CTRL_AN_REQ = struct.Struct("<I8sI")  # struct virtio_scsi_ctrl_an: type, lun, event_requested
CTRL_AN_RESP = struct.Struct("<IB")  # event_actual, response

# 5.6.6.3 event queue: struct virtio_scsi_event
EVENT = struct.Struct("<I8sI")  # event, lun, reason
VIRTIO_SCSI_T_NO_EVENT = 0
VIRTIO_SCSI_T_TRANSPORT_RESET = 1
VIRTIO_SCSI_T_ASYNC_NOTIFY = 2
VIRTIO_SCSI_T_PARAM_CHANGE = 3
VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000

# 5.6.6.1: the lun field.  Byte 0 is 1, byte 1 the target, bytes 2-3 the LUN in the
# single-level flat (0x40) or peripheral (0x00) addressing method, bytes 4-7 zero.
LUN_FIRST_BYTE = 1
LUN_FLAT_ADDRESSING = 0x40
LUN_ADDRESS_METHOD_MASK = 0xC0

# SAM-5 status codes
GOOD = 0x00
CHECK_CONDITION = 0x02

# SPC-4 / SBC-3 operation codes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
SYNCHRONIZE_CACHE_10 = 0x35
WRITE_SAME_10 = 0x41
UNMAP = 0x42
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
WRITE_SAME_16 = 0x93
SERVICE_ACTION_IN_16 = 0x9E
SAI_READ_CAPACITY_16 = 0x10  # the service action of READ CAPACITY(16)
REPORT_LUNS = 0xA0
READ_12 = 0xA8
WRITE_12 = 0xAA

CDB_GROUP_LENGTH = (6, 10, 10, 0, 16, 12, 0, 0)
"""SPC-4 4.2.5.1: a CDB's length by its group code (the opcode's top 3 bits); 0: reserved or vendor-specific."""

# SPC-4 4.5.3 fixed-format sense data
SENSE_FIXED_CURRENT = 0x70
SENSE_FIXED_LEN = 18  # 8 bytes + additional sense length 10
NO_SENSE = 0x0
MEDIUM_ERROR = 0x3
ILLEGAL_REQUEST = 0x5
DATA_PROTECT = 0x7
# (ASC, ASCQ)
ASC_NO_ADDITIONAL_SENSE = (0x00, 0x00)
ASC_WRITE_ERROR = (0x0C, 0x00)
ASC_UNRECOVERED_READ_ERROR = (0x11, 0x00)
ASC_INVALID_COMMAND_OPERATION_CODE = (0x20, 0x00)
ASC_LBA_OUT_OF_RANGE = (0x21, 0x00)
ASC_INVALID_FIELD_IN_CDB = (0x24, 0x00)
ASC_LOGICAL_UNIT_NOT_SUPPORTED = (0x25, 0x00)
ASC_INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
ASC_WRITE_PROTECTED = (0x27, 0x00)
ASC_SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)

# SPC-4 6.6 INQUIRY, 7.8 VPD pages
PERIPHERAL_DEVICE_TYPE_DISK = 0x00
PERIPHERAL_NOT_CONNECTED = 0x7F  # qualifier 011b, type 1Fh: no logical unit here
VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83
VPD_BLOCK_LIMITS = 0xB0
VPD_BLOCK_DEVICE_CHARACTERISTICS = 0xB1
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2

# SPC-4 7.5 mode pages
MODE_PAGE_CACHING = 0x08
MODE_PAGE_CONTROL = 0x0A
MODE_PAGE_ALL = 0x3F
MODE_SUBPAGE_ALL = 0xFF
MODE_PC_CURRENT, MODE_PC_CHANGEABLE, MODE_PC_DEFAULT, MODE_PC_SAVED = 0, 1, 2, 3
MODE_WP = 0x80  # device-specific parameter of a direct-access device: write protected

# SBC-3 5.28 UNMAP parameter list
UNMAP_HDR_LEN = 8
UNMAP_DESC = struct.Struct(">QI4x")  # LBA, number of blocks

BLOCK_SIZE = 512
