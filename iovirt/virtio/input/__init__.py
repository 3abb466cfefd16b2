"""virtio-input (virtio 1.2 section 5.8): keyboard, mouse and tablet profiles with events injected from Python."""
