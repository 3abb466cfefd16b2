"""Errors raised by the SR-IOV model.

Build-time problems (a PF whose VFs would not fit on its bus, a VF whose
BARs disagree with the PF's) raise :class:`SriovLayoutError`; the driver
helper (:mod:`iovirt.sriov.driver`) is a raising API and reports what Linux
would return as :class:`SriovDriverError`.  What a driver writes to the
capability is never raised: the capability logs it and behaves as the spec
says.
"""

from __future__ import annotations

from iovirt.pci.errors import PciError


class SriovError(PciError):
    """Root of the SR-IOV model's errors."""


class SriovLayoutError(SriovError):
    """A PF or VF was built or placed where SR-IOV cannot work.

    Attributes: ``reason``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"bad SR-IOV layout: {reason}")
        self.reason = reason


class SriovDriverError(SriovError):
    """The Linux-like enable sequence failed where Linux fails.

    Attributes: ``errno`` (the name Linux returns: ``"EIO"``, ``"ERANGE"``,
    ``"EBUSY"``, ``"ENODEV"``) and ``reason``.
    """

    def __init__(self, errno: str, reason: str) -> None:
        super().__init__(f"SR-IOV enable failed with -{errno}: {reason}")
        self.errno = errno
        self.reason = reason
