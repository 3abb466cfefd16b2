"""The pytest plugin as a user's project sees it: loaded through its ``pytest11`` entry point, fixtures, options, pcaps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scapy.utils import rdpcap

import iovirt

USER_TEST = '''
import pytest
from scapy.layers.l2 import Ether
from scapy.packet import Raw

FRAME = Ether(src="02:00:00:00:00:0a", dst="ff:ff:ff:ff:ff:ff", type=0x88B5) / Raw(b"user" + bytes(100))

def test_in_process(iovirt_net):
    iovirt_net.send(FRAME)
    assert iovirt_net.recv(1)[0][Raw].load.startswith(b"user")

@pytest.mark.parametrize("iovirt_vhost_net", [{"b": {"rx_buffer_size": 64}}], indirect=True)
def test_over_socket(iovirt_vhost_net):
    iovirt_vhost_net.send(FRAME)
    (got,) = iovirt_vhost_net.recv(1)
    assert got.num_buffers == 3  # 12 + 118 bytes in 64-byte buffers
'''


def test_plugin_in_a_user_project(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST)
    pcaps = tmp_path / "pcaps"
    env = dict(os.environ, PYTHONPATH=str(Path(iovirt.__file__).parent.parent))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--iovirt-bench-pcap={pcaps}", "test_user.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    # broadcast: the receiving port and the capture port each saw the frame
    for name in ("test_in_process.pcap", "test_over_socket_iovirt_vhost_net0_.pcap"):
        frames = rdpcap(str(pcaps / name))
        assert len(frames) == 2 and all(b"user" in bytes(f) for f in frames)
