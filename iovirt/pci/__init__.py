"""iovirt.pci."""
