"""Open vSwitch with DPDK as a port-to-port peer: a private ``ovsdb-server`` and ``ovs-vswitchd-dpdk``.

A netdev bridge with two ``dpdkvhostuser`` ports (OVS listens on the
sockets) and the default NORMAL action (MAC learning), its PMD thread pinned
to core 0 like iovirt's back-end, its other threads on core 1.  Everything
lives in a temporary run directory; nothing touches the system's own OVS
configuration.  DPDK inside OVS needs hugepages (OVS adds ``--in-memory``,
which ``--no-huge`` cannot be combined with), so :func:`ensure_hugepages`
reserves and mounts them when they are missing (root).

Debian package: ``openvswitch-switch-dpdk`` (the binary is
``/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

VSWITCHD = Path("/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk")
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
HUGEPAGES_2M = 600  # 1.2 GiB: OVS's 1 GiB socket memory and some headroom
HUGETLBFS = Path("/dev/hugepages")


def available() -> str | None:
    """None when OVS with DPDK can run here, else why not."""
    if not VSWITCHD.exists() or not SCHEMA.exists():
        return "openvswitch-switch-dpdk is not installed"
    if os.geteuid() != 0:
        return "OVS with DPDK needs root (hugepages)"
    return None


def ensure_hugepages() -> None:
    """Reserve 2 MiB hugepages and mount hugetlbfs at /dev/hugepages if not done yet."""
    nr = Path("/proc/sys/vm/nr_hugepages")
    if int(nr.read_text()) < HUGEPAGES_2M:
        nr.write_text(str(HUGEPAGES_2M))
    mounts = Path("/proc/mounts").read_text()
    if not any(line.split()[1] == str(HUGETLBFS) and line.split()[2] == "hugetlbfs" for line in mounts.splitlines()):
        HUGETLBFS.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "hugetlbfs", "nodev", str(HUGETLBFS)], check=True)


@contextlib.contextmanager
def ovs_bridge(run_dir: Path, ports: int = 2, timeout: float = 60.0) -> Iterator[list[Path]]:
    """A running OVS-DPDK netdev bridge; yields the ``dpdkvhostuser`` sockets of its ports."""
    reason = available()
    if reason:
        raise RuntimeError(reason)
    ensure_hugepages()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OVS_RUNDIR=str(run_dir), OVS_LOGDIR=str(run_dir), OVS_DBDIR=str(run_dir),
               OVS_SYSCONFDIR=str(run_dir))
    db = f"unix:{run_dir}/db.sock"

    def vsctl(*args: str) -> None:
        subprocess.run(["ovs-vsctl", f"--db={db}", f"--timeout={int(timeout)}", *args], env=env, check=True,
                       stdout=subprocess.DEVNULL)

    subprocess.run(["ovsdb-tool", "create", str(run_dir / "conf.db"), str(SCHEMA)], env=env, check=True)
    ovsdb = subprocess.Popen(["ovsdb-server", str(run_dir / "conf.db"), f"--remote=punix:{run_dir}/db.sock",
                              f"--log-file={run_dir}/ovsdb.log"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    vswitchd: subprocess.Popen | None = None
    try:
        deadline = time.monotonic() + timeout
        while not (run_dir / "db.sock").exists():
            if ovsdb.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ovsdb-server did not start; see {run_dir}/ovsdb.log")
            time.sleep(0.05)
        vsctl("--no-wait", "init")
        vsctl("--no-wait", "set", "Open_vSwitch", ".", "other_config:dpdk-init=true",
              "other_config:dpdk-extra=--no-pci", "other_config:dpdk-socket-mem=1024",
              "other_config:pmd-cpu-mask=0x1", "other_config:dpdk-lcore-mask=0x2")
        vswitchd = subprocess.Popen([str(VSWITCHD), db, f"--log-file={run_dir}/vswitchd.log"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        vsctl("add-br", "br0", "--", "set", "bridge", "br0", "datapath_type=netdev")
        socks = []
        for i in range(ports):
            vsctl("add-port", "br0", f"p{i}", "--", "set", "Interface", f"p{i}", "type=dpdkvhostuser")
            socks.append(run_dir / f"p{i}")
        for sock in socks:
            while not sock.exists():
                if vswitchd.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ovs-vswitchd did not create {sock}; see {run_dir}/vswitchd.log")
                time.sleep(0.05)
        yield socks
    finally:
        for proc in (vswitchd, ovsdb):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
