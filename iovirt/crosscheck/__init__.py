"""iovirt.crosscheck: iovirt's hardware models checked against QEMU's own, through qtest.

- :mod:`~iovirt.crosscheck.qtest` -- the qtest client (one QEMU, pipelined commands);
- :mod:`~iovirt.crosscheck.area` -- what an area is, and the runner (episodes, shrinking);
- :mod:`~iovirt.crosscheck.msix` -- area ``msix`` (table, PBA, delivery of the configuration and transmit-queue
  vectors; :mod:`~iovirt.crosscheck.qmp` fires interrupts);
- :mod:`~iovirt.crosscheck.pci_config` -- area ``pci-config`` on the topology of
  :mod:`~iovirt.crosscheck.topology`;
- :mod:`~iovirt.crosscheck.sriov` -- area ``sriov`` (QEMU's nvme SR-IOV through ECAM) on the topology of
  :mod:`~iovirt.crosscheck.sriov_topology`;
- :mod:`~iovirt.crosscheck.vtd_regs` -- area ``vtd-regs`` (intel-iommu's registers);
- :mod:`~iovirt.crosscheck.vtd_dma` -- area ``vtd-dma`` (DMA through intel-iommu from virtio-rng devices, over
  the random tables of :mod:`~iovirt.crosscheck.vtd_dma_tables`);
- :mod:`~iovirt.crosscheck.linux_tables` -- area ``vtd-linux`` (``--linux-tables``): QEMU's trace
  (:mod:`~iovirt.crosscheck.vtd_trace`) of a Linux guest (:mod:`~iovirt.crosscheck.linux_guest`)
  against iovirt's walk of the guest's ELF core;
- :mod:`~iovirt.crosscheck.expected` / :mod:`~iovirt.crosscheck.expected_table` -- where QEMU
  departs from the spec;
- :mod:`~iovirt.crosscheck.report` and :mod:`~iovirt.crosscheck.cli` -- ``iovirt crosscheck``.
"""
