"""VF routing IDs: First VF Offset, VF Stride, and where each VF sits.

PCIe §9.3.3.10-11: the routing ID of VF ``n`` (0-based here; the spec
counts VFs from 1) is ``PF RID + First VF Offset + n * VF Stride``, a 16-bit
sum, so a VF may land on a later bus than the PF.  Linux
(``drivers/pci/iov.c pci_iov_virtfn_bus/devfn``) and QEMU (``pcie_sriov.c``)
compute the same thing.  A device may choose different Offset/Stride for
every NumVFs and for both values of ARI Capable Hierarchy; a
:data:`VfRouting` policy says which.
"""

from __future__ import annotations

from typing import Callable

VfRouting = Callable[[int, bool], "tuple[int, int]"]
"""``routing(num_vfs, ari) -> (first_vf_offset, vf_stride)``."""


def default_routing(num_vfs: int, ari: bool) -> tuple[int, int]:
    """VFs packed one function apart, right after the PF.

    With ARI Capable Hierarchy set the 8-bit ARI function space is flat, so
    the VFs follow the PF directly (offset 1).  Without ARI a function
    number is 3 bits wide, so the VFs start at the next device (offset 8)
    and never share the PF's device.  The stride is 1 even for a single VF.
    """
    return (1 if ari else 8), 1


def vf_routing_id(pf_rid: int, offset: int, stride: int, n: int) -> int:
    """Routing ID of VF ``n`` (0-based); may exceed 0xFFFF when it does not exist."""
    return pf_rid + offset + stride * n
