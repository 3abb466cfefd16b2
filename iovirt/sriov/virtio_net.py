"""A virtio-net PF with virtio-net VFs, as QEMU's composable virtio-net SR-IOV builds them.

The PF is a modern virtio-pci net function (vendor 0x1AF4, device 0x1041)
with an SR-IOV capability; it offers ``VIRTIO_F_SR_IOV`` (bit 37, virtio 1.2
§6) so a driver knows it may enable VFs.  Every VF is a full virtio-pci
net function of its own, built by the same transport code: its own common
configuration, queues, device configuration (its own MAC), MSI-X table and
notification area in its own VF BARs, and its own port on the PF's
:class:`~iovirt.virtio.net.switch.LearningSwitch`, so VFs reach each other
and the PF only through the switch.  The VF Device ID is the PF's (0x1041),
so the same driver binds both, as with QEMU's virtio-net VFs.

With ``admin_vq=True`` the PF is the owner of the SR-IOV group (virtio 1.4
2.12): it offers VIRTIO_F_ADMIN_VQ and serves the group's commands on its
administration virtqueue (:mod:`iovirt.sriov.admin`).
"""

from __future__ import annotations

from iovirt.memory import GuestMemory
from iovirt.sriov.admin import SriovAdminGroup
from iovirt.sriov.capability import SriovCapability
from iovirt.sriov.vf import VfRole
from iovirt.virtio.defs import VIRTIO_F_SR_IOV
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.admin.vq import AdminVirtqueue
from iovirt.virtio.transport.defs import VIRTIO_PCI_MODERN_DEVICE_BASE
from iovirt.virtio.transport.pci import Iommu, VirtioPciFunction


class VirtioPciVf(VfRole, VirtioPciFunction):
    """A VF built as a :class:`VirtioPciFunction`: ``VirtioPciVf(sriov, k, device, memory, iommu=None)``."""

    def __init__(
        self, sriov: SriovCapability, vf_index: int, device: VirtioNet, memory: GuestMemory, *, iommu: Iommu | None = None
    ) -> None:
        super().__init__(sriov, vf_index, device, memory, iommu=iommu)


def vf_mac(pf_mac: bytes, vf_index: int) -> bytes:
    """VF ``vf_index``'s MAC: the PF's OUI, the PF's NIC-specific part plus ``vf_index + 1``."""
    nic = (int.from_bytes(pf_mac[3:], "big") + vf_index + 1) & 0xFFFFFF
    return pf_mac[:3] + nic.to_bytes(3, "big")


def make_virtio_net_pf(
    memory: GuestMemory,
    switch: LearningSwitch,
    mac: bytes,
    total_vfs: int = 16,
    *,
    iommu: Iommu | None = None,
    admin_vq: bool = False,
) -> VirtioPciFunction:
    """A virtio-net PF with ``total_vfs`` virtio-net VFs on ``switch``; place it with ``attach_pf``.

    ``admin_vq``: the PF has an administration virtqueue serving the SR-IOV group.
    """

    def make_vf(sriov: SriovCapability, k: int) -> VirtioPciVf:
        device = VirtioNet(vf_mac(mac, k), switch, label=f"vf{k}")
        return VirtioPciVf(sriov, k, device, memory, iommu=iommu)

    pf_device = VirtioNet(mac, switch, label="pf")
    sriov = SriovCapability(total_vfs, VIRTIO_PCI_MODERN_DEVICE_BASE + pf_device.device_id, make_vf)
    admin = AdminVirtqueue([SriovAdminGroup(sriov)], label="pf-admin") if admin_vq else None
    pf = VirtioPciFunction(pf_device, memory, iommu=iommu, transport_features=1 << VIRTIO_F_SR_IOV, admin=admin)
    pf.add_extended_capability(sriov)
    return pf
