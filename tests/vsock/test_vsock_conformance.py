"""``iovirt conform --device vsock`` passes against iovirt's own vsock device."""

from __future__ import annotations

from iovirt.conformance.registry import Verdict
from iovirt.conformance.runner import Runner
from iovirt.conformance.target import Target


def test_vsock_checks_pass_against_iovirt(served):
    results = {r.clause: r for r in Runner(Target(served.socket, "vsock")).run()}
    vsock = {c: r for c, r in results.items() if c.startswith("virtio-1.2:5.10")}
    assert len(vsock) == 5
    assert all(r.verdict is Verdict.PASS for r in vsock.values()), {c: r.reason for c, r in vsock.items()}
    assert not [c for c, r in results.items() if r.verdict is Verdict.FAIL]
