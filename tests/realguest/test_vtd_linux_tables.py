"""Tables built by real Linux (issue 18): QEMU's intel-iommu translations against iovirt's walk of a core.

A guest runs ``intel_iommu=on`` (strict) with QEMU's own virtio-blk and virtio-net behind
QEMU's intel-iommu, traffic on both and idle disks beside them; QEMU traces its IOTLB
fills; the guest is paused mid-traffic and dumped.  iovirt's VT-d unit, pointed at the
guest's root table in the core, must translate every (requester, IOVA) still in force to
QEMU's address with QEMU's permission.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from iovirt.crosscheck.linux_guest import run_linux_guest
from iovirt.crosscheck.linux_tables import compare_core

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]


def test_iovirt_walks_linux_tables_to_qemus_translations(tmp_path):
    run = run_linux_guest(tmp_path)
    result = compare_core(run.trace, run.core)
    print(result.summary())
    assert [str(m) for m in result.mismatches] == []
    # Each idle disk's rings alone stay mapped and uninvalidated: at least two pages per device.
    assert result.compared >= 10, result.summary()
    assert len(result.requesters) >= 5, result.summary()


def test_crosscheck_command_reports_area_vtd_linux(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "iovirt", "crosscheck", "--linux-tables", "--workdir",
                           str(tmp_path / "run"), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    area = json.loads(out.read_text())["areas"]["vtd-linux"]
    assert area["mismatches"] == 0 and area["compared"] >= 10, area
    assert "vtd-linux:" in done.stdout
