"""Real guests under ``iovirt serve --control``: counters move during a ping, ports are added and removed at runtime.

Issue 14: two guests ping through the switch while ``iovirt ctl … stats``
shows the counters moving; a port added with ``add-net`` takes a third
guest (its own MAC) that pings the others; ``remove`` disconnects it
cleanly while the first two keep pinging.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from iovirt.guest import Guest, VhostUserNet
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0  # the machine is shared: generous
APPEND = ("no_timer_check",)
"""Under TCG on a loaded host the kernel's IO-APIC timer check can fail ("IO-APIC + timer doesn't work", a panic)."""


def ctl(control, *words: str, timeout: float = 30.0):
    """``iovirt ctl CONTROL WORDS…``: its JSON output (fails the test on an error)."""
    done = subprocess.run([sys.executable, "-m", "iovirt", "ctl", str(control), *words],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_counters_move_and_a_port_comes_and_goes(tmp_path):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    control = tmp_path / "control.sock"
    srv = ServeProcess(["--net", str(socks[0]), "--net", str(socks[1]), "--control", str(control)],
                       tmp_path / "serve.log", [*socks, control]).start()
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.77.0.1/24")], name="a", append=APPEND,
              script="ping -c 20 -i 0.5 -W 10 10.77.0.2; iovirt_wait_host after; ping -c 5 -W 10 10.77.0.2")
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.77.0.2/24")], name="b", append=APPEND, script="iovirt_wait_host done")
    added = tmp_path / "n2.sock"
    c = Guest(tmp_path, [VhostUserNet(added, ip="10.77.0.3/24")], name="c", append=APPEND,
              script="ping -c 3 -W 10 10.77.0.1 && iovirt_wait_host removed")
    try:
        with a, b:
            b.start()
            a.start()
            a.wait_for(r"bytes from 10\.77\.0\.2", timeout=BOOT)
            first = ctl(control, "stats", "net0")
            time.sleep(3)
            second = ctl(control, "stats", "net0")
            assert second["counters"]["tx_packets"] > first["counters"]["tx_packets"]
            assert second["queues"][1]["frames"] > first["queues"][1]["frames"]
            assert second["queues"][1]["kicks"] > first["queues"][1]["kicks"]
            assert ctl(control, "stats", "net1")["counters"]["rx_packets"] > 0
            devices = {d["name"]: d for d in ctl(control, "devices")}
            assert devices["net0"]["connected"] and devices["net0"]["frontend"]["pid"] == a.pid
            macs = {entry["mac"]: entry["port"] for entry in ctl(control, "fdb")}
            assert macs.get(a.machine.devices[0].mac.lower()) == "net0"

            assert ctl(control, "add-net", str(added)) == {"name": "net2", "socket": str(added)}
            with c:
                c.start()
                c.wait_for(r"3 packets transmitted, 3 (packets )?received", timeout=BOOT)
                assert ctl(control, "stats", "net2")["counters"]["rx_packets"] >= 3
                assert ctl(control, "remove", "net2") == {"name": "net2"}
                assert "net2" not in {d["name"] for d in ctl(control, "devices")}
                time.sleep(1)
                assert c.returncode is None, c.tail()  # QEMU lives on: the disconnect was clean
                c.release("removed", timeout=60)
                assert c.wait_result(timeout=60).status == 0
            a.release("after", timeout=BOOT)
            result = a.wait_result(timeout=BOOT)
            b.release("done", timeout=BOOT)
            assert b.wait_result(timeout=60).status == 0
        assert result.status == 0, result.console
        assert "5 packets transmitted, 5 packets received" in result.output
        assert "connection closed: device removed" in srv.log()
        assert "Traceback" not in srv.log()
    finally:
        code = srv.stop()
        assert code in (0, -signal.SIGKILL), srv.log()
