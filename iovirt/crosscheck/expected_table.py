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
"""The pci_cfg window's ``bar`` does not name the BAR holding the virtio structures."""
QI_DISABLED_PENDING = "qi-disabled-pending"
"""Earlier in the sequence, GCMD.QIE was cleared while QIES was set and either IQH != IQT or the
last descriptor processed was not a wait descriptor (QEMU's condition for refusing)."""
IQE_CLEARED_PENDING = "iqe-cleared-pending"
"""Earlier, software cleared FSTS.IQE with queued invalidation on and descriptors left (IQH != IQT)."""
IQA_WRITTEN_QI_ON = "iqa-written-qi-on"
"""Earlier, software wrote IQA while queued invalidation was on."""
BAD_DESCRIPTOR_ACCEPTED = "bad-descriptor-accepted"
"""Earlier, iovirt stopped the queue (IQE) at an interrupt-entry-cache descriptor with reserved bits set, or
at a PASID-based descriptor (type 6 or 7)."""
CCMD_DOMAIN_REQUEST = "ccmd-domain-request"
"""The last CCMD write requested a domain-selective context-cache invalidation (CIRG 10b)."""
REGISTER_INVALIDATION_QI_ON = "register-invalidation-qi-on"
"""Earlier, software wrote CCMD's or IOTLB's upper half (where ICC/IVT live) while queued invalidation was on."""

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

# Queued invalidation (VT-d 3.x §6.5.2): after each of the conditions below QEMU's queue and iovirt's
# are in different states for the rest of the sequence, so every register bit the queue drives
# (and the wait descriptors' status writes) may differ.
_QI_DRIVEN = (
    ("vtd", 0x1C, 4, 1 << 26, "GSTS.QIES"),
    ("vtd", 0x34, 4, 1 << 4, "FSTS.IQE"),
    ("vtd", 0x38, 4, 1 << 30, "FECTL.IP"),
    ("vtd", 0x80, 8, 0x7FFF0, "IQH"),
    ("vtd", 0x88, 8, 0x7FFF0, "IQT"),
    ("vtd", 0x9C, 4, 1, "ICS.IWC"),
    ("vtd", 0xA0, 4, 1 << 30, "IECTL.IP"),
    ("status", 0, 32, (1 << 256) - 1, "the wait descriptors' status writes"),
)
_REGISTER_INVALIDATION = (
    ("vtd", 0x28, 8, 1 << 63 | 0x3 << 59, "CCMD.ICC and CAIG"),
    ("vtd", 0xF8, 8, 1 << 63 | 0x3 << 57, "IOTLB.IVT and IAIG"),
)


def _qi_entries(
    condition: str, operation: str, spec: str, reason: str, bits: tuple[tuple[str, int, int, int, str], ...]
) -> tuple[ExpectedDifference, ...]:
    return tuple(
        ExpectedDifference("vtd-regs", space, offset, size, mask, f"{operation}, then read {what}", spec, reason,
                           condition=condition)
        for space, offset, size, mask, what in bits
    )


EXPECTED += _qi_entries(
    QI_DISABLED_PENDING,
    "clear GCMD.QIE while IQH != IQT, or when the last descriptor processed was not a wait descriptor",
    "VT-d 3.x §6.5.2 and §11.4.4: software disables queued invalidation once the descriptors it submitted "
    "have been processed (IQH == IQT); disabling with descriptors pending is not defined, and nothing "
    "requires the last descriptor to be a wait descriptor",
    "QEMU refuses the disable (QIES stays set, the queue keeps running) unless IQH == IQT and the last "
    "descriptor it processed was a wait descriptor; iovirt disables (with IQH == IQT: QEMU departs from "
    "the spec; with IQH != IQT: undefined)",
    _QI_DRIVEN + _REGISTER_INVALIDATION,
)
EXPECTED += _qi_entries(
    IQE_CLEARED_PENDING,
    "clear FSTS.IQE with queued invalidation on and descriptors after IQH",
    "VT-d 3.x §6.5.2.10: after an invalidation queue error hardware stops at the descriptor that failed "
    "(IQH points at it) until software clears FSTS.IQE, and then fetches again from IQH",
    "QEMU fetches again only on the next IQT write (vtd_handle_fsts_write leaves it as a FIXME); iovirt "
    "resumes when IQE is cleared",
    _QI_DRIVEN,
)
EXPECTED += _qi_entries(
    IQA_WRITTEN_QI_ON,
    "write IQA while queued invalidation is on",
    "VT-d 3.x §6.5.2 and §11.4.10: software programs IQA before it enables queued invalidation; the spec "
    "gives no outcome for changing it while QIES is set",
    "undefined by the spec: QEMU keeps fetching from the base it latched at enable, iovirt from the register",
    _QI_DRIVEN,
)
EXPECTED += _qi_entries(
    REGISTER_INVALIDATION_QI_ON,
    "write CCMD or IOTLB (upper half) while queued invalidation is on",
    "VT-d 3.x §6.5.2: while queued invalidation is enabled software must not use the register-based "
    "invalidation interface; the spec gives no outcome",
    "undefined by the spec: QEMU leaves ICC/IVT set (the request never completes), iovirt ignores the "
    "request and clears ICC/IVT",
    _REGISTER_INVALIDATION,
)
EXPECTED += _qi_entries(
    BAD_DESCRIPTOR_ACCEPTED,
    "post an interrupt-entry-cache descriptor with reserved bits set, or a descriptor of type 6 or 7",
    "VT-d 3.x §6.5.2.10: a descriptor of a type the unit does not support in its translation mode (types 6 "
    "and 7 are PASID-based, scalable mode only) or with reserved fields set is an invalidation queue "
    "error: FSTS.IQE is set and IQH stays on it",
    "QEMU checks no reserved field of the interrupt-entry-cache descriptor and accepts types 6 and 7 in "
    "legacy mode as no-ops, so its queue runs on where iovirt's stops",
    _QI_DRIVEN,
)
EXPECTED += (
    ExpectedDifference(
        "vtd-regs", "vtd", 0x28, 8, 0x3 << 59,
        "request a domain-selective context-cache invalidation (CIRG 10b) in CCMD, read CAIG",
        "VT-d 3.x §11.4 (CCMD): hardware may carry out a request at a coarser granularity and reports the "
        "granularity it used in CAIG",
        "an implementation choice: QEMU invalidates the whole context cache and reports global (01b), "
        "iovirt invalidates the domain and reports domain (10b)",
        condition=CCMD_DOMAIN_REQUEST,
    ),
    ExpectedDifference(
        "vtd-regs", "vtd", 0xB8, 8, 1 << 11,
        "write IRTA.EIME (bit 11), read IRTA",
        "VT-d 3.x §11.4 (IRTA): EIME is RsvdZ on a unit reporting ECAP.EIM clear, as QEMU's unit here does "
        "(checked at start)",
        "QEMU's IRTA write mask always includes bit 11",
    ),
    ExpectedDifference(
        "vtd-regs", "vtd", 0xA4, 4, 0xFFFF0000,
        "write IEDATA's upper 16 bits (EIMD), read IEDATA",
        "VT-d 3.x §11.4 (FEDATA, IEDATA): EIMD, bits 31:16, exists only on units that support 32-bit "
        "interrupt data, and is reserved on the others; x86 interrupt messages carry 16 bits of data "
        "(Intel SDM vol. 3 §11.11.2: message data bits 31:16 are reserved)",
        "QEMU implements 32-bit data in IEDATA but 16-bit in FEDATA (one unit cannot be both); iovirt is a "
        "16-bit-data unit in both registers",
    ),
    ExpectedDifference(
        "vtd-regs", "vtd", 0x20, 8, 0x3 << 10,
        "write RTADDR's Translation Table Mode (bits 11:10), read RTADDR",
        "VT-d 3.x §11.4.5: TTM 01b (scalable mode) needs ECAP.SMTS and 11b (abort-DMA mode) ECAP.ADMS, both "
        "clear on this unit, and 10b is reserved; the unit reports VER 1.0, whose RTADDR has bits 11:0 "
        "reserved",
        "QEMU stores bits 11:10 whatever ECAP reports (and acts on bit 10 at SRTP); iovirt, a legacy-mode "
        "unit, keeps them reserved",
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

# SR-IOV (area ``sriov``): offsets relative to the PF's SR-IOV capability, ``vf`` offsets are
# ``devfn << 12 | register``.  Bits assume QEMU's nvme layout, which :mod:`iovirt.crosscheck.sriov`
# checks at start: Supported Page Sizes 0x553, VF BAR0 a 16 KiB 64-bit BAR.
SRIOV_NUMVFS_DIVERGED = "sriov-numvfs-diverged"
"""Earlier, VF Enable was cleared with VFs enabled, or NumVFs was written while VF Enable was set, or
NumVFs was written above TotalVFs."""
SRIOV_VF_PRESENCE_DIVERGED = "sriov-vf-presence-diverged"
"""SRIOV_NUMVFS_DIVERGED holds and the VF read exists on one side only.  The area matches this entry
itself, for a read at any register of that VF (its offset, size and bits say only "a whole dword")."""
SRIOV_PAGE_DIVERGED = "sriov-page-diverged"
"""Earlier, System Page Size was written while VF Enable was set, or with a value that is not one
supported page size."""
SRIOV_ARI_DIVERGED = "sriov-ari-diverged"
"""Earlier, ARI Capable Hierarchy was changed while VF Enable was set."""
SRIOV_PAGE_ABOVE_BAR = "sriov-page-above-bar"
"""Earlier in the sequence (or now), System Page Size was larger than VF BAR0."""

_NUMVFS_UNDEFINED = (
    "PCIe 4.0 §9.3.3.7: NumVFs is RW and keeps what software wrote; software may write it only while "
    "VF Enable is clear, and results are undefined if it is written while VF Enable is set or set "
    "above TotalVFs; nothing but a PF reset returns it to 0"
)
EXPECTED += (
    ExpectedDifference(
        "sriov", "sriov", 0x10, 2, 0xFFFF,
        "clear VF Enable with VFs enabled (or write NumVFs while VF Enable is set, or above TotalVFs), "
        "read NumVFs", _NUMVFS_UNDEFINED,
        "QEMU 7.2 zeroes NumVFs when it disables the VFs (unregister_vfs; fixed upstream in 2024), which the "
        "spec does not allow; the other two are undefined by the spec: QEMU stores the value, iovirt keeps "
        "NumVFs as it was (so NumVFs never exceeds TotalVFs and always matches the enabled VFs)",
        condition=SRIOV_NUMVFS_DIVERGED,
    ),
    ExpectedDifference(
        "sriov", "vf", 0, 0x1000, 0xFFFFFFFF,
        "after the NumVFs difference above, set VF Enable and read a VF's configuration space",
        "PCIe 4.0 §9.3.3.3.1: setting VF Enable makes NumVFs VFs visible at their routing IDs",
        "a consequence of the NumVFs difference: the two sides enable different numbers of VFs, so a VF "
        "that exists on one side reads all-ones on the other (a VF present on both must still match)",
        condition=SRIOV_VF_PRESENCE_DIVERGED,
    ),
    ExpectedDifference(
        "sriov", "sriov", 0x20, 4, 0x553,
        "write System Page Size while VF Enable is set, or with zero, several or unsupported page bits, "
        "read it",
        "PCIe 4.0 §9.3.3.13: software must write exactly one of the Supported Page Sizes and must not change "
        "it while VF Enable is set; other writes give undefined results",
        "undefined by the spec: QEMU stores the write under its Supported Page Sizes mask, iovirt ignores "
        "the write and keeps the page size it had",
        condition=SRIOV_PAGE_DIVERGED,
    ),
    ExpectedDifference(
        "sriov", "sriov", 0x08, 1, 0x10,
        "change ARI Capable Hierarchy while VF Enable is set, read SR-IOV Control",
        "PCIe 4.0 §9.3.3.3.5: ARI Capable Hierarchy may be changed only while VF Enable is clear; "
        "changing it with VFs enabled gives undefined results (their routing IDs would move)",
        "undefined by the spec: QEMU stores the bit, iovirt keeps it until VF Enable is clear",
        condition=SRIOV_ARI_DIVERGED,
    ),
    ExpectedDifference(
        "sriov", "sriov", 0x24, 4, 0x003FC000,
        "set a System Page Size larger than VF BAR0 (16 KiB), size or write VF BAR0, read it",
        "PCIe 4.0 §9.3.3.13-14: every VF BAR is aligned to and sized as a whole number of System Page Size "
        "bytes, so with a 64 KiB page a 16 KiB VF BAR reads back a 64 KiB mask and its address bits "
        "below 64 KiB are read-only 0",
        "QEMU's VF BAR write masks are fixed at the VFs' own BAR size whatever the System Page Size",
        condition=SRIOV_PAGE_ABOVE_BAR,
    ),
)
SRIOV_VF_COMMAND_MSE = "sriov-vf-command-mse"
"""Software wrote Memory Space Enable to this VF's Command register since QEMU registered the VF."""
SRIOV_VF_DECODE_DIFFERS = "sriov-vf-decode-differs"
"""A VF BAR read where iovirt's VF MSE rule and QEMU's per-VF Command rule disagree on whether a VF decodes (or
the two sides' VFs or VF BAR layout have diverged already)."""
SRIOV_UNCLAIMED_READ = "sriov-unclaimed-read"
"""A VF BAR window read no function decodes, on either side."""
EXPECTED += (
    ExpectedDifference(
        "sriov", "vf", 0x04, 2, 0x0002,
        "write Memory Space Enable to a VF's Command register, read it",
        "PCIe 4.0 §9.3.4.1.3: a VF's Command register Memory Space Enable is RO 0; the VFs' memory space is "
        "enabled by VF MSE in the PF's SR-IOV Control",
        "QEMU 7.2 keeps a VF's Command register writable like a PF's",
        condition=SRIOV_VF_COMMAND_MSE,
    ),
    ExpectedDifference(
        "sriov", "vfbar", 0, 0x10000, (1 << (8 * 0x10000)) - 1,
        "set or clear VF MSE (or a VF's own Command.MSE), read a VF's BAR0 (its MSI-X Vector Control or PBA)",
        "PCIe 4.0 §9.3.3.3.4: VF MSE in the PF's SR-IOV Control enables the memory space of every VF: with VF "
        "Enable and VF MSE set VF n decodes VF BAR0 + n * size, with VF MSE clear no VF decodes (§9.3.4.1.3: "
        "a VF's own Command.MSE is RO 0)",
        "QEMU 7.2 ignores VF MSE: a VF decodes its BAR once software sets Memory Space Enable in that VF's "
        "Command register, at the VF BAR address of that moment, VF MSE set or not",
        condition=SRIOV_VF_DECODE_DIFFERS,
    ),
    ExpectedDifference(
        "sriov", "vfbar", 0, 4, 0xFFFFFFFF,
        "read a VF BAR address no function decodes",
        "PCIe 4.0 §2.3.2 and PCI 3.0 §3.6 (master abort): a read no function claims completes as Unsupported "
        "Request and the Root Complex returns all-ones to the CPU",
        "QEMU's unassigned PCI memory reads return 0",
        condition=SRIOV_UNCLAIMED_READ,
    ),
)
EXPECTED += (
    ExpectedDifference(
        "sriov", "vf", 0x3D, 1, 0xFF,
        "read a VF's Interrupt Pin",
        "PCIe 4.0 §9.3.4.1: VFs do not implement INTx, so a VF's Interrupt Pin (like its Interrupt Line) is "
        "read-only 0",
        "QEMU's VF copies the PF's Interrupt Pin (01h, INTA)",
    ),
)

# VT-d DMA (area ``vtd-dma``): space ``fault`` is the fault log after a DMA request as one 20-byte
# little-endian integer: FSTS (bytes 0-3, PFO left out), FRCD low (4-11), FRCD high (12-19).
IOTLB_PERMISSION_HIT = "iotlb-permission-hit"
"""The request the fault log differs on was refused on permission by an IOTLB entry the same requester filled
earlier with an access of the other direction."""
PERMISSION_BEFORE_RESERVED = "permission-before-reserved"
"""iovirt's walk of the request met reserved bits (Ch) in a present entry at or below an entry on the same path that
does not grant the request's access."""
EXPECTED += (
    ExpectedDifference(
        "vtd-dma", "fault", 0, 20, 0xFF << 128,
        "walk a path whose entry at some level lacks the request's R or W while an entry at that level or below has "
        "reserved bits set; read the fault reason",
        "VT-d 3.x §3.7.1 and §7.1.3: the effective permissions are the AND of R/W over every level, reserved bits "
        "of every present entry (R or W set) are a fault (Ch); for a request meeting both conditions the spec gives "
        "no order, either reason describes it",
        "an implementation choice: QEMU checks the requested right at each level before that level's reserved bits "
        "and stops at the first level lacking it (5h/6h); iovirt walks every present level, checking reserved bits, "
        "and applies the combined permissions at the leaf (Ch)",
        condition=PERMISSION_BEFORE_RESERVED,
    ),
)
UNBACKED_TABLE = "unbacked-table"
"""iovirt's first fault for the request came from a table read at an address no memory backs (a context table,
the top table of SLPTPTR or a lower page table outside RAM)."""
EXPECTED += (
    ExpectedDifference(
        "vtd-dma", "fault", 0, 20, 0xFF << 128,
        "point a root entry, a context entry's SLPTPTR or a second-level entry at an address no memory backs, "
        "do DMA through it, read the fault reason",
        "VT-d 3.x §7.1.3 and the fault-reason table: an attempt to access a context table (9h), the table "
        "SLPTPTR names (3h) or a next-level paging entry (7h) that results in an error is reported as such",
        "QEMU's table reads of unassigned guest-physical addresses complete with zeros (q35 routes them to the "
        "PCI address space, which answers), so it sees a not-present entry and reports 2h (context) or a "
        "read/write permission fault (5h/6h, second level); iovirt reports the access error",
        condition=UNBACKED_TABLE,
    ),
)
NO_ROOT_TABLE = "no-root-table"
"""Translation is enabled (GSTS.TES) and no root table pointer has been set (no GCMD.SRTP since reset)."""
EXPECTED += (
    ExpectedDifference(
        "vtd-dma", "fault", 0, 20, 0xFF << 128,
        "enable translation (GCMD.TE) without ever setting the root table pointer (GCMD.SRTP), do DMA, read the "
        "fault reason",
        "VT-d 3.x §11.4.4 (GCMD.TE, SRTP): software sets the root table pointer before it enables translation; "
        "the spec gives no outcome for a request translated with no root table pointer set",
        "undefined by the spec: QEMU walks a root table at RTADDR's reset value 0 (RAM, zero there: root entry "
        "not present, 1h), iovirt reports the root table as inaccessible (8h)",
        condition=NO_ROOT_TABLE,
    ),
    ExpectedDifference(
        "vtd-dma", "fault", 0, 20, 0xFF02 | ((1 << 128) - 1) << 32,
        "read (or write) a page through an IOTLB entry the same device filled by a write (or read), the page "
        "granting only that other access; read the fault log",
        "VT-d 3.x §7.1.3 (conditions LGN.x: a request the effective permissions do not allow is blocked with "
        "fault reason 5h/6h) and §6.2.2 (the IOTLB caches the effective permissions): the request is blocked and "
        "the fault recorded whether the permissions came from a walk or from the IOTLB",
        "QEMU records a permission fault only when the page walk finds it; on an IOTLB hit its translate callback "
        "returns the cached permissions and the memory core drops the access as unassigned, with no fault record",
        condition=IOTLB_PERMISSION_HIT,
    ),
)
