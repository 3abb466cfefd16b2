"""virtio-vsock (virtio 1.2 section 5.10): guest AF_VSOCK streams to host UNIX sockets."""
