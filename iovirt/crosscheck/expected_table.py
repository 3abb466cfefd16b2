"""The expected differences: every place QEMU 7.2's models depart from the spec, as found by the areas.

Offsets are absolute in the endpoint's config space in the topology of
:mod:`iovirt.crosscheck.topology` (PCI Express capability at 0x40, MSI-X at
0xDC, last capability ending at 0xE8); :func:`iovirt.crosscheck.topology.discover_layout`
checks QEMU still lays it out so.
"""

from __future__ import annotations

from iovirt.crosscheck.expected import ExpectedDifference

AFTER_RESET = "after-reset"
"""A Function Level Reset came earlier in the sequence."""
WINDOW_OTHER_BAR = "pci-cfg-window-other-bar"
QI_DISABLED_PENDING = "qi-disabled-pending"
"""Queued invalidation was disabled (GCMD.QIE 1 -> 0) while IQH != IQT earlier in the sequence."""
"""The pci_cfg window's ``bar`` does not name the BAR holding the virtio structures."""

EXPECTED: tuple[ExpectedDifference, ...] = (
    ExpectedDifference(
        "pci-config", "cfg", 0x04, 2, 0x0040,
        "write 1 to Command.Parity Error Response, read it back",
        "PCIe 4.0 §7.5.1.1.1: Parity Error Response is RW in a PCI Express function's Command register",
        "QEMU leaves bit 6 out of the Command write mask, so it always reads 0",
    ),
    ExpectedDifference(
        "pci-config", "cfg", 0x80, 2, 0x0003,
        "write PowerState D1 or D2 to PMCSR, read it back",
        "PCI PM 1.2 §3.2.4: a write of a PowerState the function does not support (PMC says no D1, no D2) "
        "completes but is discarded, the state does not change",
        "QEMU stores any PowerState value",
    ),
    ExpectedDifference(
        "pci-config", "cfg", 0x50, 2, 0x0003,
        "write ASPM Control in Link Control, read it back",
        "PCIe 4.0 §7.5.3.7: ASPM Control is RW; the function advertises L0s in ASPM Support, so 01b is a legal value",
        "QEMU advertises L0s support but hardwires ASPM Control to 00b",
    ),
    ExpectedDifference(
        "pci-config", "cfg", 0xE8, 0x18, (1 << (8 * 0x18)) - 1,
        "write the bytes after the last capability (0xE8-0xFF), read them back",
        "PCI 3.0 §6.1: writes to reserved or unimplemented registers are no-ops and reads of them return 0",
        "QEMU makes all of 0x40-0xFF that no capability claims writable, so unimplemented bytes keep what is written",
    ),
)

_FLR_SPEC = (
    "PCIe 4.0 §6.6.2: a Function Level Reset returns every register of the function to its initial value "
    "except sticky bits and a few listed exemptions (none of these)"
)
EXPECTED += (
    ExpectedDifference(
        "pci-config", "cfg", 0x68, 2, 0x8000,
        "set End-End TLP Prefix Blocking in Device Control 2, FLR, read it", _FLR_SPEC,
        "QEMU's FLR resets only the registers pci_do_device_reset and virtio-pci's reset name; "
        "Device Control 2 keeps its value",
        condition=AFTER_RESET,
    ),
    ExpectedDifference(
        "pci-config", "cfg", 0xCC, 1, 0xFF,
        "write the pci_cfg capability's bar, FLR, read it", _FLR_SPEC,
        "QEMU's FLR leaves the virtio pci_cfg window (virtio 1.2 §4.1.4.9) as it was",
        condition=AFTER_RESET,
    ),
    ExpectedDifference(
        "pci-config", "cfg", 0xD0, 12, (1 << 96) - 1,
        "write the pci_cfg capability's offset, length or pci_cfg_data, FLR, read it", _FLR_SPEC,
        "QEMU's FLR leaves the virtio pci_cfg window (virtio 1.2 §4.1.4.9) as it was",
        condition=AFTER_RESET,
    ),
)
EXPECTED += (
    ExpectedDifference(
        "pci-config", "cfg", 0xD8, 4, 0xFFFFFFFF,
        "set the pci_cfg window's length to 1, 2 or 4 with bar naming another BAR, read pci_cfg_data",
        "virtio 1.2 §4.1.4.9: the device accesses BAR 'bar' at 'offset' through pci_cfg_data",
        "QEMU ignores the bar field and always accesses the virtio structures' BAR",
        condition=WINDOW_OTHER_BAR,
    ),
)

EXPECTED += (
    ExpectedDifference(
        "vtd-regs", "vtd", 0x1C, 4, 1 << 23,
        "set GCMD.CFI (with or without IRE), read GSTS.CFIS",
        "VT-d 3.x §11.4.4-11.4.5: CFI is a command bit of Intel 64 implementations with interrupt remapping; "
        "GSTS.CFIS reports its state (compatibility-format interrupts pass through while IRE is set and "
        "x2APIC mode is off)",
        "QEMU's GCMD handler has no CFI case: CFIS always reads 0 and compatibility-format interrupts are "
        "always blocked by interrupt remapping",
    ),
)
_QI_UNDEFINED = (
    "VT-d 3.x §6.5.2 and §11.4.4: software must not disable queued invalidation while descriptors are "
    "pending (IQH != IQT); what the hardware does then is not defined"
)
EXPECTED += (
    ExpectedDifference(
        "vtd-regs", "vtd", 0x1C, 4, 1 << 26,
        "clear GCMD.QIE while IQH != IQT, read GSTS.QIES", _QI_UNDEFINED,
        "undefined by the spec: QEMU refuses the disable and keeps QIES set, iovirt disables",
        condition=QI_DISABLED_PENDING,
    ),
)
EXPECTED += (
    ExpectedDifference(
        "vtd-regs", "vtd", 0x90, 8, 0xFFFFFFFFFFFFF000,
        "write IQA's Invalidation Queue Base Address, read IQA",
        "VT-d 3.x §11.4.10.3: IQA's base address field is RW and reads back what software wrote",
        "QEMU reads the base back from the copy it latches when queued invalidation is enabled "
        "(and only the host-address-width bits of it), not the register",
    ),
    ExpectedDifference(
        "vtd-regs", "vtd", 0x28, 8, 0x3FFFF0000,
        "write CCMD's Source-ID or Function Mask, read CCMD",
        "VT-d 3.x §11.4.7: CCMD's FM, SID and DID fields are RW",
        "QEMU marks SID and FM write-only, so they read 0",
    ),
    ExpectedDifference(
        "vtd-regs", "vtd", 0xF0, 8, 0xFFFFFFFFFFFFF07F,
        "write IVA, read it",
        "VT-d 3.x §11.4.8.1: IVA's ADDR, IH and AM fields are write-only (W); the spec gives reads no value",
        "undefined by the spec: QEMU reads 0, iovirt returns what was written (it keeps the value for the "
        "IOTLB register's page-selective invalidation)",
    ),
)
