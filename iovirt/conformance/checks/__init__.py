"""The checks, one module per part of the specifications; importing this registers them all.

The import order is the report order: vhost-user, generic virtio, net, blk, rng, input, vsock, scsi;
then the virtio-pci transport checks (for in-process targets only).
"""

from iovirt.conformance.checks import vhost_user  # noqa: F401
from iovirt.conformance.checks import vhost_user_rings  # noqa: F401
from iovirt.conformance.checks import vhost_user_messages  # noqa: F401
from iovirt.conformance.checks import vhost_user_iotlb  # noqa: F401
from iovirt.conformance.checks import features  # noqa: F401
from iovirt.conformance.checks import virtqueue  # noqa: F401
from iovirt.conformance.checks import notifications  # noqa: F401
from iovirt.conformance.checks import packed  # noqa: F401
from iovirt.conformance.checks import net  # noqa: F401
from iovirt.conformance.checks import net_headers  # noqa: F401
from iovirt.conformance.checks import net_gso  # noqa: F401
from iovirt.conformance.checks import blk  # noqa: F401
from iovirt.conformance.checks import blk_edges  # noqa: F401
from iovirt.conformance.checks import blk_zoned  # noqa: F401
from iovirt.conformance.checks import rng  # noqa: F401
from iovirt.conformance.checks import input  # noqa: F401
from iovirt.conformance.checks import vsock  # noqa: F401
from iovirt.conformance.checks import scsi  # noqa: F401
from iovirt.conformance.checks import pci  # noqa: F401
from iovirt.conformance.checks import pci_layout  # noqa: F401
from iovirt.conformance.checks import pci_ring_reset  # noqa: F401
from iovirt.conformance.checks import pci_net_ctrl  # noqa: F401
from iovirt.conformance.checks import admin_vq  # noqa: F401
from iovirt.conformance.checks import admin_device_parts  # noqa: F401
from iovirt.conformance.checks import pci_net_ctrl_rx  # noqa: F401
from iovirt.conformance.checks import pci_net_ctrl_coal  # noqa: F401
