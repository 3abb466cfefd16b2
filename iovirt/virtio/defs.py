"""Constants of the virtio specification (v1.2/v1.3), named as the spec names them."""

# 2.7.5 The Virtqueue Descriptor Table
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_DESC_SIZE = 16

# 2.7.6 / 2.7.8 notification suppression flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_USED_ELEM_SIZE = 8

# 2.8.1 / 2.8.14 packed virtqueues: descriptor flags and event suppression
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2
#: 2.8.14: bit 15 of desc_event_off_wrap (and of a vhost-user packed ring index) is the wrap counter.
PACKED_WRAP_BIT = 1 << 15
#: 2.8.13: alignment of the Driver and Device Event Suppression areas; each is 4 bytes.
PACKED_EVENT_ALIGN = 4
PACKED_EVENT_SIZE = 4

# 2.7: Queue Size is a power of 2 no larger than 32768.
VIRTQ_MAX_SIZE = 32768

# 2.7 alignment requirements of the three split-ring parts
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# 6 Reserved Feature Bits
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41  # virtio 1.3: administration virtqueues (2.13); offered by a group owner's transport (iovirt/sriov/admin.py)

# 2.1 Device Status Field
VIRTIO_CONFIG_S_ACKNOWLEDGE = 1
VIRTIO_CONFIG_S_DRIVER = 2
VIRTIO_CONFIG_S_DRIVER_OK = 4
VIRTIO_CONFIG_S_FEATURES_OK = 8
VIRTIO_CONFIG_S_NEEDS_RESET = 64
VIRTIO_CONFIG_S_FAILED = 128


def desc_table_size(size: int) -> int:
    """Bytes of a split ring's descriptor table (2.7: 16 * Queue Size)."""
    return VIRTQ_DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring including used_event (2.7: 6 + 2 * Queue Size)."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """Bytes of the used ring including avail_event (2.7: 6 + 8 * Queue Size)."""
    return 6 + VIRTQ_USED_ELEM_SIZE * size


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.10: notify when ``event_idx`` lies in ``[old_idx, new_idx)`` (mod 2^16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
