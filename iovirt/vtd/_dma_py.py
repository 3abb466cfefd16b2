"""A device's IOTLB-miss handler: the readable reference, every miss asks the unit.

The accelerated twin is ``_dma_c.pyx``; :mod:`iovirt.vtd.dma` picks one.
That one serves the common miss (context cached, the walk succeeds, access
allowed) in C; this one hands every miss to
:meth:`iovirt.vtd.dma.DmaRemapper.translate`, the model of record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt.memory import Access
from iovirt.virtio.iotlb import CachedTranslator

if TYPE_CHECKING:
    from iovirt.vtd.dma import DmaRemapper

IMPLEMENTATION = "python"


class DmaTranslatorBase(CachedTranslator):
    """A device translator's state (``source_id``, ``did``) and its miss handler ``fill``.

    ``did`` is the domain whose entries ``cache`` holds (``None``: none yet).
    Subclasses implement ``forget()`` (drop the cache, clear ``did``).
    """

    def __init__(self, remapper: DmaRemapper, source_id: int) -> None:
        super().__init__(remapper.iotlb.capacity)
        self._remapper = remapper
        self.source_id = source_id
        self.did: int | None = None

    def forget(self) -> None:
        """Drop every cached translation (the device's context or the unit's state changed)."""
        raise NotImplementedError(f"{type(self).__name__} must implement forget()")

    def fill(self, iova: int, length: int, access: Access) -> list[tuple[int, int]]:
        """Translate through the unit (see :meth:`DmaRemapper.translate`), copying the entries used."""
        return self._remapper.translate(self.source_id, iova, length, access, self)
