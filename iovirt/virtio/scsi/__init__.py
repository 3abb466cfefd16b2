"""virtio-scsi (virtio 1.2 section 5.6): a SCSI target with LUNs on raw images."""
