"""Per-VM virtual local APICs whose timers share one host timer.

* :class:`TimerMultiplexer` -- every pending deadline of every VM in one heap,
  one host timer (:class:`TimerFd`) armed at the earliest.
* :class:`ApicBus` -- one VM's vLAPICs (:class:`VirtualLapic`, each with a
  :class:`LapicTimer`), IPI and interrupt-message delivery.
* :class:`InterruptRouter` -- the MSI sink (``deliver_msi``) in front of a bus,
  with an optional :class:`MsiRemapper` (VT-d interrupt remapping).
"""

from iovirt.timer.bus import ApicBus
from iovirt.timer.clock import Clock, MonotonicClock
from iovirt.timer.config import ApicConfig, MissedTickPolicy
from iovirt.timer.errors import ApicConfigError, HostTimerError, TimerError
from iovirt.timer.hosttimer import HostTimer, TimerFd
from iovirt.timer.lapic import VirtualLapic
from iovirt.timer.lapic_timer import LapicTimer
from iovirt.timer.msi import InterruptRouter, MsiRemapper
from iovirt.timer.mux import CallbackTimer, MuxTimer, TimerMultiplexer

__all__ = [
    "ApicBus",
    "ApicConfig",
    "ApicConfigError",
    "CallbackTimer",
    "Clock",
    "HostTimer",
    "HostTimerError",
    "InterruptRouter",
    "LapicTimer",
    "MissedTickPolicy",
    "MonotonicClock",
    "MsiRemapper",
    "MuxTimer",
    "TimerError",
    "TimerFd",
    "TimerMultiplexer",
    "VirtualLapic",
]
