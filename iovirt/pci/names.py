"""Names lspci prints in a device's title line, for the IDs iovirt uses.

The class names are those of the PCI Code and ID Assignment Specification as
spelled in the pci.ids database lspci reads; vendor and device names cover
the IDs iovirt builds.  Unknown IDs fall back to lspci's own wording
(``Class 0601``, ``Device 1234:5678``) so the title line reads as lspci
prints it.
"""

from __future__ import annotations

BASE_CLASS_NAMES = {
    0x00: "Unclassified device",
    0x01: "Mass storage controller",
    0x02: "Network controller",
    0x03: "Display controller",
    0x04: "Multimedia controller",
    0x05: "Memory controller",
    0x06: "Bridge",
    0x07: "Communication controller",
    0x08: "Generic system peripheral",
    0x0C: "Serial bus controller",
    0xFF: "Unassigned class",
}

SUBCLASS_NAMES = {
    (0x00, 0x00): "Non-VGA unclassified device",
    (0x01, 0x00): "SCSI storage controller",
    (0x01, 0x06): "SATA controller",
    (0x01, 0x08): "Non-Volatile memory controller",
    (0x01, 0x80): "Mass storage controller",
    (0x02, 0x00): "Ethernet controller",
    (0x02, 0x80): "Network controller",
    (0x05, 0x00): "RAM memory",
    (0x06, 0x00): "Host bridge",
    (0x06, 0x01): "ISA bridge",
    (0x06, 0x04): "PCI bridge",
    (0x06, 0x80): "Bridge",
    (0x08, 0x06): "IOMMU",
    (0x08, 0x80): "System peripheral",
    (0x0C, 0x03): "USB controller",
}

VENDOR_NAMES = {
    0x8086: "Intel Corporation",
    0x1AF4: "Red Hat, Inc.",
    0x1B36: "Red Hat, Inc.",
}

DEVICE_NAMES = {
    (0x1B36, 0x0001): "QEMU PCI-PCI bridge",
    (0x1B36, 0x0005): "QEMU PCI Test Device",
    (0x1B36, 0x0008): "QEMU PCIe Host bridge",
    (0x1B36, 0x000C): "QEMU PCIe Root port",
    (0x1AF4, 0x1041): "Virtio 1.0 network device",
    (0x1AF4, 0x1042): "Virtio 1.0 block device",
}


def class_description(class_code: int) -> str:
    """What lspci prints for a 24-bit class code (the prog-if is not shown)."""
    base, sub = class_code >> 16, (class_code >> 8) & 0xFF
    if (base, sub) in SUBCLASS_NAMES:
        return SUBCLASS_NAMES[(base, sub)]
    if base in BASE_CLASS_NAMES:
        return f"{BASE_CLASS_NAMES[base]} [{base:02x}{sub:02x}]"
    return f"Class {base:02x}{sub:02x}"


def device_description(vendor_id: int, device_id: int) -> str:
    """What lspci prints for a vendor/device pair."""
    vendor = VENDOR_NAMES.get(vendor_id)
    if vendor is None:
        return f"Device {vendor_id:04x}:{device_id:04x}"
    device = DEVICE_NAMES.get((vendor_id, device_id), f"Device {device_id:04x}")
    return f"{vendor} {device}"
