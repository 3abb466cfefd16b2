"""Impairments with real guests (issue 19): two QEMU guests on ``iovirt serve`` ports whose ``--net`` impairs them.

* ping: guest a pings b 500 times, 20 ms apart, while a's port drops 10 % of
  what a sends (``drop=0.1,seed=1,dir=ingress``): between 5 and 15 % of the
  pings go unanswered, and the port's counters say how many frames it dropped.
* TCP: a sends 1 MiB to b with busybox ``nc`` while a's port drops 1 % and
  delays by 10 ms in both directions; b receives the same bytes (md5).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from iovirt.guest import Guest, VhostUserNet
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0  # the machine is shared: generous
PINGS = 500


def port_counters(control, device: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "iovirt", "ctl", str(control), "stats", device], capture_output=True,
                         text=True, timeout=30, check=True)
    return json.loads(out.stdout)["counters"]


def run_pair(tmp_path, impairment: str, script_a: str, script_b: str, a_ends_first: bool = True):
    """Guests a (10.79.0.1) and b (10.79.0.2) on ``iovirt serve``, a's port impaired; both results, a's counters.

    One guest's script ends by itself; the other waits for ``iovirt_wait_host done``, sent once the first ended.
    """
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    control = tmp_path / "control.sock"
    serve = ServeProcess(["--net", f"{socks[0]},{impairment}", "--net", str(socks[1]), "--control", str(control)],
                         tmp_path / "serve.log", [*socks, control])
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.79.0.1/24")], name="a", script=script_a)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.79.0.2/24")], name="b", script=script_b)
    with serve, a, b:  # entering serve starts it (a second start() here leaked the first process)
        b.start()
        a.start()
        first, second = (a, b) if a_ends_first else (b, a)
        result_first = first.wait_result(timeout=BOOT + 240)
        second.release("done", timeout=60)
        result_second = second.wait_result(timeout=60)
        result_a, result_b = (result_first, result_second) if a_ends_first else (result_second, result_first)
        counters = port_counters(control, "net0")
        log = serve.log()
    assert "Traceback" not in log, log
    return result_a, result_b, counters, log


PINGER = rf"""
iovirt_wait_ping 10.79.0.2 120 || exit 1
ping -q -c {PINGS} -i 0.02 -W 5 10.79.0.2 | grep 'packets transmitted'
true
"""


def test_ping_through_10_percent_drop_loses_5_to_15_percent(tmp_path):
    a, b, counters, log = run_pair(tmp_path, "drop=0.1,seed=1,dir=ingress", PINGER, "iovirt_wait_host done")
    detail = f"--- a ---\n{a.console}\n--- b ---\n{b.console}\n--- serve ---\n{log}\ncounters {counters}"
    assert a.status == 0 and b.status == 0, detail
    match = re.search(r"(\d+) packets transmitted, (\d+) packets received", a.output)
    assert match, detail
    sent, received = int(match.group(1)), int(match.group(2))
    assert sent == PINGS, detail
    loss = 1 - received / sent
    assert 0.05 <= loss <= 0.15, f"loss {loss:.1%}\n{detail}"
    assert counters.get("tx_impair_dropped", 0) >= sent - received, detail  # ARP and the rest lose frames too
    assert "rx_impair_dropped" not in counters, detail  # the other direction is not impaired
    print(f"ping through drop=0.1: {sent} sent, {received} answered ({loss:.1%} lost); port counters {counters}")


SIZE = 1 << 20

# b listens and reports the md5 of what it received and how long it took; a
# makes 1 MiB of random bytes, reports their md5 and sends them (retrying until
# b listens), then stays up until the host says b has it all (busybox nc
# returns once the bytes are in the socket buffer, not once they arrived).
# The listener's stdin is a FIFO held open and empty: busybox nc ends the
# connection when its stdin ends (and ash's wait on a pipeline waits for all of it).
RECEIVER = """
mkfifo /tmp/in
nc -l -p 5001 < /tmp/in > /tmp/got &
listener=$!
exec 3> /tmp/in
while [ ! -s /tmp/got ]; do sleep 0.1; done
start=$(date +%s)
wait $listener
echo "received $(wc -c < /tmp/got) bytes md5 $(md5sum < /tmp/got) in about $(( $(date +%s) - start )) s"
"""

SENDER = rf"""
head -c {SIZE} /dev/urandom > /tmp/file
echo "sent md5 $(md5sum < /tmp/file)"
iovirt_wait_ping 10.79.0.2 120 || exit 1
tries=0
until nc 10.79.0.2 5001 < /tmp/file; do
    tries=$((tries + 1)); [ $tries -lt 20 ] || exit 1; sleep 1
done
iovirt_wait_host done
"""


def test_tcp_moves_1_mib_intact_through_1_percent_drop_and_10_ms_delay(tmp_path):
    a, b, counters, log = run_pair(tmp_path, "drop=0.01,delay=10,seed=3,dir=both", SENDER, RECEIVER,
                                   a_ends_first=False)
    detail = f"--- a ---\n{a.console}\n--- b ---\n{b.console}\n--- serve ---\n{log}\ncounters {counters}"
    assert a.status == 0 and b.status == 0, detail
    sent = re.search(r"^sent md5 (\w+)", a.output, re.M)
    got = re.search(r"^received (\d+) bytes md5 (\w+).*$", b.output, re.M)
    assert sent and got, detail
    assert int(got.group(1)) == SIZE and got.group(2) == sent.group(1), detail
    assert counters.get("tx_impair_delayed", 0) > 0 and counters.get("rx_impair_delayed", 0) > 0, detail
    assert counters.get("tx_impair_dropped", 0) + counters.get("rx_impair_dropped", 0) > 0, detail
    print(f"1 MiB over TCP through drop=0.01,delay=10 both ways: md5 equal; {got.group(0)}; port counters {counters}")
