"""virtio-rng constants (virtio 1.2 section 5.4)."""

from __future__ import annotations

VIRTIO_ID_ENTROPY = 4  # 5 Device Types
REQUESTQ = 0  # 5.4.2: the one virtqueue, requestq
