"""Client mode with real guests (issue 14): QEMU listens, ``iovirt serve`` connects, and survives its own SIGKILL.

QEMU's chardevs have ``server=on,wait=off``: QEMU creates the sockets and
holds device init until a back-end connects (so iovirt starts once the
socket files exist).  iovirt serves with ``--net client:PATH`` /
``--blk client:PATH,IMAGE``.  It is then SIGKILLed and started again: the
new process dials the sockets, QEMU takes the new connection and sets the
device up again, and the guests carry on.

* net: two guests ping each other through iovirt's switch, before and after
  the kill (at least 4 of 5 pings answered after the restart); QEMU's stderr
  has no warning (iovirt offers only what QEMU uses: no PROTOCOL_F_CONFIG on net).
* blk: a guest writes and read-verifies 4 KiB blocks with O_DIRECT while
  iovirt is killed and restarted mid-loop; no write or verify fails, and the
  guest's kernel logs no I/O error.
"""

from __future__ import annotations

import re
import shutil
import signal
import time

import pytest

from iovirt.guest import Guest, VhostUserBlk, VhostUserNet, wait_unix_listen
from iovirt.serve_process import ServeProcess

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed"),
]

BOOT = 180.0  # the machine is shared: generous
SETUP = 90.0


class ClientBackend:
    """``iovirt serve ARGS`` in client mode, one process at a time; :meth:`crash` SIGKILLs it and starts the next."""

    def __init__(self, tmp_path, args: tuple[str, ...]) -> None:
        self.tmp_path = tmp_path
        self.args = args
        self.procs: list[ServeProcess] = []

    def start(self) -> ServeProcess:
        # No sockets to wait for: they are QEMU's (and ServeProcess would unlink them).
        proc = ServeProcess(self.args, self.tmp_path / f"serve{len(self.procs)}.log").start()
        self.procs.append(proc)
        return proc

    def crash(self) -> ServeProcess:
        self.procs[-1].kill()
        return self.start()

    def wait_log(self, text: str, count: int, timeout: float) -> str:
        """Wait until the running process's log holds ``text`` ``count`` times."""
        proc = self.procs[-1]
        deadline = time.monotonic() + timeout
        while (log := proc.log()).count(text) < count:
            assert proc.proc is not None and proc.proc.poll() is None, f"iovirt serve exited:\n{log}"
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} x {text!r} not in {proc.log_path.name} within {timeout:g} s:\n{log}")
            time.sleep(0.2)
        return log

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name} ---\n{p.log()}" for p in self.procs)

    def stop(self) -> None:
        for proc in self.procs:
            code = proc.stop()
            assert code in (0, -signal.SIGKILL), proc.log()


@pytest.fixture
def client_backend(tmp_path):
    made: list[ClientBackend] = []

    def make(*args: str) -> ClientBackend:
        backend = ClientBackend(tmp_path, args)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.stop()


def answered(output: str) -> int:
    match = re.search(r"(\d+) packets transmitted, (\d+) packets received", output)
    assert match, output
    return int(match.group(2))


# a pings b until it answers, then 5 pings; waits while the host kills and
# restarts iovirt; then 5 pings again, after which the host stops b.
PINGER = """
iovirt_wait_ping 10.78.0.2 120 || exit 1
echo "before: $(ping -c 5 -W 5 10.78.0.2 | grep 'packets transmitted')"
iovirt_wait_host restarted
echo "after: $(ping -c 5 -W 5 10.78.0.2 | grep 'packets transmitted')"
"""


def test_two_guests_ping_through_iovirt_in_client_mode_across_a_sigkill(tmp_path, client_backend):
    socks = [tmp_path / "n0.sock", tmp_path / "n1.sock"]
    a = Guest(tmp_path, [VhostUserNet(socks[0], ip="10.78.0.1/24", server=True)], name="a", script=PINGER)
    b = Guest(tmp_path, [VhostUserNet(socks[1], ip="10.78.0.2/24", server=True)], name="b",
              script="iovirt_wait_host done")
    backend = client_backend("--net", f"client:{socks[0]}", "--net", f"client:{socks[1]}")
    with a, b:
        b.start()
        a.start()
        for sock in socks:  # QEMU listens; only then may the back-end dial (QEMU 7.2 waits for it)
            wait_unix_listen(sock, timeout=SETUP)
        backend.start()
        a.wait_for(r"^before: .*\n", timeout=BOOT)
        backend.crash()
        # Both QEMUs take the new back-end and start their rings again.
        backend.wait_log("negotiated features", 2, SETUP)
        backend.wait_log("vring 1 started", 2, SETUP)
        a.release("restarted", timeout=BOOT)
        sent = a.wait_result(timeout=BOOT)
        b.release("done", timeout=BOOT)
        assert b.wait_result(timeout=60).status == 0
        stderr = a.stderr_path.read_text() + b.stderr_path.read_text()
    detail = f"--- a ---\n{sent.console}\n--- QEMU stderr ---\n{stderr}\n{backend.logs()}"
    assert sent.status == 0, detail
    before = re.search(r"^before: (.*)$", sent.output, re.M)
    after = re.search(r"^after: (.*)$", sent.output, re.M)
    assert before and after, detail
    assert answered(before.group(1)) >= 4, detail
    assert answered(after.group(1)) >= 4, f"pings did not resume after the restart\n{detail}"
    assert "PROTOCOL_F_CONFIG" not in stderr, detail
    for proc in backend.procs:
        assert "front-end connected" in proc.log(), detail
    print(f"client mode: before the kill {before.group(1)}; after {after.group(1)}")


BLOCK = 4096
BLOCKS = 200

# Write block i with O_DIRECT and a FLUSH, read it back past the page cache,
# compare md5s; the host kills and restarts iovirt in the middle of the loop.
BLK_SCRIPT = rf"""
dmesg -c > /dev/null
fail=0
i=0
while [ $i -lt {BLOCKS} ]; do
    yes "iovirt-client-$i" | head -c {BLOCK} > /tmp/p
    dd if=/tmp/p of=/dev/vda bs={BLOCK} seek=$i count=1 oflag=direct conv=notrunc,fsync 2>/tmp/err \
        || {{ echo "write $i failed: $(cat /tmp/err)"; fail=$((fail + 1)); }}
    want=$(md5sum < /tmp/p)
    got=$(dd if=/dev/vda bs={BLOCK} skip=$i count=1 iflag=direct 2>/tmp/err | md5sum)
    [ "$want" = "$got" ] || {{ echo "verify $i failed: $(cat /tmp/err)"; fail=$((fail + 1)); }}
    echo "blk-written $i"
    i=$((i + 1))
done
echo "blk-failures $fail"
dmesg | grep -i "error\|I/O" && fail=$((fail + 1))
[ $fail -eq 0 ]
"""


def test_blk_write_verify_loop_survives_sigkill_in_client_mode(tmp_path, client_backend):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    sock = tmp_path / "b.sock"
    backend = client_backend("--blk", f"client:{sock},{image}")
    with Guest(tmp_path, [VhostUserBlk(sock, server=True)], script=BLK_SCRIPT, name="blk") as g:
        g.start()
        wait_unix_listen(sock, timeout=SETUP)
        backend.start()
        g.wait_for(r"^blk-written 50\n", timeout=BOOT)
        backend.crash()
        backend.wait_log("front-end connected", 1, SETUP)
        result = g.wait_result(timeout=BOOT)
        stderr = g.stderr_path.read_text()
    detail = f"{result.console}\n--- QEMU stderr ---\n{stderr}\n{backend.logs()}"
    assert result.status == 0, detail
    assert "blk-failures 0" in result.output, detail
    assert f"blk-written {BLOCKS - 1}" in result.output, detail
    written = [int(n) for n in re.findall(r"^blk-written (\d+)$", result.console, re.M)]
    assert written == list(range(BLOCKS)), detail
    # The restarted back-end served the rest of the loop.
    assert "negotiated features" in backend.procs[-1].log(), detail
