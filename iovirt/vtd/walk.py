"""The second-level page walk (VT-d spec 3.7, 9.8), in its accelerated form unless told otherwise.

``TableWalker`` is the C implementation from ``_walk_c`` when it is built,
else the reference from ``_walk_py``, which is the one to read;
``IOVIRT_NO_EXTENSIONS=1`` forces the reference (:mod:`iovirt._accel`).
Both expose ``TableWalker(memory).walk(slptptr, levels, iova) -> (leaf_gpa,
leaf_shift, perm)`` and raise the same :class:`~iovirt.vtd.errors.WalkError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from iovirt import _accel
from iovirt.memory import GuestMemory
from iovirt.vtd import _walk_py
from iovirt.vtd._walk_py import walk_second_level
from iovirt.vtd.errors import WalkError

__all__ = ["IMPLEMENTATION", "TableWalker", "WalkError", "Walker", "implementations", "table_walker",
           "walk_second_level"]

if TYPE_CHECKING:
    from iovirt.vtd._walk_py import IMPLEMENTATION, TableWalker
else:
    _impl = _accel.load("iovirt.vtd._walk_c") or _walk_py
    IMPLEMENTATION, TableWalker = _impl.IMPLEMENTATION, _impl.TableWalker

#: ``walk(slptptr, levels, iova) -> (leaf_gpa, leaf_shift, perm)`` over one memory.
Walker = Callable[[int, int, int], tuple[int, int, int]]


def table_walker(mem: GuestMemory) -> Walker:
    """The walk over ``mem`` of the ``TableWalker`` that runs."""
    return TableWalker(mem).walk


def implementations() -> dict[str, type]:
    """Every importable ``TableWalker`` implementation by name (for tests)."""
    return _accel.implementations("iovirt.vtd._walk_c", _walk_py, "TableWalker")
