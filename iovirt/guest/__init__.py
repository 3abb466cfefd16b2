"""The real-guest kit: boot Linux guests under QEMU (TCG) for iovirt's end-to-end tests.

A guest is Debian's kernel plus an initramfs built here from busybox-static
and the kernel's virtio modules (:mod:`.initramfs`); its ``/init``
(:mod:`.init_script`) configures networking from the kernel command line,
runs a shell script and reports the status on the serial console.
:class:`Guest` runs QEMU (:mod:`.qemu` builds its command line) and reads
that console.
"""

from iovirt.guest.errors import GuestFailed, GuestKitError, GuestTimeout, HostPartMissing
from iovirt.guest.guest import Guest, GuestResult
from iovirt.guest.kernel import GuestKernel, find_kernel
from iovirt.guest.ports import free_tcp_port, wait_tcp_listen, wait_unix_listen
from iovirt.guest.qemu import Machine, SocketNet, VhostUserBlk, VhostUserNet, VirtioBlk
from iovirt.guest.qmp import QMPClient, QMPError, QMPTimeout

__all__ = [
    "Guest", "GuestFailed", "GuestKernel", "GuestKitError", "GuestResult", "GuestTimeout",
    "HostPartMissing", "Machine", "QMPClient", "QMPError", "QMPTimeout", "SocketNet", "VhostUserBlk", "VhostUserNet", "VirtioBlk",
    "find_kernel", "free_tcp_port", "wait_tcp_listen", "wait_unix_listen",
]
