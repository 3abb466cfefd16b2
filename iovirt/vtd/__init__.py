"""iovirt.vtd: an Intel VT-d remapping unit model (legacy mode) and a driver helper.

- :class:`VtdUnit`: registers (``mmio_read``/``mmio_write``), DMA remapping
  (``dma_translator(source_id)`` -> an :class:`iovirt.memory.Translator`),
  interrupt remapping (``remap_msi``), faults and invalidation.
- :class:`VtdDriver`: programs a unit the way Linux's intel-iommu does.
- :class:`MsiSink`: where the unit's own event interrupts are delivered.
"""

from iovirt.vtd.dma import DmaTranslator
from iovirt.vtd.driver import Domain, VtdDriver, VtdDriverError
from iovirt.vtd.errors import VtdConfigError, VtdError
from iovirt.vtd.events import MsiSink
from iovirt.vtd.faults import DmarFault
from iovirt.vtd.unit import MMIO_SIZE, VtdUnit

__all__ = [
    "Domain",
    "DmaTranslator",
    "DmarFault",
    "MMIO_SIZE",
    "MsiSink",
    "VtdConfigError",
    "VtdDriver",
    "VtdDriverError",
    "VtdError",
    "VtdUnit",
]
