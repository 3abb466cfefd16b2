"""``iovirt serve --control`` as a program: the socket goes away with the process; --isolate refuses it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from iovirt.serve_process import ServeProcess


def test_control_socket_is_removed_when_serve_stops(tmp_path):
    net, control = tmp_path / "n0.sock", tmp_path / "ctl.sock"
    proc = ServeProcess(["--net", str(net), "--control", str(control)], tmp_path / "serve.log", [net, control]).start()
    try:
        out = subprocess.run([sys.executable, "-m", "iovirt", "ctl", str(control), "devices"], capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert [d["name"] for d in json.loads(out.stdout)] == ["net0"]
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.log()
    assert not control.exists()
    assert "Traceback" not in proc.log()


def test_control_with_isolate_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "iovirt", "serve", "--net", str(tmp_path / "n.sock"), "--isolate",
                          "--control", str(tmp_path / "ctl.sock")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "--control cannot be combined with --isolate" in out.stderr
    assert not (tmp_path / "ctl.sock").exists()
