"""The in-process platform: one machine that tests, the bench and the conformance suite drive.

It wires together:

- guest memory (one mmap'd range at guest-physical 0), split into DMA-able
  memory for drivers (rings, buffers) and memory for the IOMMU's tables;
- the default PCI topology with a :class:`VirtioPciFunction` per device on
  the root bus from slot 3, BARs assigned by firmware
  (:func:`~iovirt.pci.topology.build_default_host`);
- one VM's vLAPICs (:class:`~iovirt.timer.bus.ApicBus`) behind an
  :class:`~iovirt.timer.msi.InterruptRouter`, the MSI sink of every function;
- optionally a VT-d unit: DMA remapping for devices that negotiate
  VIRTIO_F_ACCESS_PLATFORM and interrupt remapping in front of the router.

The VT-d unit's own event interrupts go to a router without remapping: the
unit does not remap the messages it sends itself.
"""

from __future__ import annotations

from typing import Sequence, TypedDict, Unpack

from iovirt.memory import BumpAllocator, GuestMemory
from iovirt.pci.bus import PciBus
from iovirt.pci.host import PciHost
from iovirt.pci.topology import build_default_host
from iovirt.platform.config_access import EcamConfig
from iovirt.platform.errors import PlatformError
from iovirt.platform.irq import IrqDomain
from iovirt.platform.virtio_driver import VirtioPciDriver
from iovirt.timer.bus import ApicBus
from iovirt.timer.clock import MonotonicClock
from iovirt.timer.hosttimer import TimerFd
from iovirt.timer.msi import InterruptRouter
from iovirt.timer.mux import TimerMultiplexer
from iovirt.timer.regs import APIC_SVR
from iovirt.virtio.blk.device import VirtioBlk
from iovirt.virtio.device import VirtioDevice
from iovirt.virtio.net.device import VirtioNet
from iovirt.virtio.net.switch import LearningSwitch
from iovirt.virtio.transport.pci import VirtioPciFunction
from iovirt.vtd.driver import Domain, VtdDriver
from iovirt.vtd.tables import PTE_R, PTE_W
from iovirt.vtd.unit import VtdUnit

FIRST_SLOT = 3  # after the default topology's host bridge, bridge and test endpoint
DMA_BASE = 0x200000  # 2 MiB aligned, so the IOMMU maps it with large pages
DEFAULT_MAC = bytes.fromhex("525400123456")  # QEMU's default prefix 52:54:00
DEFAULT_IMAGE_SIZE = 64 << 20
APIC_SVR_ENABLED = 0x1FF  # APIC software enable, spurious vector 0xFF


class PlatformOptions(TypedDict, total=False):
    """The keyword arguments of :class:`Platform`, for :meth:`Platform.default` to pass on."""

    memory_size: int
    num_vcpus: int
    mux: TimerMultiplexer | None
    iommu: bool


class Platform:
    """A machine: memory, PCI host with virtio devices, vLAPICs, optional VT-d.

    ``Platform(devices, *, memory_size=64 MiB, num_vcpus=2, mux=None, iommu=False)``.
    ``mux`` is the timer multiplexer the vLAPICs arm (a real one on
    ``CLOCK_MONOTONIC`` is made and owned when not given; :meth:`close`
    releases it).  With ``iommu`` a :class:`~iovirt.vtd.unit.VtdUnit` sits in
    front of device DMA and MSIs; :meth:`enable_iommu` programs it.
    """

    def __init__(
        self,
        devices: Sequence[VirtioDevice] = (),
        *,
        memory_size: int = 64 << 20,
        num_vcpus: int = 2,
        mux: TimerMultiplexer | None = None,
        iommu: bool = False,
    ) -> None:
        if memory_size < 8 << 20 or memory_size % (4 << 20):
            raise PlatformError(f"memory_size {memory_size:#x} must be a multiple of 4 MiB, at least 8 MiB")
        self.memory = GuestMemory.from_ranges([(0, memory_size)])
        half = memory_size // 2
        self.dma_region = (DMA_BASE, half - DMA_BASE)
        self.dma_alloc = BumpAllocator(*self.dma_region)
        self.table_alloc = BumpAllocator(half, half)
        self._own_mux = mux is None
        self.mux = mux if mux is not None else TimerMultiplexer(MonotonicClock(), TimerFd())
        self.apic_bus = ApicBus(self.mux, num_vcpus)
        for lapic in self.apic_bus.lapics:
            lapic.mmio_write(APIC_SVR, 4, APIC_SVR_ENABLED)
        self.irq = IrqDomain(self.apic_bus)
        self.iommu = VtdUnit(self.memory, InterruptRouter(self.apic_bus)) if iommu else None
        self.router = InterruptRouter(self.apic_bus, remapper=self.iommu)
        self.vtd_driver: VtdDriver | None = None
        self.owned_images: list[VirtioBlk] = []  # closed with the platform
        self.domains: dict[int, Domain] = {}
        self.functions = [VirtioPciFunction(d, self.memory, iommu=self.iommu) for d in devices]

        def add_devices(bus: PciBus) -> None:
            for slot, function in enumerate(self.functions, FIRST_SLOT):
                bus.add_function(function, slot)

        self.host: PciHost = build_default_host(msi_sink=self.router, add_devices=add_devices)

    @classmethod
    def default(cls, image_path: str, **options: Unpack[PlatformOptions]) -> "Platform":
        """The default machine: virtio-net (on a new learning switch) at 00:03.0 and virtio-blk on
        ``image_path`` (a sparse 64 MiB image is created if it does not exist) at 00:04.0."""
        net = VirtioNet(DEFAULT_MAC, LearningSwitch())
        blk = VirtioBlk(image_path, size=DEFAULT_IMAGE_SIZE)
        platform = cls([net, blk], **options)
        platform.owned_images.append(blk)
        return platform

    def close(self) -> None:
        """Reset the devices (their queues let go of guest memory), release memory and an owned host timer."""
        for function in self.functions:
            function.reset()
        for image in self.owned_images:
            image.close()
        if self._own_mux:
            self.mux.host_timer.close()
        self.memory.close()

    def __enter__(self) -> "Platform":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the guest kernel's side ---------------------------------------------------
    def config(self, function: VirtioPciFunction) -> EcamConfig:
        """ECAM config access to ``function`` at its current bus address."""
        rid = function.requester_id
        return EcamConfig(self.host, rid >> 8, rid >> 3 & 0x1F, rid & 7)

    def driver(self, function: VirtioPciFunction) -> VirtioPciDriver:
        """A (not yet probed) virtio-pci driver for ``function``."""
        return VirtioPciDriver(self.host, self.config(function), self.memory, self.dma_alloc, self.irq)

    def enable_iommu(self, interrupt_remapping: bool = True) -> VtdDriver:
        """Program the VT-d unit as Linux's intel-iommu does: a domain per virtio function with
        the driver DMA memory identity-mapped, translation on, and interrupt remapping (no
        compatibility-format interrupts) when asked."""
        if self.iommu is None:
            raise PlatformError("the platform was built without an IOMMU (iommu=True)")
        vtd = VtdDriver(self.iommu, self.memory, self.table_alloc)
        vtd.init()
        self.vtd_driver = vtd
        for function in self.functions:
            self.iommu_attach(function.requester_id)
        vtd.enable_translation()
        if interrupt_remapping:
            vtd.setup_interrupt_remapping(allow_compat=False)
            self.irq.enable_remapping(vtd)
        return vtd

    def iommu_attach(self, requester_id: int) -> None:
        """Give ``requester_id`` a domain of its own with the driver DMA memory identity-mapped.

        What intel-iommu does for each device it probes (also for SR-IOV VFs
        added later: each translates through its own context entry).
        """
        vtd = self.vtd_driver
        if vtd is None:
            raise PlatformError("enable_iommu() first")
        domain = vtd.create_domain(len(self.domains) + 1)
        vtd.attach(requester_id, domain)
        vtd.map(domain, self.dma_region[0], self.dma_region[0], self.dma_region[1], PTE_R | PTE_W)
        self.domains[requester_id] = domain

    def service_interrupts(self) -> int:
        """Every vCPU takes its pending interrupts (handlers run); returns how many."""
        return self.irq.service()
