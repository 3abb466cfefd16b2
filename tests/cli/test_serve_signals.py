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

from iovirt.serve_process import ServeProcess


def test_sigterm_delivered_to_a_data_plane_thread_stops_serve(tmp_path):
    sock = tmp_path / "n.sock"
    with ServeProcess(["--net", str(sock)], tmp_path / "serve.log", [sock]) as srv:
        pid = srv.proc.pid
        others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        assert others, "serve runs its data plane on threads of its own"
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.tgkill(pid, others[0], signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), "tgkill")
        srv.proc.wait(10)  # TimeoutExpired fails the test; leaving the block then stops the process
        assert srv.proc.returncode == 0, srv.log()
    assert "signal 15: shutting down" in srv.log()
    assert not sock.exists()
