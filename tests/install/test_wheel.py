"""Install iovirt the way a user does: sdist and wheel from a clean copy, the wheel in a fresh venv.

The editable install the suite runs under sees every file of the tree, so a
subpackage missing from the wheel (a folder without ``__init__.py``) or a
``.pyx`` missing from the sdist passes every other test. Here ``python -m
build`` makes the sdist from a copy of the tracked tree and then the wheel
*from that sdist*; the wheel goes into a new venv, and its ``iovirt`` runs
from a directory outside any source tree, without ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds six Cython extensions and a venv: minutes, not seconds

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 900
RUN_TIMEOUT = 60

# Runs in the venv's interpreter against a served net and blk device: the
# opening a VMM makes (vhost-user.rst "Feature negotiation"), then the blk
# config space (virtio 1.2 5.2.4: capacity in 512-byte sectors).
ROUND_TRIP = r"""
import json, sys
from iovirt.vhost_user import bringup
from iovirt.vhost_user.frontend import VhostUserFrontend

VIRTIO_F_VERSION_1 = 32                 # virtio 1.2 6
VHOST_USER_F_PROTOCOL_FEATURES = 30     # vhost-user.rst "Protocol features"
VHOST_USER_PROTOCOL_F_REPLY_ACK = 3
VHOST_USER_PROTOCOL_F_CONFIG = 9

net_path, blk_path = sys.argv[1:3]
out = {}
for name, path in (("net", net_path), ("blk", blk_path)):
    with VhostUserFrontend.connect(path) as fe:
        offered = fe.get_features()
        offered_protocol = fe.get_protocol_features()
        wanted_protocol = (1 << VHOST_USER_PROTOCOL_F_REPLY_ACK) | (1 << VHOST_USER_PROTOCOL_F_CONFIG)
        agreed = bringup.negotiate(fe, offered | (1 << VIRTIO_F_VERSION_1), wanted_protocol)
        acked, acked_protocol = agreed.features, agreed.protocol_features
        entry = {"offered": offered, "offered_protocol": offered_protocol,
                 "acked": acked, "acked_protocol": acked_protocol}
        if name == "blk":
            entry["capacity"] = int.from_bytes(fe.get_config(0, 8), "little")
        out[name] = entry
print(json.dumps(out))
"""


@dataclass
class Installed:
    """What the module fixture built and installed."""

    src: Path
    wheel: Path
    sdist: Path
    venv: Path
    outside: Path  # a cwd outside every source tree
    env: dict[str, str]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def iovirt(self) -> Path:
        return self.venv / "bin" / "iovirt"

    def run(self, *argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(a) for a in argv], cwd=self.outside, env=env or self.env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)


def clean_env() -> dict[str, str]:
    """The caller's environment without anything that would point Python at a source tree
    or choose an iovirt implementation."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("IOVIRT_")}


def copy_tracked_tree(dest: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files (never build artefacts) to ``dest``."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree but still tracked
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(src.read_bytes())


def check(proc: subprocess.CompletedProcess[str], what: str) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("install")
    src, dist, venv, outside = root / "src", root / "dist", root / "venv", root / "elsewhere"
    outside.mkdir()
    copy_tracked_tree(src)
    env = clean_env()
    # No flags: build the sdist, then the wheel from the unpacked sdist (what a user's pip does).
    check(subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT), "python -m build")
    (sdist,) = dist.glob("iovirt-*.tar.gz")
    (wheel,) = dist.glob("iovirt-*.whl")
    check(subprocess.run([sys.executable, "-m", "venv", str(venv)], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT), "python -m venv")
    check(subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", str(wheel)], cwd=outside, env=env,
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT), "pip install WHEEL")
    return Installed(src=src, wheel=wheel, sdist=sdist, venv=venv, outside=outside, env=env)


def test_wheel_has_every_subpackage(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    sources = {p.relative_to(installed.src).as_posix() for p in (installed.src / "iovirt").rglob("*.py")}
    missing = sorted(sources - names)
    missing_dirs = sorted({m.rsplit("/", 1)[0] for m in missing})
    assert not missing, f"packages missing from {installed.wheel.name}: {missing_dirs} ({missing})"


def test_wheel_has_every_compiled_extension(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    pyx = sorted(p.relative_to(installed.src).with_suffix("").as_posix() for p in (installed.src / "iovirt").rglob("*.pyx"))
    assert pyx, "no .pyx in the source tree"
    compiled = {n.split(".", 1)[0] for n in names if n.endswith(".so")}
    assert set(pyx) <= compiled, f"extensions missing from the wheel: {sorted(set(pyx) - compiled)}"


def test_sdist_has_the_cython_sources(installed: Installed) -> None:
    with tarfile.open(installed.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    cython = [*(installed.src / "iovirt").rglob("*.pyx"), *(installed.src / "iovirt").rglob("*.pxd")]
    wanted = {p.relative_to(installed.src).as_posix() for p in cython}
    assert wanted and wanted <= names, f"missing from {installed.sdist.name}: {sorted(wanted - names)}"


def test_imported_from_the_venv_not_the_source_tree(installed: Installed) -> None:
    out = check(installed.run(installed.python, "-c",
                              "import iovirt, sysconfig; print(iovirt.__file__); print(sysconfig.get_paths()['platlib'])"),
                "import iovirt")
    module, site_packages = (Path(line).resolve() for line in out.stdout.split())
    assert module.is_relative_to(site_packages), f"iovirt imported from {module}, not {site_packages}"
    assert not module.is_relative_to(REPO) and not module.is_relative_to(installed.src)


def test_cli_version_info_and_serve_help(installed: Installed) -> None:
    version = installed.wheel.name.split("-")[1]
    out = check(installed.run(installed.iovirt, "--version"), "iovirt --version")
    assert f"iovirt {version}" in out.stdout
    # A missing extension is an import error rather than a fallback to pure Python.
    info = check(installed.run(installed.iovirt, "info", env={**installed.env, "IOVIRT_REQUIRE_EXTENSIONS": "1"}),
                 "iovirt info")
    ring = [line for line in info.stdout.splitlines() if "virtqueue" in line or "ring" in line]
    assert any("cython" in line for line in ring), info.stdout
    serve = check(installed.run(installed.iovirt, "serve", "--help"), "iovirt serve --help")
    assert "--net" in serve.stdout and "--blk" in serve.stdout
    # Package data (the conformance statement inventory) came through the sdist into the wheel.
    coverage = check(installed.run(installed.iovirt, "conform", "--coverage"), "iovirt conform --coverage")
    assert "total" in coverage.stdout


def test_vhost_user_round_trip(installed: Installed) -> None:
    net, blk, image = installed.outside / "net.sock", installed.outside / "blk.sock", installed.outside / "disk.img"
    log = installed.outside / "serve.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen([str(installed.iovirt), "serve", "--net", str(net), "--blk", f"{blk},{image},size=1M"],
                                  cwd=installed.outside, env=installed.env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (net.exists() and blk.exists()):
            assert server.poll() is None, f"iovirt serve exited {server.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"sockets never appeared:\n{log.read_text()}"
            time.sleep(0.05)
        client = check(installed.run(installed.python, "-c", ROUND_TRIP, net, blk), "the vhost-user front-end")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, f"iovirt serve exited {code} on SIGTERM:\n{log.read_text()}"
    result = json.loads(client.stdout)
    net_r, blk_r = result["net"], result["blk"]
    for dev in (net_r, blk_r):
        assert dev["offered"] >> 32 & 1 and dev["offered"] >> 30 & 1  # VERSION_1, PROTOCOL_FEATURES
        assert dev["acked"] >> 32 & 1 and dev["acked_protocol"] >> 3 & 1  # REPLY_ACK negotiated
    assert net_r["offered"] >> 5 & 1  # VIRTIO_NET_F_MAC
    assert blk_r["offered"] >> 9 & 1 and blk_r["acked"] >> 9 & 1  # VIRTIO_BLK_F_FLUSH
    assert blk_r["capacity"] == (1 << 20) // 512  # size=1M in 512-byte sectors
