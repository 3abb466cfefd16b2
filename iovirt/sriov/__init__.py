"""iovirt.sriov: SR-IOV physical and virtual functions on the PCI model.

Give a PCI Express function an :class:`SriovCapability` with a VF builder,
place it with :func:`attach_pf`, and a driver (or :class:`SriovDriver`, the
Linux ``drivers/pci/iov.c`` sequence) enables VFs through config space::

    def make_vf(sriov, k):
        vf = VirtualFunction(sriov, k)
        vf.add_capability(PcieCapability())
        vf.add_bar(0, Bar(0x4000))
        return vf
    pf = PciFunction(0x1AF4, 0x1041, 0x020000, pcie=True)
    pf.add_capability(PcieCapability())
    pf.add_extended_capability(SriovCapability(16, 0x1041, make_vf))
    attach_pf(host.root_bus, pf, 3)
    vfs = SriovDriver(host, 0, 3, 0).configure(7, BumpAllocator(0xE000_0000, 1 << 24))
"""

from iovirt.sriov.capability import SriovCapability, VfBarLayout, VfFactory, attach_pf, find_sriov
from iovirt.sriov.errors import SriovDriverError, SriovError, SriovLayoutError
from iovirt.sriov.routing import VfRouting, default_routing, vf_routing_id
from iovirt.sriov.driver import EnumeratedVf, SriovDriver
from iovirt.sriov.vf import VfBarWindow, VfRole, VirtualFunction

__all__ = [
    "SriovCapability",
    "EnumeratedVf",
    "SriovDriver",
    "SriovDriverError",
    "SriovError",
    "SriovLayoutError",
    "VfBarLayout",
    "VfBarWindow",
    "VfFactory",
    "VfRole",
    "VfRouting",
    "VirtualFunction",
    "attach_pf",
    "default_routing",
    "find_sriov",
    "vf_routing_id",
]
