"""iovirt.virtio.admin: group administration commands on an administration virtqueue (virtio 1.4 2.12, 2.13).

- :class:`AdminVirtqueue` -- the device side: an owner device's queue, the
  command rules every group type shares, dispatch to its :class:`AdminGroup`\\ s;
- :class:`AdminClient` -- the driver side, for tests and the conformance suite;
- :mod:`iovirt.virtio.admin.defs` -- opcodes, status codes, structures.

The SR-IOV group of a virtio PF is :class:`iovirt.sriov.admin.SriovAdminGroup`.
"""

from iovirt.virtio.admin.driver import AdminClient, AdminCompletion, admin_cmd
from iovirt.virtio.admin.vq import AdminCommand, AdminGroup, AdminResult, AdminVirtqueue

__all__ = ["AdminClient", "AdminCommand", "AdminCompletion", "AdminGroup", "AdminResult", "AdminVirtqueue", "admin_cmd"]
