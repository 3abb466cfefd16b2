"""iovirt.platform: an in-process machine with virtio-pci devices and a guest-side driver.

::

    switch = LearningSwitch()
    net = VirtioNet(b"\\x52\\x54\\x00\\x12\\x34\\x56", switch)
    with Platform([net], num_vcpus=2) as platform:
        driver = platform.driver(platform.functions[0])
        driver.bring_up(queues=2)                  # probe, features, MSI-X, queues, DRIVER_OK
        nic = VirtioNetDriver(driver)
        nic.post_rx(16)
        nic.send(frame)                            # comes out of the switch
        platform.service_interrupts()              # vCPUs take the MSI-X interrupts
        frames = nic.receive()
"""

from iovirt.platform.blk import VirtioBlkDriver
from iovirt.platform.config_access import EcamConfig, scan
from iovirt.platform.errors import PlatformError, VirtioDriverError
from iovirt.platform.irq import IrqDomain, IrqVector
from iovirt.platform.machine import Platform
from iovirt.platform.net import VirtioNetDriver
from iovirt.platform.virtio_driver import VirtioPciDriver

__all__ = [
    "EcamConfig",
    "IrqDomain",
    "IrqVector",
    "Platform",
    "PlatformError",
    "VirtioBlkDriver",
    "VirtioDriverError",
    "VirtioNetDriver",
    "VirtioPciDriver",
    "scan",
]
