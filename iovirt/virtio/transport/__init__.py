"""iovirt.virtio.transport: the in-process virtio-pci modern transport (virtio 1.2 section 4.1).

- :class:`VirtioPciFunction` -- a :class:`~iovirt.pci.function.PciFunction`
  exposing a :class:`~iovirt.virtio.device.VirtioDevice` through the virtio
  vendor capabilities, a BAR with the common/ISR/device/notify structures and
  MSI-X.
- :class:`CommonCfg` -- the common configuration registers and the device
  status state machine.
- :func:`find_virtio_caps` -- the driver side: locate the structures by
  walking the capability list.
"""

from iovirt.virtio.transport.caps import VirtioCapInfo, VirtioPciCap, VirtioPciCfgCap, find_virtio_caps
from iovirt.virtio.transport.common_cfg import CommonCfg, VirtqueueConfig
from iovirt.virtio.transport.pci import VirtioPciFunction

__all__ = [
    "CommonCfg",
    "VirtioCapInfo",
    "VirtioPciCap",
    "VirtioPciCfgCap",
    "VirtioPciFunction",
    "VirtqueueConfig",
    "find_virtio_caps",
]
