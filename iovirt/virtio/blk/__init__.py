"""virtio-blk (virtio 1.2 section 5.2) on a raw image."""
