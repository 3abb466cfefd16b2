"""Interrupt events the remapping hardware raises itself: fault and invalidation-completion.

VT-d spec 7.4 (fault event) and 6.5.2.8 / 11.4.10.4 (invalidation completion
event): each event has a control register (IM mask, IP pending), a data and
two address registers.  The interrupt is a plain MSI write delivered through
an :class:`MsiSink`; events raised by the IOMMU itself are never remapped.
"""

from __future__ import annotations

import logging
from typing import Protocol

from iovirt.errors import IovirtError
from iovirt.vtd.regfile import RegisterFile
from iovirt.vtd.regs import CTL_IM, CTL_IP

log = logging.getLogger(__name__)


class MsiSink(Protocol):
    """Where MSIs go: the LAPIC router implements this."""

    def deliver_msi(self, source_id: int, address: int, data: int) -> None:
        """Deliver a compatibility-format MSI ``(address, data)`` from ``source_id``."""
        ...


class EventInterrupt:
    """One IM/IP-controlled event interrupt (FECTL/FEDATA/FEADDR/FEUADDR or the IE* set).

    ``sink`` may be ``None`` (no interrupt controller attached): the event
    is then dropped, with IP cleared as if delivered.
    """

    def __init__(
        self,
        regs: RegisterFile,
        ctl: int,
        data: int,
        addr: int,
        uaddr: int,
        sink: MsiSink | None,
        source_id: int,
    ) -> None:
        self._regs = regs
        self._ctl = ctl
        self._data = data
        self._addr = addr
        self._uaddr = uaddr
        self.sink = sink
        self.source_id = source_id

    def fire(self) -> None:
        """Raise the event: set IP, then deliver unless IM masks it."""
        self._regs[self._ctl] |= CTL_IP
        self._deliver_if_unmasked()

    def ctl_written(self) -> None:
        """Software wrote the control register: a pending event goes out once IM clears."""
        if self._regs[self._ctl] & CTL_IP:
            self._deliver_if_unmasked()

    def clear_pending(self) -> None:
        """Software serviced every condition behind the event: drop IP."""
        self._regs[self._ctl] &= ~CTL_IP

    def _deliver_if_unmasked(self) -> None:
        regs = self._regs
        if regs[self._ctl] & CTL_IM:
            return
        regs[self._ctl] &= ~CTL_IP
        address = regs[self._uaddr] << 32 | regs[self._addr]
        if self.sink is None:
            log.debug("VT-d event MSI (%#x, %#x) dropped: no MSI sink", address, regs[self._data])
            return
        try:
            self.sink.deliver_msi(self.source_id, address, regs[self._data])
        except IovirtError as exc:
            log.warning("VT-d event MSI (%#x, %#x) not delivered: %s", address, regs[self._data], exc)
