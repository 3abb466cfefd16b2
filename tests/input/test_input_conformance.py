"""``iovirt conform --device input`` and ``--device rng`` pass against iovirt's devices."""

from __future__ import annotations

import pytest

from iovirt.conformance.registry import Verdict
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target
from iovirt.virtio.input.device import VirtioInput
from iovirt.virtio.rng.device import VirtioRng


@pytest.mark.parametrize("device, kind, clauses", [
    (lambda: VirtioInput("keyboard"), "input", {"virtio-1.2:5.8.5.2#size-zero", "virtio-1.2:5.8.4#ids",
                                                "virtio-1.2:5.8.4#ev-bits", "virtio-1.2:5.8.6.1#status"}),
    (lambda: VirtioInput("tablet"), "input", {"virtio-1.2:5.8.4#ev-bits"}),
    (lambda: VirtioRng(), "rng", {"virtio-1.2:5.4.6.2#bytes", "virtio-1.2:5.4.6.2#chain"}),
])
def test_conformance_passes(serve, device, kind, clauses):
    results = Runner(Target(serve(device()), kind, timeout=5.0)).run()
    failed = [(r.clause, r.reason) for r in results if r.verdict is Verdict.FAIL]
    assert not failed
    passed = {r.clause for r in results if r.verdict is Verdict.PASS}
    assert clauses <= passed
