"""SIGTERM stops ``iovirt serve`` whichever of its threads the kernel delivers it to.

A signal sent to a process may go to any of its threads that does not block
it; CPython runs Python handlers only in the main thread, which it just flags.
The control loop, blocked in ``select`` with no deadline, must still wake and
stop: ``VhostUserServer`` makes signals wake it (``signal.set_wakeup_fd``).
Without that, a CI rehearsal saw ``serve`` ignore a SIGTERM for 30 s.  Here the
signal goes to a data-plane thread with ``tgkill(2)``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time


def _wait_for(path, proc, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigterm_delivered_to_a_data_plane_thread_stops_serve(tmp_path):
    sock = tmp_path / "n.sock"
    proc = subprocess.Popen([sys.executable, "-m", "iovirt", "serve", "--net", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock, proc)
        others = [int(tid) for tid in os.listdir(f"/proc/{proc.pid}/task") if int(tid) != proc.pid]
        assert others, "serve runs its data plane on threads of its own"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.tgkill(proc.pid, others[0], signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "tgkill")
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "signal 15: shutting down" in err
    assert not sock.exists()
