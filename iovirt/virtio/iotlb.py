"""A translation cache (IOTLB) and the base class of cached translators.

``IotlbCache`` and ``CachedTranslator`` come from the Cython ``_iotlb_c`` when
it is built, else from the reference ``_iotlb_py``; ``IOVIRT_NO_EXTENSIONS=1``
forces the reference.  A translator that subclasses ``CachedTranslator``
(``fill`` is its miss handler) is translated by the accelerated ring in C,
without the GIL on a hit; any other translator takes the ring's slow path.

- ``IotlbCache(capacity)``: ``insert(iova, gpa, size, perm)``,
  ``lookup(iova, length, access) -> (gpa, run, perm) | None``,
  ``invalidate(iova, size)``, ``invalidate_all()``, ``entries()``, ``len()``,
  ``hits``, ``misses``.
- ``CachedTranslator(capacity)``: ``cache``, ``translate(addr, length, access)``
  (the :class:`iovirt.memory.Translator` protocol), ``fill(iova, length, access)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iovirt import _accel
from iovirt.virtio import _iotlb_py

__all__ = ["CachedTranslator", "IotlbCache", "IMPLEMENTATION", "PAGE_SIZES", "implementations"]

if TYPE_CHECKING:
    from iovirt.virtio._iotlb_py import IMPLEMENTATION, PAGE_SIZES, CachedTranslator, IotlbCache
else:
    _impl = _accel.load("iovirt.virtio._iotlb_c") or _iotlb_py
    IMPLEMENTATION, PAGE_SIZES = _impl.IMPLEMENTATION, _impl.PAGE_SIZES
    CachedTranslator, IotlbCache = _impl.CachedTranslator, _impl.IotlbCache


def implementations() -> dict[str, type]:
    """Every importable ``IotlbCache`` implementation by name (for tests)."""
    return _accel.implementations("iovirt.virtio._iotlb_c", _iotlb_py, "IotlbCache")
