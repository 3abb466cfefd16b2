"""Post-mortem with a real guest: QEMU's ``dump-guest-memory`` core decoded by ``iovirt inspect``.

Issue 13, "Post-mortem with pyelftools": a guest is paused mid-traffic with
QMP ``stop`` and dumped (``dump-guest-memory``, paging off: one PT_LOAD per
guest-physical range). ``iovirt dump`` then asks the running back-end for
its own core, whose IOVIRT note says where each ring is and the back-end's
``last_avail_idx`` and ``used_idx``. ``iovirt inspect`` decodes QEMU's core
at those addresses: the indices in guest memory must equal what iovirt
reports, and the two cores must decode to the same rings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from iovirt.guest import Guest, VhostUserNet
from iovirt.guest.qemu import random_mac
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0
X_IP, Y_IP = "10.81.0.1", "10.81.0.2"
#: What a decoded ring must agree on between the two cores (the same guest memory, paused).
RING_FIELDS = ("avail_flags", "avail_idx", "used_event", "used_flags", "used_idx", "avail_event",
               "descriptors", "avail_ring", "used_ring")


def iovirt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iovirt", *args], capture_output=True, text=True, timeout=60)


def inspect(core, *rings: str) -> dict:
    ring_args = [arg for ring in rings for arg in ("--ring", ring)]
    done = iovirt("inspect", str(core), "--json", *ring_args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_paused_guest_dump_decodes_to_the_indices_iovirt_reports(tmp_path):
    socks = [tmp_path / "x.sock", tmp_path / "y.sock"]
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    args = ("--net", str(socks[0]), "--net", str(socks[1]), "--dump-dir", str(dumps))
    with ServeProcess(args, tmp_path / "serve.log", socks) as srv:
        x = Guest(tmp_path, [VhostUserNet(socks[0], ip=f"{X_IP}/24", mac=random_mac())], name="x", qmp=True,
                  script=f"iovirt_wait_ping {Y_IP} 90 || exit 1\nping -i 0.05 {Y_IP} > /dev/null &\n"
                         "iovirt_wait_host done")
        y = Guest(tmp_path, [VhostUserNet(socks[1], ip=f"{Y_IP}/24", mac=random_mac())], name="y", qmp=True,
                  script="iovirt_wait_host done")
        with x, y:
            y.start()
            x.start()
            x.wait_for("IOVIRT-WAIT done", timeout=BOOT)  # pinging Y every 50 ms by now
            time.sleep(1.0)
            # Pause both (Y would go on sending into X's receive ring), let the back-end finish what
            # it holds, then take both pictures of the same, now still, memory.
            for guest in (x, y):
                guest.qmp().execute("stop")
            time.sleep(1.0)
            qemu_core = tmp_path / "x-qemu.core"
            x.qmp().execute("dump-guest-memory", paging=False, protocol=f"file:{qemu_core}", timeout=120)
            done = iovirt("dump", str(srv.proc.pid), "--dir", str(dumps))
            assert done.returncode == 0, done.stderr + srv.log()
            ours = [line for line in done.stdout.split() if "net0" in line]  # X is the first port
            assert len(ours) == 1, done.stdout
            for guest in (x, y):
                guest.qmp().execute("cont")
            x.release("done", timeout=60)
            y.release("done", timeout=60)
            assert x.wait_result(timeout=60).status == 0
            assert y.wait_result(timeout=60).status == 0

    from_iovirt = inspect(ours[0])
    note_rings = from_iovirt["rings"]
    assert {r["index"] for r in note_rings} == {0, 1}, note_rings  # RX and TX of X's port
    specs = [f"{r['size']},{r['desc_addr']:#x},{r['avail_addr']:#x},{r['used_addr']:#x}" for r in note_rings]
    from_qemu = inspect(qemu_core, *specs)
    assert len(from_qemu["rings"]) == len(note_rings)
    # QEMU's core holds all of guest RAM (iovirt's only what the back-end mapped of it).
    assert sum(r["size"] for r in from_qemu["regions"]) >= 256 << 20
    for ours_ring, qemu_ring in zip(note_rings, from_qemu["rings"]):
        assert not qemu_ring["error"], qemu_ring
        # What iovirt reports for the queue, read from guest memory QEMU dumped.
        assert qemu_ring["used_idx"] == ours_ring["used_idx"]
        popped = (ours_ring["last_avail_idx"] - qemu_ring["used_idx"]) & 0xFFFF
        waiting = (qemu_ring["avail_idx"] - ours_ring["last_avail_idx"]) & 0xFFFF
        assert popped == 0, f"queue {ours_ring['index']}: the idle back-end holds {popped} chains"
        assert waiting <= ours_ring["size"]
        if ours_ring["index"] == 1:
            assert waiting == 0  # TX: everything the guest sent was taken
        assert qemu_ring["used_idx"] > 0  # traffic went both ways
        for name in RING_FIELDS:
            assert qemu_ring[name] == ours_ring[name], name
        assert not [w for w in qemu_ring["warnings"] if "jump" in w or "out of range" in w or "loop" in w]
