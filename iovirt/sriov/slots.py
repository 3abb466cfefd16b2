"""Putting VFs on, and taking them off, their PF's bus.

VFs appear when VF Enable is set and disappear when it is cleared (PCIe
§9.3.3.3.1), so unlike every other function they leave the bus at run
time, through :meth:`~iovirt.pci.bus.PciBus.remove_function`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from iovirt.pci.bus import PciBus
    from iovirt.sriov.vf import VfRole


def attach_vf(bus: PciBus, vf: VfRole, devfn: int) -> None:
    """Place ``vf`` at ``devfn`` of ``bus`` (the slot must be free)."""
    bus.add_function(vf, devfn >> 3, devfn & 7)


def detach_vf(vf: VfRole) -> None:
    """Take ``vf`` off its bus; config accesses to its RID then master-abort."""
    bus = vf.bus
    if bus is None:
        return
    bus.remove_function(vf)
    vf.devfn = 0
