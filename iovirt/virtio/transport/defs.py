"""Constants of the virtio-pci modern transport (virtio 1.2 section 4.1), named as the spec names them."""

from __future__ import annotations

# 4.1.2 PCI Device Discovery
VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_MODERN_DEVICE_BASE = 0x1040  # device id = 0x1040 + virtio device id
VIRTIO_PCI_MODERN_REVISION = 1  # 4.1.2.1: non-transitional devices SHOULD have revision >= 1
VIRTIO_PCI_SUBSYSTEM_ID = 0x1100  # 4.1.2.1: SHOULD be >= 0x40; QEMU's value

# 4.1.4 cfg_type of struct virtio_pci_cap
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8  # virtio 1.4 4.1.4.7 (struct virtio_pci_cap64)
VIRTIO_PCI_CAP_VENDOR_CFG = 9  # virtio 1.4 4.1.4.8 (struct virtio_pci_vndr_data)

# struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
VIRTIO_PCI_CAP_CFG_TYPE = 3
VIRTIO_PCI_CAP_BAR = 4
VIRTIO_PCI_CAP_ID = 5
VIRTIO_PCI_CAP_OFFSET = 8
VIRTIO_PCI_CAP_LENGTH = 12
VIRTIO_PCI_CAP_SIZE = 16
VIRTIO_PCI_NOTIFY_CAP_MULT = 16  # struct virtio_pci_notify_cap: le32 notify_off_multiplier
VIRTIO_PCI_CFG_CAP_DATA = 16  # struct virtio_pci_cfg_cap: u8 pci_cfg_data[4]

# 4.1.4.3 struct virtio_pci_common_cfg
VIRTIO_PCI_COMMON_DFSELECT = 0x00
VIRTIO_PCI_COMMON_DF = 0x04
VIRTIO_PCI_COMMON_GFSELECT = 0x08
VIRTIO_PCI_COMMON_GF = 0x0C
VIRTIO_PCI_COMMON_MSIX = 0x10
VIRTIO_PCI_COMMON_NUMQ = 0x12
VIRTIO_PCI_COMMON_STATUS = 0x14
VIRTIO_PCI_COMMON_CFGGENERATION = 0x15
VIRTIO_PCI_COMMON_Q_SELECT = 0x16
VIRTIO_PCI_COMMON_Q_SIZE = 0x18
VIRTIO_PCI_COMMON_Q_MSIX = 0x1A
VIRTIO_PCI_COMMON_Q_ENABLE = 0x1C
VIRTIO_PCI_COMMON_Q_NOFF = 0x1E
VIRTIO_PCI_COMMON_Q_DESC = 0x20
VIRTIO_PCI_COMMON_Q_AVAIL = 0x28  # queue_driver
VIRTIO_PCI_COMMON_Q_USED = 0x30  # queue_device
VIRTIO_PCI_COMMON_Q_NDATA = 0x38  # queue_notify_data: only with VIRTIO_F_NOTIF_CONFIG_DATA (not offered: reads 0)
VIRTIO_PCI_COMMON_Q_RESET = 0x3A  # queue_reset: with VIRTIO_F_RING_RESET (2.6.1)
VIRTIO_PCI_COMMON_ADMIN_Q_INDEX = 0x3C  # admin_queue_index: with VIRTIO_F_ADMIN_VQ (virtio 1.3)
VIRTIO_PCI_COMMON_ADMIN_Q_NUM = 0x3E  # admin_queue_num
VIRTIO_PCI_COMMON_CFG_SIZE = 0x3C  # through queue_reset: a function without an administration virtqueue (pci.py)

# 4.1.5.1.2 MSI-X Vector Configuration
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# 4.1.4.5 ISR status bits
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# PCI class codes per virtio device id (what QEMU's virtio-*-pci use).
CLASS_NETWORK_ETHERNET = 0x020000
CLASS_STORAGE_SCSI = 0x010000
CLASS_OTHERS = 0xFF0000
VIRTIO_CLASS_CODES = {1: CLASS_NETWORK_ETHERNET, 2: CLASS_STORAGE_SCSI}
