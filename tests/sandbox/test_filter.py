"""The seccomp program of :mod:`iovirt.sandbox`, read by a small classic-BPF interpreter.

Each verdict the filter gives is checked without installing it: the
x86_64 system-call numbers against the kernel's own header, the allowlist
against the calls a served process must never make, the argument checks
on ``clone`` and ``ioctl``, and the architecture check.
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from iovirt import sandbox
from iovirt.sandbox import (
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_LOG,
    SYSCALLS,
    SandboxError,
)

UNISTD_64 = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
AUDIT_ARCH_I386 = 3 | 0x4000_0000
X32_SYSCALL_BIT = 0x4000_0000
TCGETS = 0x5401
NEVER = ["execve", "execveat", "fork", "vfork", "socket", "connect", "bind", "listen", "ptrace", "mount",
         "kill", "setuid", "chmod", "openat", "open", "socketpair", "process_vm_writev", "init_module"]


def run(filt: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """Evaluate a seccomp program (the four instruction kinds it uses) on one system call."""
    words = list(args) + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *words)
    insns = [struct.unpack_from("=HBBI", filt, i) for i in range(0, len(filt), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == sandbox.BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == sandbox.BPF_JMP_JEQ_K:
            pc += jt if acc == k else jf
        elif code == sandbox.BPF_JMP_JSET_K:
            pc += jt if acc & k else jf
        elif code == sandbox.BPF_RET_K:
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")


@pytest.mark.skipif(not UNISTD_64.exists(), reason="the kernel headers (linux-libc-dev) are not installed")
def test_the_table_matches_the_kernel_headers():
    header = dict(re.findall(r"#define __NR_(\w+) (\d+)", UNISTD_64.read_text()))
    assert {name: int(header[name]) for name in SYSCALLS} == SYSCALLS


def test_every_allowed_call_is_in_the_table_and_none_is_dangerous():
    assert set(sandbox.ALLOWED) <= set(SYSCALLS)
    assert len(set(sandbox.ALLOWED)) == len(sandbox.ALLOWED)
    assert not set(NEVER) & set(sandbox.ALLOWED)


def test_verdicts_in_kill_mode():
    filt = sandbox.program("kill")
    for name in sandbox.ALLOWED:
        assert run(filt, SYSCALLS[name]) == SECCOMP_RET_ALLOW, name
    assert run(filt, 59) == SECCOMP_RET_KILL_PROCESS  # execve
    assert run(filt, 41, (2, 1, 0)) == SECCOMP_RET_KILL_PROCESS  # socket(AF_INET, SOCK_STREAM)
    assert run(filt, 57) == SECCOMP_RET_KILL_PROCESS  # fork
    assert run(filt, 101) == SECCOMP_RET_KILL_PROCESS  # ptrace


def test_clone_makes_threads_only_and_clone3_falls_back_to_it():
    filt = sandbox.program("kill")
    thread = 0x003D0F00  # glibc's pthread_create: CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|...
    assert run(filt, SYSCALLS["clone"], (thread,)) == SECCOMP_RET_ALLOW
    assert run(filt, SYSCALLS["clone"], (0x01200011,)) == SECCOMP_RET_KILL_PROCESS  # fork(): CHILD_SETTID|...|SIGCHLD
    assert run(filt, SYSCALLS["clone"], (0x4111,)) == SECCOMP_RET_KILL_PROCESS  # vfork-like: CLONE_VM|CLONE_VFORK
    assert run(filt, SYSCALLS["clone3"]) == SECCOMP_RET_ERRNO | errno.ENOSYS


def test_ioctl_only_sets_non_blocking_mode():
    filt = sandbox.program("kill")
    assert run(filt, SYSCALLS["ioctl"], (5, sandbox.FIONBIO)) == SECCOMP_RET_ALLOW
    assert run(filt, SYSCALLS["ioctl"], (5, TCGETS)) == SECCOMP_RET_KILL_PROCESS
    assert run(filt, SYSCALLS["ioctl"], (5, 0x400454CA)) == SECCOMP_RET_KILL_PROCESS  # TUNSETIFF


def test_opening_a_file_fails_softly():
    filt = sandbox.program("kill")
    assert run(filt, SYSCALLS["openat"]) == SECCOMP_RET_ERRNO | errno.EACCES
    assert run(filt, SYSCALLS["open"]) == SECCOMP_RET_ERRNO | errno.EACCES


def test_other_abis_are_refused():
    filt = sandbox.program("kill")
    assert run(filt, 3, arch=AUDIT_ARCH_I386) == SECCOMP_RET_KILL_PROCESS  # i386 close = x86_64 fstat
    assert run(filt, X32_SYSCALL_BIT | 0) == SECCOMP_RET_KILL_PROCESS  # x32 read


def test_log_mode_logs_what_kill_mode_refuses():
    filt = sandbox.program("log")
    assert run(filt, 59) == SECCOMP_RET_LOG
    assert run(filt, SYSCALLS["openat"]) == SECCOMP_RET_LOG
    assert run(filt, SYSCALLS["clone"], (0x01200011,)) == SECCOMP_RET_LOG
    assert run(filt, SYSCALLS["read"]) == SECCOMP_RET_ALLOW
    assert run(filt, 3, arch=AUDIT_ARCH_I386) == SECCOMP_RET_KILL_PROCESS


def test_unknown_mode_is_refused():
    with pytest.raises(SandboxError, match="expected one of kill, log"):
        sandbox.program("trap")


def test_other_architectures_are_refused_cleanly(monkeypatch):
    real = sandbox.os.uname()
    fake = type(real)((real.sysname, real.nodename, real.release, real.version, "aarch64"))
    monkeypatch.setattr(sandbox.os, "uname", lambda: fake)
    with pytest.raises(SandboxError, match="x86_64"):
        sandbox.apply("kill")
