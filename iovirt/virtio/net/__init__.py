"""virtio-net (virtio 1.2 section 5.1): the device, its header, and the L2 switch its ports join."""
