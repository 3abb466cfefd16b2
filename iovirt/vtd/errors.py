"""Exceptions of the VT-d model.

Guest mistakes never raise out of the unit (they become faults or IQE);
these are for the raising APIs: bad construction arguments and the
driver helper, which reports what the hardware refused.
"""

from __future__ import annotations

from iovirt.errors import IovirtError


class VtdError(IovirtError):
    """Root of the VT-d model's exceptions."""


class VtdConfigError(VtdError):
    """A unit or driver was built with an unsupported parameter.

    Attributes: ``name`` and ``value`` of the parameter.
    """

    def __init__(self, name: str, value: object, expected: str) -> None:
        super().__init__(f"VT-d {name}={value!r} is not supported; expected {expected}")
        self.name = name
        self.value = value


class WalkError(VtdError):
    """A second-level page walk hit a fault other than missing permission (VT-d spec 7.2).

    Attributes: ``fault_reason`` (the FR code), ``level`` and ``entry_addr``
    of the entry that failed.
    """

    def __init__(self, fault_reason: int, level: int, entry_addr: int) -> None:
        super().__init__(f"second-level walk failed at level {level} (entry at {entry_addr:#x}): "
                         f"fault reason {fault_reason:#x}")
        self.fault_reason = fault_reason
        self.level = level
        self.entry_addr = entry_addr
