"""The kit's host-side parts, without booting: cpio, modules, kernel choice, QEMU argv, ports."""

from __future__ import annotations

import lzma
import os
import shutil
import socket
import stat
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iovirt.guest import GuestKitError, HostPartMissing, Machine, SocketNet, VhostUserBlk, VhostUserNet
from iovirt.guest import VirtioBlk, find_kernel, free_tcp_port, wait_tcp_listen, wait_unix_listen
from iovirt.guest import init_script
from iovirt.guest.cpio import CpioWriter
from iovirt.guest.errors import ModuleDependencyError
from iovirt.guest.initramfs import base_image, build_base, cache_key, guest_initrd, script_overlay
from iovirt.guest.modules import VIRTIO_MODULES, modinfo, resolve

KERNEL = find_kernel()
BUSYBOX = "/bin/busybox"


def _extract(archive: bytes, dest) -> None:
    # GNU cpio is an independent reader of the newc format.
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=archive, cwd=dest,
                   check=True, capture_output=True)


# -- cpio ------------------------------------------------------------------

_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=40).filter(
    lambda n: n not in (".", ".."))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(_names, st.binary(max_size=600), min_size=1, max_size=5))
def test_cpio_files_read_back_by_gnu_cpio(tmp_path_factory, files):
    dest = tmp_path_factory.mktemp("x")
    cpio = CpioWriter()
    cpio.directory("d")
    for name, data in files.items():
        cpio.file(f"d/{name}", data, 0o640)
    archive = cpio.finish()
    assert len(archive) % 4 == 0  # what lets archives be concatenated
    _extract(archive, dest)
    assert sorted(os.listdir(dest / "d")) == sorted(files)
    for name, data in files.items():
        assert (dest / "d" / name).read_bytes() == data
        assert stat.S_IMODE((dest / "d" / name).stat().st_mode) == 0o640


def test_cpio_symlink_and_device_entries(tmp_path):
    cpio = CpioWriter()
    cpio.symlink("sh", "busybox")
    cpio.char_device("console", 5, 1)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=cpio.finish(), capture_output=True,
                             check=True).stdout.decode()
    assert "sh -> busybox" in listing
    assert any(line.startswith("crw") and "5,   1" in line for line in listing.splitlines())


def test_concatenated_overlay_adds_the_script(tmp_path):
    archive = CpioWriter()
    archive.directory("iovirt")
    both = archive.finish() + script_overlay("echo hi\n", {"root/data": b"x"})
    (tmp_path / "root").mkdir()
    # GNU cpio stops at the first trailer; the kernel goes on. Read the second part alone.
    _extract(both[len(both) - len(script_overlay("echo hi\n", {"root/data": b"x"})):], tmp_path)
    assert (tmp_path / "iovirt" / "script.sh").read_text() == "echo hi\n"
    assert (tmp_path / "root" / "data").read_bytes() == b"x"


# -- modules -----------------------------------------------------------------

def test_virtio_modules_resolve_in_dependency_order():
    order = resolve(VIRTIO_MODULES, KERNEL.modules_dir)
    names = [m.name for m in order]
    assert set(VIRTIO_MODULES) <= set(names)
    for position, module in enumerate(order):
        assert set(module.depends) <= set(names[:position]), module.name
    net = next(m for m in order if m.name == "virtio_net")
    assert "net_failover" in net.depends and "virtio" in net.depends


def _fake_tree(tmp_path, modules: dict[str, str]):
    """A /lib/modules/<ver> copy with chosen real modules, optionally .xz-compressed."""
    real = {m.name: m.path for m in resolve(VIRTIO_MODULES, KERNEL.modules_dir)}
    (tmp_path / "kernel").mkdir()
    for name, form in modules.items():
        data = real[name].read_bytes()
        if form == "xz":
            (tmp_path / "kernel" / f"{name}.ko.xz").write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ))
        else:
            (tmp_path / "kernel" / f"{name}.ko").write_bytes(data)
    return real


def test_xz_modules_are_decompressed(tmp_path):
    real = _fake_tree(tmp_path, {"virtio_ring": "xz", "virtio": "ko", "virtio_blk": "xz"})
    order = resolve(["virtio_blk"], tmp_path)
    assert {m.name for m in order} == {"virtio", "virtio_ring", "virtio_blk"}
    assert order[-1].name == "virtio_blk"
    assert {m.name: m.data for m in order}["virtio_ring"] == real["virtio_ring"].read_bytes()


def test_missing_dependency_is_named(tmp_path):
    _fake_tree(tmp_path, {"virtio_blk": "ko", "virtio": "ko"})
    with pytest.raises(ModuleDependencyError) as info:
        resolve(["virtio_blk"], tmp_path)
    assert info.value.module == "virtio_ring"
    assert info.value.needed_by in ("virtio", "virtio_blk")  # whichever is visited first


def test_modinfo_rejects_a_non_module():
    with pytest.raises(Exception):
        modinfo(b"not an elf file")
    with open(BUSYBOX, "rb") as f:  # an ELF file without .modinfo
        with pytest.raises(GuestKitError, match=".modinfo"):
            modinfo(f.read())


# -- kernel ------------------------------------------------------------------

def test_find_kernel_picks_newest_version_that_has_modules(tmp_path):
    boot, mods = tmp_path / "boot", tmp_path / "modules"
    for version, with_modules in (("6.1.0-9-amd64", True), ("6.1.0-56-amd64", True), ("6.9.0-1-amd64", False)):
        boot.mkdir(exist_ok=True)
        (boot / f"vmlinuz-{version}").write_bytes(b"")
        if with_modules:
            (mods / version / "kernel").mkdir(parents=True)
    assert find_kernel(boot_dir=boot, modules_root=mods).version == "6.1.0-56-amd64"
    with pytest.raises(HostPartMissing, match="linux-image-amd64"):
        find_kernel("6.9.0-1-amd64", boot_dir=boot, modules_root=mods)


def test_host_kernel_is_debian_package_not_uname():
    assert KERNEL.vmlinuz.is_file() and (KERNEL.modules_dir / "kernel").is_dir()


# -- initramfs -----------------------------------------------------------------

def test_base_image_has_init_busybox_console_and_modules(tmp_path):
    _extract(build_base(KERNEL), tmp_path)
    assert os.access(tmp_path / "init", os.X_OK)
    assert (tmp_path / "bin" / "busybox").read_bytes() == open(BUSYBOX, "rb").read()
    order = (tmp_path / "iovirt" / "modules").read_text().split()
    assert order[-1] in ("virtio_net", "virtio_blk") and set(VIRTIO_MODULES) <= set(order)
    assert all((tmp_path / "lib" / "modules" / f"{m}.ko").is_file() for m in order)


def test_base_image_is_cached_by_key(tmp_path, monkeypatch):
    monkeypatch.setenv("IOVIRT_CACHE_DIR", str(tmp_path))
    first = base_image(KERNEL)
    mtime = first.stat().st_mtime_ns
    assert base_image(KERNEL) == first and first.stat().st_mtime_ns == mtime
    assert cache_key(KERNEL, VIRTIO_MODULES, False) in first.name
    assert cache_key(KERNEL, VIRTIO_MODULES, True) != cache_key(KERNEL, VIRTIO_MODULES, False)
    assert cache_key(KERNEL, ("virtio_blk",), False) != cache_key(KERNEL, VIRTIO_MODULES, False)


@pytest.mark.parametrize("compress", [False, True])
def test_overlay_starts_4_byte_aligned_after_the_base(tmp_path, monkeypatch, compress):
    # The kernel rejects an archive that follows a gzip stream at an unaligned offset.
    monkeypatch.setenv("IOVIRT_CACHE_DIR", str(tmp_path / "cache"))
    initrd = guest_initrd(tmp_path / "initrd", KERNEL, "exit 0\n", compress=compress).read_bytes()
    base = base_image(KERNEL, compress=compress).read_bytes()
    overlay = script_overlay("exit 0\n")
    start = len(initrd) - len(overlay)
    assert initrd.startswith(base) and initrd.endswith(overlay)
    assert start % 4 == 0 and set(initrd[len(base):start]) <= {0}


def test_init_and_lib_parse_in_busybox_sh(tmp_path):
    for text in (init_script.INIT, init_script.LIB):
        (tmp_path / "s").write_text(text)
        subprocess.run([BUSYBOX, "sh", "-n", str(tmp_path / "s")], check=True)


def test_wait_host_helper_reads_until_its_token(tmp_path):
    (tmp_path / "lib.sh").write_text(init_script.LIB)
    out = subprocess.run([BUSYBOX, "sh", "-c", f". {tmp_path}/lib.sh; iovirt_wait_host go && echo released"],
                         input=b"noise\ngo-not\ngo\n", capture_output=True, check=True).stdout.decode()
    assert out.splitlines() == [f"{init_script.MARK_WAIT} go", "released"]


# -- QEMU command line ---------------------------------------------------------

def _argv(**kw) -> list[str]:
    return Machine(kernel=KERNEL, initrd=KERNEL.vmlinuz, **kw).argv()


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_machine_base_flags():
    argv = _argv()
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "tcg"]
    assert "-nodefaults" in argv and "-no-reboot" in argv
    assert _values(argv, "-object") == ["memory-backend-memfd,id=mem,size=256M,share=on"]
    assert _values(argv, "-machine") == ["q35,memory-backend=mem"]
    assert _values(argv, "-append")[0].startswith("console=ttyS0 ")


def test_vhost_user_net_flags():
    nic = VhostUserNet("/run/a,b.sock", mac="52:54:00:00:00:01", queues=2, reconnect=1, ip="10.77.0.1/24")
    argv = _argv(devices=[nic])
    assert "socket,id=cn0,path=/run/a,,b.sock,reconnect=1" in _values(argv, "-chardev")
    assert _values(argv, "-netdev") == ["vhost-user,id=n0,chardev=cn0,queues=2"]
    assert _values(argv, "-device") == ["virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,vectors=0,romfile=,mq=on"]
    assert "iovirt.ip=10.77.0.1/24" in _values(argv, "-append")[0].split()


def test_vhost_user_blk_flags_and_nic_numbering():
    argv = _argv(devices=[VhostUserBlk("/s0", num_queues=2), SocketNet(connect=("127.0.0.1", 5), ip="10.0.0.1/8"),
                          VhostUserNet("/s1", ip="10.0.1.1/24")])
    assert _values(argv, "-device")[0] == "vhost-user-blk-pci,chardev=cb0,num-queues=2,vectors=0"
    assert _values(argv, "-netdev")[0] == "socket,id=n1,connect=127.0.0.1:5"
    append = _values(argv, "-append")[0].split()
    assert "iovirt.ip=10.0.0.1/8" in append and "iovirt.ip1=10.0.1.1/24" in append


def test_viommu_puts_iommu_first_and_every_device_behind_it():
    argv = _argv(devices=[VhostUserNet("/s"), VirtioBlk("/img", readonly=True)], viommu=True)
    devices = _values(argv, "-device")
    assert devices[0] == "intel-iommu,intremap=off,device-iotlb=on"
    assert all(d.endswith(",iommu_platform=on,ats=on,disable-legacy=on") for d in devices[1:])
    assert "intel_iommu=on" in _values(argv, "-append")[0].split()
    assert "readonly=on" in _values(argv, "-drive")[0]


def test_random_macs_differ_and_socket_net_needs_one_end():
    assert VhostUserNet("/s").mac != VhostUserNet("/s").mac
    with pytest.raises(ValueError):
        SocketNet()


def test_installed_qemu_has_the_properties_the_builders_use():
    # Booting covers the native devices; the vhost-user ones need a backend
    # (test_guest_vhost_user_peers.py), so their properties are checked here too.
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed")
    for device in ("virtio-net-pci", "vhost-user-blk-pci", "virtio-blk-pci", "intel-iommu"):
        help_text = subprocess.run(["qemu-system-x86_64", "-device", f"{device},help"],
                                   capture_output=True, text=True, check=True).stdout
        for prop in {"virtio-net-pci": ("vectors", "mq", "romfile", "iommu_platform", "ats"),
                     "vhost-user-blk-pci": ("vectors", "num-queues", "iommu_platform", "disable-legacy"),
                     "virtio-blk-pci": ("num-queues",),
                     "intel-iommu": ("intremap", "device-iotlb")}[device]:
            assert f" {prop}=" in help_text, (device, prop)


# -- ports ---------------------------------------------------------------------

def test_wait_tcp_listen_sees_a_listener_without_connecting():
    port = free_tcp_port()
    with pytest.raises(GuestKitError, match=str(port)):
        wait_tcp_listen(port, timeout=0.1)
    with socket.create_server(("127.0.0.1", port)) as server:
        wait_tcp_listen(port, timeout=2)
        server.settimeout(0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_wait_unix_listen(tmp_path):
    path = tmp_path / "s.sock"
    with pytest.raises(GuestKitError, match="s.sock"):
        wait_unix_listen(path, timeout=0.1)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        wait_unix_listen(path, timeout=2)
