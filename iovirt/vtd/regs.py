"""VT-d remapping-hardware register offsets, bit fields and capability values.

Intel VT-d specification, chapter 11 ("Register Descriptions"); offsets as in
QEMU's ``intel_iommu_internal.h``.  Names follow the spec (``RTADDR``,
``CCMD``, ``FSTS``...).  This module is data only: the register file that
holds the values lives in :mod:`iovirt.vtd.regfile`.
"""

from __future__ import annotations

# -- offsets (spec 11.4) ------------------------------------------------------
VER = 0x00
CAP = 0x08
ECAP = 0x10
GCMD = 0x18
GSTS = 0x1C
RTADDR = 0x20
CCMD = 0x28
FSTS = 0x34
FECTL = 0x38
FEDATA = 0x3C
FEADDR = 0x40
FEUADDR = 0x44
IQH = 0x80
IQT = 0x88
IQA = 0x90
ICS = 0x9C
IECTL = 0xA0
IEDATA = 0xA4
IEADDR = 0xA8
IEUADDR = 0xAC
IRTA = 0xB8
IVA = 0xF0  # ECAP.IRO * 16
IOTLB = 0xF8  # IVA + 8
FRCD = 0x220  # CAP.FRO * 16; each fault recording register is 128 bits

#: Host address width: guest-physical addresses (table pointers, PTE
#: addresses) above bit HAW-1 are reserved (CAP.MGAW reports the same width).
HAW = 48
HAW_MASK = (1 << HAW) - 1
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
ADDR_MASK = HAW_MASK & PAGE_MASK  # bits HAW-1:12

# -- VER (11.4.1) ---------------------------------------------------------------
VER_VALUE = 0x10  # major 1, minor 0

# -- CAP (11.4.2) -----------------------------------------------------------------
CAP_ND_64K = 6  # ND 2:0: 16-bit domain ids
CAP_SAGAW_SHIFT = 8
SAGAW_39 = 1 << 1  # 3-level second-level tables
SAGAW_48 = 1 << 2  # 4-level
CAP_MGAW_SHIFT = 16
CAP_FRO_SHIFT = 24
CAP_SLLPS_SHIFT = 34
SLLPS_2M = 1 << 0
SLLPS_1G = 1 << 1
CAP_PSI = 1 << 39
CAP_NFR_SHIFT = 40
CAP_MAMV_SHIFT = 48
CAP_DWD = 1 << 54
CAP_DRD = 1 << 55
MAMV = 18  # largest address mask a page-selective invalidation may use


def cap_value(num_fault_records: int) -> int:
    """CAP as this model advertises it: 39/48-bit SAGAW, 2M/1G pages, PSI, NFR."""
    return (
        CAP_ND_64K
        | (SAGAW_39 | SAGAW_48) << CAP_SAGAW_SHIFT
        | (HAW - 1) << CAP_MGAW_SHIFT
        | (FRCD // 16) << CAP_FRO_SHIFT
        | (SLLPS_2M | SLLPS_1G) << CAP_SLLPS_SHIFT
        | CAP_PSI
        | (num_fault_records - 1) << CAP_NFR_SHIFT
        | MAMV << CAP_MAMV_SHIFT
        | CAP_DWD
        | CAP_DRD
    )


# -- ECAP (11.4.3) --------------------------------------------------------------
ECAP_C = 1 << 0  # page-walk coherency: no clflush needed by the driver
ECAP_QI = 1 << 1
ECAP_DT = 1 << 2
ECAP_IR = 1 << 3
ECAP_EIM = 1 << 4  # not advertised: xAPIC destinations only
ECAP_PT = 1 << 6
ECAP_IRO_SHIFT = 8
ECAP_MHMV_SHIFT = 20
MHMV = 0xF

ECAP_VALUE = (
    ECAP_C | ECAP_QI | ECAP_DT | ECAP_IR | ECAP_PT
    | (IVA // 16) << ECAP_IRO_SHIFT
    | MHMV << ECAP_MHMV_SHIFT
)

# -- GCMD / GSTS (11.4.4, 11.4.5): same bit positions ------------------------------
TE = 1 << 31  # translation enable / TES
SRTP = 1 << 30  # set root table pointer / RTPS
SFL = 1 << 29  # set fault log (not supported: CAP.AFL=0)
EAFL = 1 << 28
WBF = 1 << 27  # write buffer flush / WBFS
QIE = 1 << 26  # queued invalidation enable / QIES
IRE = 1 << 25  # interrupt remapping enable / IRES
SIRTP = 1 << 24  # set interrupt remap table pointer / IRTPS
CFI = 1 << 23  # compatibility format interrupt / CFIS
#: Bits that act on every write with 1 and leave no persistent state.
GCMD_ONE_SHOT = SRTP | SFL | WBF | SIRTP
#: Bits whose written value is the new enable state mirrored in GSTS.
GCMD_PERSISTENT = TE | QIE | IRE | CFI

# -- RTADDR (11.4.6) -------------------------------------------------------------

# -- CCMD (11.4.7) ---------------------------------------------------------------
CCMD_ICC = 1 << 63
CCMD_CIRG_SHIFT = 61
CCMD_CAIG_SHIFT = 59
CCMD_FM_SHIFT = 32
CCMD_SID_SHIFT = 16
CC_GLOBAL = 1
CC_DOMAIN = 2
CC_DEVICE = 3

# -- FSTS (11.4.9.1) ---------------------------------------------------------------
FSTS_PFO = 1 << 0
FSTS_PPF = 1 << 1
FSTS_AFO = 1 << 2
FSTS_APF = 1 << 3
FSTS_IQE = 1 << 4
FSTS_ICE = 1 << 5
FSTS_ITE = 1 << 6
FSTS_FRI_SHIFT = 8
FSTS_FRI_MASK = 0xFF << FSTS_FRI_SHIFT
FSTS_W1C = FSTS_PFO | FSTS_AFO | FSTS_APF | FSTS_IQE | FSTS_ICE | FSTS_ITE
#: Conditions that keep a fault event pending (no new interrupt while set).
FSTS_EVENT_CONDITIONS = FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE

# -- FECTL / IECTL (11.4.9.2, 11.4.10.4) --------------------------------------------
CTL_IM = 1 << 31
CTL_IP = 1 << 30

# -- IQA / IQH / IQT (11.4.10) --------------------------------------------------------
IQA_QS_MASK = 0x7
IQ_INDEX_SHIFT = 4  # QH/QT hold the index of a 128-bit descriptor in bits 18:4
IQ_INDEX_MASK = 0x7FFF << IQ_INDEX_SHIFT
ICS_IWC = 1 << 0

# -- IRTA (11.4.11) -------------------------------------------------------------------
IRTA_S_MASK = 0xF
IRTA_EIME = 1 << 11  # reserved here: ECAP.EIM=0 (defined behaviour: ignored, reads 0)

# -- IVA / IOTLB (11.4.8) -------------------------------------------------------------
IVA_AM_MASK = 0x3F
IVA_IH = 1 << 6
IOTLB_IVT = 1 << 63
IOTLB_IIRG_SHIFT = 60
IOTLB_IAIG_SHIFT = 57
IOTLB_DR = 1 << 49
IOTLB_DW = 1 << 48
IOTLB_DID_SHIFT = 32
IOTLB_GLOBAL = 1
IOTLB_DOMAIN = 2
IOTLB_PAGE = 3

# -- fault recording registers (11.4.14) ---------------------------------------------
FRCD_HI_F = 1 << 63
FRCD_HI_T = 1 << 62  # 1 = read request, 0 = write request
FRCD_HI_FR_SHIFT = 32
