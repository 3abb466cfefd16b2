"""``--sandbox`` on real processes: served work survives the filter, a forbidden call kills only its process.

A separate ``iovirt serve --sandbox`` runs net and blk devices for iovirt's
own front-end (:mod:`traffic`: bring-up, switching, the vIOMMU IOTLB path,
blk requests, the inflight region, reconnects) and must end with exit
status 0 on SIGTERM.  The forbidden calls are made by child Python
processes that install iovirt's filter themselves, from a thread that
existed before the filter (``SECCOMP_FILTER_FLAG_TSYNC`` reaches it): the
child dies by SIGSYS while this test and the served process carry on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from iovirt.serve_process import ServeProcess
from iovirt.virtio.blk import datapath
from iovirt.vhost_user.cli import EXIT_FORCED
from iovirt.vhost_user.driver import VhostUserDriver
from iovirt.vhost_user.frontend import VhostUserFrontend

import traffic

IOVIRT = [sys.executable, "-m", "iovirt"]


class Served:
    """``iovirt serve`` with two net ports and a blk device, under ``--sandbox=MODE``."""

    def __init__(self, tmp: Path, mode: str, image_dir: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        self.net = [str(tmp / "n0.sock"), str(tmp / "n1.sock")]
        self.blk = str(tmp / "b.sock")
        image = (image_dir or tmp) / "disk.img"
        args = ["--net", self.net[0], "--net", self.net[1], "--blk", f"{self.blk},{image},size=1M", *extra]
        self.proc = ServeProcess([*args, f"--sandbox={mode}"], tmp / "serve.log", [*self.net, self.blk]).start()

    @property
    def pid(self) -> int:
        assert self.proc.proc is not None
        return self.proc.proc.pid


def seccomp_modes(pid: int) -> list[str]:
    """The ``Seccomp:`` field of every thread of ``pid`` (2 = filter mode)."""
    tasks = Path(f"/proc/{pid}/task")
    return [
        next(line.split()[1] for line in (task / "status").read_text().splitlines() if line.startswith("Seccomp:"))
        for task in tasks.iterdir()
    ]


@pytest.fixture
def served(tmp_path):
    srv = Served(tmp_path, "kill")
    yield srv
    srv.proc.stop(signal.SIGKILL)


def test_a_sandboxed_serve_does_all_its_work_and_exits_cleanly(tmp_path, served):
    traffic.exercise_all(served.net, served.blk)
    modes = seccomp_modes(served.pid)
    assert len(modes) >= 2 and set(modes) == {"2"}  # the control thread and the data plane are filtered
    traffic.exercise_all(served.net, served.blk)
    assert served.proc.stop() == 0, served.proc.log()
    log = served.proc.log()
    assert "seccomp filter on every thread" in log and "any other kills the process" in log
    assert "Traceback" not in log
    assert not any(os.path.exists(p) for p in [*served.net, served.blk])  # removed at exit, under the filter


def test_two_workers_and_an_image_in_memory_work_under_the_filter(tmp_path):
    """Worker threads start under the filter, and the inline blk engine (tmpfs image) makes no forbidden call."""
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    srv = Served(tmp_path, "kill", image_dir=shm, extra=("--workers", "2"))
    try:
        traffic.exercise_all(srv.net, srv.blk)
        assert len(seccomp_modes(srv.pid)) >= 3 and set(seccomp_modes(srv.pid)) == {"2"}
        assert srv.proc.stop() == 0, srv.proc.log()
        log = srv.proc.log()
        assert "data plane: 2 worker threads" in log
        # The inline engine is the C twin's (IOVIRT_NO_EXTENSIONS runs the thread pool there).
        assert ("block I/O on inline" in log) == (datapath.accel is not None), log
        assert "Traceback" not in log
    finally:
        srv.proc.stop(signal.SIGKILL)
        shutil.rmtree(shm)


STUCK_DATA_PLANE = textwrap.dedent(
    """
    import sys, threading
    from iovirt.vhost_user import dataplane

    def stuck(self):  # a data-plane thread that never comes back, holding the data-path lock
        with self.lock:
            threading.Event().wait()

    dataplane.DataPlane._run = stuck
    from iovirt.cli import main
    sys.exit(main(["serve", *sys.argv[1:]]))
    """
)


def test_the_sigterm_watchdog_works_under_the_filter(tmp_path):
    # After SIGTERM a watchdog thread is created (clone under the filter), removes the socket
    # files and ends the process without the stuck thread.
    sock = tmp_path / "a.sock"
    proc = ServeProcess(["--net", str(sock), "--sandbox"], tmp_path / "serve.log", [sock])
    proc.argv = [sys.executable, "-c", STUCK_DATA_PLANE, *proc.argv[proc.argv.index("serve") + 1 :]]
    with proc:
        front = VhostUserFrontend.connect(str(sock), timeout=5.0)  # the control thread hangs on the lock too
        try:
            assert proc.stop(timeout=2.0) == EXIT_FORCED, proc.log()
        finally:
            front.close()
    assert "exiting without them" in proc.log() and "seccomp filter on every thread" in proc.log()
    assert not sock.exists()


@pytest.mark.parametrize("mode", ["kill", "log"])
def test_the_back_end_programs_take_the_sandbox(tmp_path, mode):
    image, sock = tmp_path / "disk.img", tmp_path / "b.sock"
    image.write_bytes(bytes(1 << 20))
    proc = ServeProcess([], tmp_path / "blk.log", [sock])
    proc.argv = [*IOVIRT, "vhost-user-blk", f"--socket-path={sock}", f"--blk-file={image}", f"--sandbox={mode}"]
    with proc:
        traffic.exercise_blk(str(sock))
        traffic.exercise_blk(str(sock), inflight=True)
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()
    assert "seccomp filter on every thread" in proc.log()


def test_vhost_user_net_takes_the_sandbox(tmp_path):
    sock = tmp_path / "n.sock"
    proc = ServeProcess([], tmp_path / "net.log", [sock])
    proc.argv = [*IOVIRT, "vhost-user-net", f"--socket-path={sock}", "--sandbox"]
    with proc:
        with VhostUserDriver(str(sock)) as drv:
            drv.start_queues([0, 1], size=16)
    assert proc.proc is not None and proc.proc.returncode == 0, proc.log()


# A thread that exists before the filter makes the call: TSYNC must have given it the filter too.
CHILD = textwrap.dedent(
    """
    import os, socket, sys, threading
    from iovirt import sandbox

    go = threading.Event()
    result = []

    def offender():
        go.wait()
        try:
            result.append(repr({call}))
        except OSError as exc:
            result.append(f"refused: {{exc}}")

    thread = threading.Thread(target=offender)
    thread.start()
    sandbox.apply(sys.argv[1])
    go.set()
    thread.join()
    print("survived:", result[0], flush=True)
    """
)
FORBIDDEN = {
    "socket": "socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "execv": "os.execv('/bin/true', ['true'])",
    "fork": "os.fork()",
}


def child(call: str, mode: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", CHILD.format(call=call), mode], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("call", sorted(FORBIDDEN))
def test_a_forbidden_call_kills_only_the_sandboxed_process(served, call):
    traffic.exercise_net(served.net)
    done = child(FORBIDDEN[call], "kill")
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stdout, done.stderr)
    assert "survived" not in done.stdout
    # This process and the separate sandboxed server carry on.
    traffic.exercise_net(served.net)
    traffic.exercise_blk(served.blk)
    assert served.proc.stop() == 0, served.proc.log()


def test_opening_a_file_fails_without_killing():
    # An import or a traceback reaching for a file after start-up must not take the server down.
    done = child("open('/etc/hostname')", "kill")
    assert done.returncode == 0, done.stderr
    assert "survived: refused: [Errno 13] Permission denied" in done.stdout


def test_log_mode_lets_a_forbidden_call_through(tmp_path):
    done = child(FORBIDDEN["socket"], "log")
    assert done.returncode == 0, done.stderr
    assert "survived: <socket.socket" in done.stdout and "family=2" in done.stdout


def test_a_log_mode_serve_does_all_its_work(tmp_path):
    srv = Served(tmp_path, "log")
    try:
        traffic.exercise_all(srv.net, srv.blk)
        assert srv.proc.stop() == 0, srv.proc.log()
        assert "is allowed and logged" in srv.proc.log()
    finally:
        srv.proc.stop(signal.SIGKILL)
