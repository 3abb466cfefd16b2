"""iovirt.virtio."""
