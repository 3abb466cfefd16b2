"""A real ``iovirt serve --isolate`` process: two net workers, one blk worker, their supervisor."""

from __future__ import annotations

import os
import signal

import pytest

from isolate_helpers import Supervised, alive


@pytest.fixture
def served(tmp_path):
    s = Supervised(tmp_path)
    pids = list(s.pids().values())
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()
    for pid in pids + list(s.pids().values()):
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
