"""virtio-rng, the entropy device (virtio 1.2 section 5.4), fed by os.urandom, a file or a FIFO."""
