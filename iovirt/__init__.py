"""iovirt: an I/O-virtualization device-model suite.

Layers (bottom up): guest memory (:mod:`iovirt.memory`), virtqueues
(:mod:`iovirt.virtio`), virtio devices, PCI (:mod:`iovirt.pci`), SR-IOV,
VT-d, virtual LAPICs and timers, and the vhost-user backend.
"""

from iovirt.errors import IovirtError

__version__ = "0.1.0"

__all__ = ["IovirtError", "__version__"]
