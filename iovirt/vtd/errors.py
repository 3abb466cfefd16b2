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
