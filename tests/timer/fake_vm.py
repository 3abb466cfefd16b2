"""A VM of vLAPICs on a fake clock, for the timer/APIC tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass, field

from iovirt.timer import ApicBus, ApicConfig, TimerMultiplexer, VirtualLapic
from iovirt.timer.regs import APIC_SVR
from iovirt.timer.testing import FakeClock, fake_multiplexer, run_until


@dataclass
class FakeVm:
    """A VM whose service routine records (apic_id, vector, time) and EOIs when asked."""

    mux: TimerMultiplexer
    clock: FakeClock
    bus: ApicBus
    serviced: list[tuple[int, int, int]] = field(default_factory=list)

    def lapic(self, i: int = 0) -> VirtualLapic:
        return self.bus.lapics[i]

    def run_until(self, end_ns: int) -> int:
        return run_until(self.mux, self.clock, end_ns)

    def advance(self, delta_ns: int) -> int:
        return self.run_until(self.clock.now_ns() + delta_ns)

    def take_all(self, i: int = 0) -> list[int]:
        """The vCPU acks and EOIs every deliverable interrupt; returns the vectors."""
        lapic = self.lapic(i)
        vectors = []
        while (v := lapic.ack()) is not None:
            vectors.append(v)
            lapic.eoi()
        return vectors


def make_vm(num_vcpus: int = 2, config: ApicConfig | None = None, enable: bool = True) -> FakeVm:
    mux, clock = fake_multiplexer()
    serviced: list[tuple[int, int, int]] = []

    def service_routine(lapic: VirtualLapic, vector: int) -> None:
        serviced.append((lapic.apic_id, vector, clock.now_ns()))

    bus = ApicBus(mux, num_vcpus, config, service_routine=service_routine)
    if enable:
        for lapic in bus.lapics:
            lapic.mmio_write(APIC_SVR, 4, 0x1FF)  # software-enable, spurious vector 0xFF
    return FakeVm(mux, clock, bus, serviced)
