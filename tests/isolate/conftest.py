"""A real ``iovirt serve --isolate`` process: two net workers, one blk worker, their supervisor."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isolate_helpers import alive, wait_until

SERVING = re.compile(r"(\w+) \(.*?\): worker pid (\d+) serving")


class Supervised:
    """``iovirt serve --isolate`` with its log in a file; worker pids read from the supervisor's status lines."""

    def __init__(self, tmp: Path, extra: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.net_paths = [str(tmp / f"net{i}.sock") for i in range(2)]
        self.blk_path = str(tmp / "blk.sock")
        self.image = tmp / "disk.img"
        self.log_path = tmp / "serve.log"
        argv = [sys.executable, "-m", "iovirt", "--log-level", "info", "serve", "--isolate", *extra]
        for path in self.net_paths:
            argv += ["--net", path]
        argv += ["--blk", f"{self.blk_path},{self.image},size=1M"]
        self.proc = subprocess.Popen(argv, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)
        assert wait_until(lambda: set(self.pids()) == {"net0", "net1", "blk0"}, 30), self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """The serving worker of each device (the latest status line wins)."""
        return {name: int(pid) for name, pid in SERVING.findall(self.log())}

    def wait_new_worker(self, name: str, old: int, timeout: float = 15.0) -> int:
        assert wait_until(lambda: self.pids()[name] != old, timeout), self.log()
        return self.pids()[name]

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds it took)."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(15)
        return code, time.monotonic() - start


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
