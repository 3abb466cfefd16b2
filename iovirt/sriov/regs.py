"""SR-IOV extended capability registers (PCIe Base Specification §9.3.3).

Names and offsets as Linux ``include/uapi/linux/pci_regs.h`` and pciutils
``lib/header.h`` spell them; offsets are relative to the capability.
"""

from __future__ import annotations

PCI_EXT_CAP_ID_SRIOV = 0x10
PCI_SRIOV_VERSION = 1
PCI_EXT_CAP_SRIOV_SIZEOF = 0x40

PCI_SRIOV_CAP = 0x04  # SR-IOV Capabilities (dword)
PCI_SRIOV_CAP_VFM = 0x00000001  # VF Migration Capable
PCI_SRIOV_CAP_ARI_PRESERVED = 0x00000002  # ARI Capable Hierarchy Preserved
PCI_SRIOV_CTRL = 0x08  # SR-IOV Control (word)
PCI_SRIOV_CTRL_VFE = 0x0001  # VF Enable
PCI_SRIOV_CTRL_VFM = 0x0002  # VF Migration Enable
PCI_SRIOV_CTRL_INTR = 0x0004  # VF Migration Interrupt Enable
PCI_SRIOV_CTRL_MSE = 0x0008  # VF Memory Space Enable
PCI_SRIOV_CTRL_ARI = 0x0010  # ARI Capable Hierarchy
PCI_SRIOV_STATUS = 0x0A  # SR-IOV Status (word)
PCI_SRIOV_STATUS_VFM = 0x0001  # VF Migration Status
PCI_SRIOV_INITIAL_VF = 0x0C  # InitialVFs
PCI_SRIOV_TOTAL_VF = 0x0E  # TotalVFs
PCI_SRIOV_NUM_VF = 0x10  # NumVFs
PCI_SRIOV_FUNC_LINK = 0x12  # Function Dependency Link (byte)
PCI_SRIOV_VF_OFFSET = 0x14  # First VF Offset
PCI_SRIOV_VF_STRIDE = 0x16  # VF Stride
PCI_SRIOV_VF_DID = 0x1A  # VF Device ID
PCI_SRIOV_SUP_PGSIZE = 0x1C  # Supported Page Sizes (dword)
PCI_SRIOV_SYS_PGSIZE = 0x20  # System Page Size (dword)
PCI_SRIOV_BAR = 0x24  # VF BAR0; VF BARn at 0x24 + 4n
PCI_SRIOV_NUM_BARS = 6
PCI_SRIOV_VFM = 0x3C  # VF Migration State Array Offset
PCI_SRIOV_VFM_BIR = 0x7

SRIOV_PAGE_SHIFT = 12
"""System Page Size bit n selects a page of ``1 << (n + 12)`` bytes (§9.3.3.13)."""

DEFAULT_SUPPORTED_PAGE_SIZES = 0x553
"""4 KiB, 8 KiB, 64 KiB, 256 KiB, 1 MiB and 4 MiB, as QEMU ``pcie_sriov.c`` offers."""
