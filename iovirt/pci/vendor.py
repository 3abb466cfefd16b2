"""The vendor-specific capability (ID 0x09, PCI 3.0 §6.7 / Code and ID Assignment).

Byte 2 is the capability length; what follows is the vendor's.  virtio-pci
(virtio 1.x §4.1.4) describes its structures with these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt.pci.capability import Capability
from iovirt.pci.errors import PciLayoutError
from iovirt.pci.regs import PCI_CAP_ID_VNDR

if TYPE_CHECKING:
    from iovirt.pci.function import PciFunction


class VendorCapability(Capability):
    """A vendor-specific capability: ``ID, Next, Length`` then ``payload``.

    ``VendorCapability(payload, wmask=None)``; ``wmask`` (same length as
    ``payload``) makes bytes writable.  Subclasses needing side effects (the
    virtio ``pci_cfg`` window) override :meth:`install` and add a config hook
    on their dwords.
    """

    cap_id = PCI_CAP_ID_VNDR

    def __init__(self, payload: bytes, wmask: bytes | None = None) -> None:
        super().__init__()
        if wmask is not None and len(wmask) != len(payload):
            raise PciLayoutError("vendor capability wmask length differs from its payload")
        self.size = 3 + len(payload)
        if self.size > 0xFF:
            raise PciLayoutError(f"vendor capability of {self.size} bytes exceeds 255")
        self.payload = bytes(payload)
        self.payload_wmask = bytes(wmask) if wmask is not None else bytes(len(payload))

    def install(self, function: PciFunction, offset: int) -> None:
        super().install(function, offset)
        cfg = function.config
        cfg.init(offset + 2, 1, self.size)
        if self.payload:
            cfg.init(
                offset + 3,
                len(self.payload),
                int.from_bytes(self.payload, "little"),
                int.from_bytes(self.payload_wmask, "little"),
            )
