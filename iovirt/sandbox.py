"""``--sandbox``: a seccomp filter that leaves a serving process only the system calls it needs.

Once ``iovirt serve`` (or ``vhost-user-net``/``vhost-user-blk``) has opened
its images and TAP device and its sockets listen, the process only moves
bytes between fds it already has and fds front-ends send it: accept a
connection, receive messages with their fds, map memory, read and write
eventfds, do image I/O, create the inflight region's memfd.  :func:`apply`
then installs a seccomp filter (classic BPF, ``seccomp(2)``; the kernel's
"Seccomp BPF" userspace-API document) that allows exactly those calls.  A compromised process can then neither start a
program (``execve``), nor create a process (``fork``, ``clone`` without
``CLONE_THREAD``), nor open a network socket, nor trace another process.

The filter is built with the standard library (``struct`` and ``ctypes``):
Debian's ``python3-seccomp`` binds Debian's Python only.  It is installed
with ``SECCOMP_FILTER_FLAG_TSYNC``, so every thread of the process gets it,
and threads created later inherit it.  A forbidden call ends the whole
process (``SECCOMP_RET_KILL_PROCESS``: it dies by SIGSYS, and the kernel's
audit log names the call), not one thread of a half-dead server.  The
``log`` mode (``SECCOMP_RET_LOG``) lets every call through and logs the
ones the filter would have refused: the way to find a missing call.

Two calls get an error instead of a verdict: ``clone3`` fails with ENOSYS
(its flags sit behind a pointer a filter cannot read; glibc then creates a
thread with ``clone``, whose flags the filter checks), and ``open``/
``openat`` fail with EACCES (the process opens no file after start-up; an
import or traceback that reaches for a file fails softly, not fatally).

Only x86_64 is supported: system-call numbers are per architecture, and
:data:`SYSCALLS` holds the x86_64 ones.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import os
import struct
import sys
from dataclasses import dataclass

from iovirt.errors import IovirtError
from iovirt.virtio.blk.aio import refuse_io_uring

log = logging.getLogger("iovirt.sandbox")

MODES = ("kill", "log")

# include/uapi/linux/prctl.h, include/uapi/linux/seccomp.h
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS = 0x8000_0000
SECCOMP_RET_ERRNO = 0x0005_0000
SECCOMP_RET_LOG = 0x7FFC_0000
SECCOMP_RET_ALLOW = 0x7FFF_0000

# include/uapi/linux/audit.h: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_X86_64 = 62 | 0x8000_0000 | 0x4000_0000

# include/uapi/linux/filter.h, include/uapi/linux/bpf_common.h
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00
BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00
BPF_RET_K = 0x06 | 0x00
BPF_MAXINSNS = 4096

# struct seccomp_data (include/uapi/linux/seccomp.h): int nr; __u32 arch; __u64 ip; __u64 args[6].
# The argument words below are the low 32 bits (x86_64 is little-endian).
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4


def seccomp_data_arg(index: int) -> int:
    """Offset of the low word of system-call argument ``index`` in ``struct seccomp_data``."""
    return 16 + 8 * index


CLONE_THREAD = 0x0001_0000  # include/uapi/linux/sched.h
FIONBIO = 0x5421  # include/uapi/asm-generic/ioctls.h

# x86_64 system-call numbers, from the kernel's arch/x86/entry/syscalls/syscall_64.tbl
# ("common" and "64" entries): every call this module names, and nothing else.
SYSCALLS: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "fstat": 5, "poll": 7, "mmap": 9,
    "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13, "rt_sigprocmask": 14,
    "rt_sigreturn": 15, "ioctl": 16, "pwrite64": 18, "mremap": 25, "madvise": 28, "getpid": 39, "sendto": 44,
    "sendmsg": 46, "recvmsg": 47, "getsockname": 51, "getsockopt": 55, "clone": 56, "exit": 60,
    "fcntl": 72, "fdatasync": 75, "ftruncate": 77, "unlink": 87, "readlink": 89,
    "gettimeofday": 96,
    "select": 23, "recvfrom": 45, "pselect6": 270, "gettid": 186, "sched_getaffinity": 204, "futex": 202, "restart_syscall": 219,
    "clock_gettime": 228, "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233,
    "openat": 257, "newfstatat": 262, "set_robust_list": 273, "fallocate": 285,
    "accept4": 288, "eventfd2": 290, "preadv": 295, "pwritev": 296, "seccomp": 317, "memfd_create": 319,
    "preadv2": 327, "pwritev2": 328, "rseq": 334, "clone3": 435,
}

# What the process calls after start-up, found with ``strace -f`` on ``iovirt serve`` while
# iovirt's front-end and QEMU guests drive net and blk devices (bring-up, traffic, the vIOMMU
# IOTLB path, the inflight region, reconnects, SIGTERM): docs/security.md, "Sandbox".
ALLOWED: tuple[str, ...] = (
    # The interpreter: the allocator (brk, mmap, mremap for large reallocs, munmap, madvise),
    # the GIL and locks (futex), logging's getpid; the clock, for socket timeouts, when the
    # vDSO cannot serve it (clocksources without a vDSO path).
    "brk", "mmap", "mremap", "munmap", "mprotect", "madvise", "futex", "getpid",
    "clock_gettime", "gettimeofday",
    # Signals: the SIGTERM/SIGINT handler runs and returns; Python blocks signals around
    # thread creation and restores the default handlers at exit; a wait interrupted by
    # SIGSTOP/SIGCONT resumes through restart_syscall.
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "restart_syscall",
    # Threads (clone itself is checked below): the data-plane thread starts when serving
    # starts and the SIGTERM watchdog when the signal comes; each registers its rseq area
    # and robust-futex list, and exits at shutdown.
    "gettid", "rseq", "set_robust_list", "exit", "exit_group",
    # glibc reads the creating thread's CPU affinity when a thread other than the main one
    # starts a thread (the blk I/O thread pool starts from the data plane: iovirt.virtio.blk.aio).
    "sched_getaffinity",
    # The control loop and the data plane wait on epoll sets; socket timeouts poll.
    "epoll_wait", "epoll_ctl", "poll",
    # vhost-user sockets: accept a front-end (accept4) and learn who it is (SO_PEERCRED,
    # the family of the accepted socket); messages with their fds in and replies out;
    # IOTLB misses out on the back-end channel.
    "accept4", "getsockopt", "getsockname", "recvmsg", "sendmsg", "sendto",
    # An --isolate worker: heartbeats and frame batches on its socketpairs to the
    # supervisor (recv/recv_into), and waiting a moment for room on the switch link.
    "recvfrom", "select", "pselect6",
    # fds from front-ends: eventfd reads and writes (kick, call, err), closing them; the
    # check that an fd is an eventfd (readlink of /proc/self/fd/N); fstat (newfstatat with
    # AT_EMPTY_PATH, fstat before glibc 2.33) and the mmap module's dup (fcntl
    # F_DUPFD_CLOEXEC) before a region is mapped; fcntl also sets and reads fd flags.
    "read", "write", "close", "readlink", "fstat", "newfstatat", "fcntl",
    # With --workers, the first frame from a port of one worker to a port of another makes
    # that crossing's two bells (iovirt/virtio/net/crossing.py): eventfds of its own.
    "eventfd2",
    # virtio-blk image I/O straight into guest memory, flush, discard and write-zeroes; where the
    # file system has no FALLOC_FL_ZERO_RANGE (tmpfs), write-zeroes writes the zeroes (pwrite64).
    "preadv", "pwritev", "preadv2", "pwritev2", "fdatasync", "fallocate", "pwrite64",
    # The inflight region (VHOST_USER_GET_INFLIGHT_FD) is a new memfd of the asked size.
    "memfd_create", "ftruncate",
    # Shutdown removes the socket files the process created (newfstatat, then unlink).
    "unlink",
)


class SandboxError(IovirtError):
    """The filter cannot be installed here (architecture, kernel, or a refused call)."""


@dataclass(frozen=True)
class Insn:
    """One classic-BPF instruction; ``jt``/``jf`` are label names or 0 (fall through)."""

    code: int
    k: int
    jt: str | int = 0
    jf: str | int = 0


def program(mode: str = "kill") -> bytes:
    """The filter for ``mode`` as ``struct sock_filter`` array bytes."""
    if mode not in MODES:
        raise SandboxError(f"sandbox mode {mode!r}: expected one of {', '.join(MODES)}")
    refused = SECCOMP_RET_KILL_PROCESS if mode == "kill" else SECCOMP_RET_LOG
    denied = SECCOMP_RET_ERRNO | errno.EACCES if mode == "kill" else SECCOMP_RET_LOG
    code: list[Insn | str] = [
        # A call made through another ABI (i386's int 0x80) has other numbers: never allowed.
        Insn(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        Insn(BPF_JMP_JEQ_K, AUDIT_ARCH_X86_64, 0, "wrong_arch"),
        Insn(BPF_LD_W_ABS, SECCOMP_DATA_NR),
        Insn(BPF_JMP_JEQ_K, SYSCALLS["clone3"], "enosys"),
        Insn(BPF_JMP_JEQ_K, SYSCALLS["clone"], "clone"),
        Insn(BPF_JMP_JEQ_K, SYSCALLS["ioctl"], "ioctl"),
        Insn(BPF_JMP_JEQ_K, SYSCALLS["open"], "denied"),
        Insn(BPF_JMP_JEQ_K, SYSCALLS["openat"], "denied"),
        # x32 calls (nr | 0x40000000) match no entry here, so they are refused too.
        *(Insn(BPF_JMP_JEQ_K, SYSCALLS[name], "allow") for name in ALLOWED),
        Insn(BPF_RET_K, refused),
        # clone: a thread (it shares this filter), never a process.
        "clone",
        Insn(BPF_LD_W_ABS, seccomp_data_arg(0)),
        Insn(BPF_JMP_JSET_K, CLONE_THREAD, "allow"),
        Insn(BPF_RET_K, refused),
        # ioctl: only FIONBIO, which socket.setblocking() uses.
        "ioctl",
        Insn(BPF_LD_W_ABS, seccomp_data_arg(1)),
        Insn(BPF_JMP_JEQ_K, FIONBIO, "allow"),
        Insn(BPF_RET_K, refused),
        "enosys", Insn(BPF_RET_K, SECCOMP_RET_ERRNO | errno.ENOSYS),
        "denied", Insn(BPF_RET_K, denied),
        "wrong_arch", Insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        "allow", Insn(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
    return _assemble(code)


def _assemble(code: list[Insn | str]) -> bytes:
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in code:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for pc, insn in enumerate(insns):
        jumps = []
        for target in (insn.jt, insn.jf):
            offset = labels[target] - pc - 1 if isinstance(target, str) else target
            if not 0 <= offset <= 0xFF:  # BPF jump offsets are one unsigned byte, forward only
                raise SandboxError(f"BPF jump of {offset} at instruction {pc}")
            jumps.append(offset)
        out += struct.pack("=HBBI", insn.code, jumps[0], jumps[1], insn.k)
    if len(insns) > BPF_MAXINSNS:
        raise SandboxError(f"filter of {len(insns)} instructions, the kernel takes {BPF_MAXINSNS}")
    return bytes(out)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def check_supported() -> None:
    """Raise :class:`SandboxError` unless this is a 64-bit x86_64 process on Linux."""
    machine = os.uname().machine
    if not sys.platform.startswith("linux") or machine != "x86_64" or struct.calcsize("P") != 8:
        raise SandboxError(
            f"--sandbox needs Linux on x86_64 (a 64-bit process); this is {sys.platform} on {machine}: "
            "its system-call numbers are not in iovirt's table"
        )


def apply(mode: str = "kill") -> None:
    """Install the filter on every thread of this process; irreversible.

    ``mode`` ``kill``: a forbidden call kills the process (SIGSYS);
    ``log``: it is allowed and logged to the kernel's audit log.
    """
    check_supported()
    # io_uring's calls are not allowed (a ring's operations escape the filter): blk I/O on threads.
    refuse_io_uring("the seccomp sandbox (--sandbox) forbids io_uring")
    filt = program(mode)
    libc = ctypes.CDLL(None, use_errno=True)
    # seccomp(2): without CAP_SYS_ADMIN a filter needs no_new_privs (no setuid gains later).
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    buf = ctypes.create_string_buffer(filt, len(filt))
    prog = _SockFprog(len(filt) // 8, ctypes.cast(buf, ctypes.c_void_p))
    # The libc wrapper for seccomp(2) is recent; syscall(2) reaches it everywhere.
    rc = libc.syscall(
        ctypes.c_long(SYSCALLS["seccomp"]), ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(prog),
    )
    if rc < 0:
        raise SandboxError(f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(ctypes.get_errno())}")
    if rc > 0:  # TSYNC: the id of a thread that could not take the filter
        raise SandboxError(f"seccomp: thread {rc} could not take the filter")
    outcome = "kills the process" if mode == "kill" else "is allowed and logged by the kernel (audit)"
    log.info("seccomp filter on every thread, %d system calls allowed; any other %s", len(ALLOWED), outcome)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--sandbox[=kill|log]`` to a serving program's parser."""
    parser.add_argument(
        "--sandbox", nargs="?", const="kill", choices=MODES, default=None,
        help="after start-up, allow only the system calls serving needs (seccomp); a forbidden call kills the "
        "process (kill, the default) or is only logged to the kernel audit log (log)",
    )
