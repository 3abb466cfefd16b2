"""QEMU command lines for real-guest runs: the machine and its devices.

The flags target QEMU 7.2 under TCG:
guest RAM is a shared memfd (a vhost-user backend must mmap it), vhost-user
devices get ``vectors=0`` because QEMU 7.2 under TCG crashes when a
vhost-user device uses MSI-X, and ``romfile=`` skips loading iPXE.
``-nodefaults`` keeps QEMU from adding its own NIC, which would become eth0.
"""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from iovirt.guest.kernel import GuestKernel

QEMU = "qemu-system-x86_64"

#: Virtio-pci properties a device needs behind the emulated VT-d: DMA goes
#: through the IOMMU (``iommu_platform``), the device caches translations
#: (``ats``, with ``device-iotlb=on`` on the IOMMU), and it is modern-only.
IOMMU_DEVICE_PROPS = "iommu_platform=on,ats=on,disable-legacy=on"


def random_mac() -> str:
    """A MAC in QEMU's 52:54:00 range; random so that guests of separate QEMUs differ."""
    return "52:54:00:%02x:%02x:%02x" % tuple(random.randrange(256) for _ in range(3))


def _opt(value: str | Path) -> str:
    # QEMU's option syntax escapes a comma inside a value by doubling it.
    return str(value).replace(",", ",,")


def _chardev(cid: str, socket: str | Path, reconnect: int | None, server: bool = False) -> list[str]:
    spec = f"socket,id={cid},path={_opt(socket)}"
    if server:
        # QEMU listens and the back-end connects (client mode); QEMU 7.2
        # still holds device init until a back-end has connected.
        spec += ",server=on,wait=off"
    if reconnect is not None:
        # QEMU re-dials the backend every `reconnect` seconds after it goes away.
        spec += f",reconnect={reconnect}"
    return ["-chardev", spec]


@dataclass
class NetDevice:
    """Common part of a guest NIC: its MAC and the address /init gives it (``ADDR/LEN``)."""

    mac: str = field(default_factory=random_mac, kw_only=True)
    ip: str | None = field(default=None, kw_only=True)


@dataclass
class VhostUserNet(NetDevice):
    """virtio-net-pci whose data path is a vhost-user backend listening on ``socket``."""

    socket: str | Path
    queues: int = 1
    reconnect: int | None = None
    server: bool = False
    """QEMU listens on ``socket`` (``server=on,wait=off``); the back-end runs in client mode."""
    packed: bool = False
    """``packed=on``: the guest may use packed rings (QEMU masks bit 34 unless the back-end offers it)."""

    def qemu_args(self, index: int, iommu: bool) -> list[str]:
        """The ``-chardev``/``-netdev``/``-device`` arguments for device number ``index``."""
        netdev = f"vhost-user,id=n{index},chardev=cn{index}"
        device = f"virtio-net-pci,netdev=n{index},mac={self.mac},vectors=0,romfile="
        if self.packed:
            device += ",packed=on"
        if self.queues > 1:
            netdev += f",queues={self.queues}"
            device += ",mq=on"
        if iommu:
            device += "," + IOMMU_DEVICE_PROPS
        return [*_chardev(f"cn{index}", self.socket, self.reconnect, self.server), "-netdev", netdev, "-device", device]


@dataclass
class SocketNet(NetDevice):
    """QEMU's own virtio-net joined to another QEMU by ``-netdev socket`` over TCP.

    Exactly one of ``listen`` and ``connect`` is a ``(host, port)``. The
    listening QEMU must be up before the connecting one starts, or the latter
    exits ("Connection refused").
    """

    listen: tuple[str, int] | None = None
    connect: tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if (self.listen is None) == (self.connect is None):
            raise ValueError("SocketNet needs exactly one of listen=(host, port) or connect=(host, port)")

    def qemu_args(self, index: int, iommu: bool) -> list[str]:
        """The ``-netdev``/``-device`` arguments for device number ``index``."""
        if self.listen is not None:
            mode, (host, port) = "listen", self.listen
        elif self.connect is not None:
            mode, (host, port) = "connect", self.connect
        else:
            raise ValueError("SocketNet needs exactly one of listen=(host, port) or connect=(host, port)")
        device = f"virtio-net-pci,netdev=n{index},mac={self.mac},romfile="
        if iommu:
            device += "," + IOMMU_DEVICE_PROPS
        return ["-netdev", f"socket,id=n{index},{mode}={host}:{port}", "-device", device]


@dataclass
class VhostUserBlk:
    """vhost-user-blk-pci served by a backend listening on ``socket``."""

    socket: str | Path
    num_queues: int = 1
    reconnect: int | None = None
    server: bool = False
    """QEMU listens on ``socket`` (``server=on,wait=off``); the back-end runs in client mode."""
    packed: bool = False
    """``packed=on``: the guest may use packed rings (QEMU masks bit 34 unless the back-end offers it)."""

    def qemu_args(self, index: int, iommu: bool) -> list[str]:
        """The ``-chardev``/``-device`` arguments for device number ``index``."""
        device = f"vhost-user-blk-pci,chardev=cb{index},num-queues={self.num_queues},vectors=0"
        if self.packed:
            device += ",packed=on"
        if iommu:
            device += "," + IOMMU_DEVICE_PROPS
        return [*_chardev(f"cb{index}", self.socket, self.reconnect, self.server), "-device", device]


@dataclass
class VirtioBlk:
    """QEMU's own virtio-blk-pci on a raw ``image`` file (for testing the kit itself)."""

    image: str | Path
    readonly: bool = False
    num_queues: int = 1

    def qemu_args(self, index: int, iommu: bool) -> list[str]:
        """The ``-drive``/``-device`` arguments for device number ``index``."""
        drive = f"file={_opt(self.image)},format=raw,if=none,id=d{index},readonly={'on' if self.readonly else 'off'}"
        device = f"virtio-blk-pci,drive=d{index},num-queues={self.num_queues}"
        if iommu:
            device += "," + IOMMU_DEVICE_PROPS
        return ["-drive", drive, "-device", device]


Device = VhostUserNet | SocketNet | VhostUserBlk | VirtioBlk


@dataclass
class Machine:
    """A q35 TCG machine booting ``kernel`` with ``initrd``, console on stdio.

    ``viommu`` adds an emulated Intel VT-d (``intel-iommu``, interrupt
    remapping off, device IOTLB on), puts every device behind it and turns
    it on in the guest (``intel_iommu=on``). ``qmp_socket`` adds a QMP
    server there (QEMU does not wait for a client); ``incoming`` starts QEMU
    paused, waiting for a migration stream from that URI (``unix:PATH``,
    ``tcp:HOST:PORT``, ``exec:CMD``): the source must have the same machine
    and devices (the vhost-user sockets may differ).
    """

    kernel: GuestKernel
    initrd: Path
    devices: list[Device] = field(default_factory=list)
    memory_mb: int = 256
    smp: int = 1
    viommu: bool = False
    append: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    qemu: str = QEMU
    qmp_socket: Path | None = None
    incoming: str | None = None
    #: What ``-kernel`` loads; ``None``: ``kernel.vmlinuz`` (:mod:`iovirt.guest.pvh` unpacks it).
    boot_image: Path | None = None

    def kernel_cmdline(self) -> str:
        """The guest kernel's command line, including the ``iovirt.ipN=`` networking."""
        # panic=-1 reboots at once on a panic, and -no-reboot turns that into a
        # QEMU exit, so a guest whose /init dies does not hang until a timeout.
        # cryptomgr.notests: the crypto self-tests take seconds of TCG time at boot, and one
        # guest soft-locked in cryptomgr_test on a loaded machine; the guests use no kernel crypto.
        args = ["console=ttyS0", "panic=-1", "quiet", "cryptomgr.notests"]
        if self.viommu:
            args.append("intel_iommu=on")
        nics = [d for d in self.devices if isinstance(d, NetDevice)]
        for n, nic in enumerate(nics):
            if nic.ip:
                args.append(f"iovirt.ip{'' if n == 0 else n}={nic.ip}")
        return " ".join(args + self.append)

    def argv(self) -> list[str]:
        """The full QEMU command line."""
        argv = [
            self.qemu, "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-smp", str(self.smp), "-m", f"{self.memory_mb}M",
            # vhost-user backends mmap guest RAM: it must be a shareable fd.
            "-object", f"memory-backend-memfd,id=mem,size={self.memory_mb}M,share=on",
            "-machine", "q35,memory-backend=mem",
            "-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0",
            "-kernel", str(self.boot_image or self.kernel.vmlinuz), "-initrd", str(self.initrd),
            "-append", self.kernel_cmdline(),
        ]
        if self.viommu:
            # The IOMMU must exist before the devices it translates for.
            argv += ["-device", "intel-iommu,intremap=off,device-iotlb=on"]
        for index, device in enumerate(self.devices):
            argv += device.qemu_args(index, self.viommu)
        if self.qmp_socket is not None:
            argv += ["-qmp", f"unix:{_opt(self.qmp_socket)},server=on,wait=off"]
        if self.incoming is not None:
            argv += ["-incoming", self.incoming]
        return argv + self.extra_args

    def shell_command(self) -> str:
        """The command line quoted for a shell (for logs and for running it by hand)."""
        return shlex.join(self.argv())
