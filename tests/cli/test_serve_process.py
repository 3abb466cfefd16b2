"""``ServeProcess`` (the real-guest tests' and the demo's way to run ``iovirt serve``) never leaks a process."""

from __future__ import annotations

import pytest

from iovirt.errors import IovirtError
from iovirt.serve_process import ServeProcess


def test_a_second_start_while_running_is_refused_and_a_restart_works(tmp_path):
    sock = tmp_path / "n.sock"
    serve = ServeProcess(["--net", str(sock)], tmp_path / "serve.log", [sock])
    with serve:  # entering starts it
        first = serve.proc
        with pytest.raises(IovirtError, match="already running"):
            serve.start()
        assert serve.proc is first and first.poll() is None
    assert first.poll() is not None  # leaving stopped it
    serve.start()
    try:
        assert serve.proc is not first and serve.proc.poll() is None
    finally:
        serve.stop()
