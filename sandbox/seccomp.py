"""A seccomp-BPF filter, assembled here in a few dozen instructions, installed in every run before its code starts.

What the filter does, in order::

    arch != this machine's arch             -> kill the process (no 32-bit or x32 side door)
    x86_64 syscall number >= 0x40000000     -> kill the process (the x32 ABI)
    nr in policy.DENIED_SYSCALLS            -> EPERM
    socket(family not in policy.ALLOWED_SOCKET_FAMILIES, ...) -> EAFNOSUPPORT    (the list is empty: every family)
    clone(flags & any CLONE_NEW*)           -> EPERM          (clone3 is denied outright: its flags are in memory)
    anything else                           -> allow

The syscall numbers come from the kernel's headers (asm/unistd_64.h for x86_64, asm-generic/unistd.h for aarch64).
Installing requires no-new-privs (set just before). Standard library only (ctypes).
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

from .policy import ALLOWED_SOCKET_FAMILIES, DENIED_SYSCALLS

_X86_64 = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "pidfd_getfd": 438,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "move_mount": 429, "open_tree": 428,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "unshare": 272, "setns": 308, "clone3": 435, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "keyctl": 250, "add_key": 248, "request_key": 249, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320, "reboot": 169, "swapon": 167, "swapoff": 168,
    "acct": 163, "quotactl": 179, "syslog": 103, "vhangup": 153, "settimeofday": 164, "clock_settime": 227,
    "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170, "setdomainname": 171, "open_by_handle_at": 304,
    "name_to_handle_at": 303, "lookup_dcookie": 212, "fanotify_init": 300, "personality": 135, "mbind": 237,
    "set_mempolicy": 238, "migrate_pages": 256, "move_pages": 279, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446, "socket": 41, "clone": 56,
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220,
    "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242,
    "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245, "socketpair": 53,
}  # fmt: skip
_AARCH64 = {
    "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "kcmp": 272, "pidfd_getfd": 438,
    "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "move_mount": 429, "open_tree": 428,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "unshare": 97, "setns": 268, "clone3": 435, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "keyctl": 219, "add_key": 217, "request_key": 218, "init_module": 105, "finit_module": 273,
    "delete_module": 106, "kexec_load": 104, "kexec_file_load": 294, "reboot": 142, "swapon": 224, "swapoff": 225,
    "acct": 89, "quotactl": 60, "syslog": 116, "vhangup": 58, "settimeofday": 170, "clock_settime": 112,
    "clock_adjtime": 266, "adjtimex": 171, "sethostname": 161, "setdomainname": 162, "open_by_handle_at": 265,
    "name_to_handle_at": 264, "lookup_dcookie": 18, "fanotify_init": 262, "personality": 92, "mbind": 235,
    "set_mempolicy": 237, "migrate_pages": 238, "move_pages": 239, "landlock_create_ruleset": 444,
    "landlock_add_rule": 445, "landlock_restrict_self": 446, "socket": 198, "clone": 220,
    "shmget": 194, "shmat": 196, "shmctl": 195, "shmdt": 197, "semget": 190, "semop": 193, "semctl": 191,
    "semtimedop": 192, "msgget": 186, "msgsnd": 189, "msgrcv": 188, "msgctl": 187, "mq_open": 180, "mq_unlink": 181,
    "mq_timedsend": 182, "mq_timedreceive": 183, "mq_notify": 184, "mq_getsetattr": 185, "socketpair": 199,
}  # fmt: skip
# machine -> (AUDIT_ARCH_* value, syscall table)
_ARCHES = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}

CLONE_NAMESPACE_FLAGS = 0x02000000 | 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
# NEWCGROUP | NEWNS | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (NEWTIME 0x80 shares bits with CSIGNAL: left to
# the denied unshare/setns, since a plain clone cannot enter a time namespace of its own)

# BPF opcodes and seccomp return values (linux/filter.h, linux/seccomp.h).
_LD_W_ABS, _JEQ_K, _JGE_K, _JSET_K, _RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_KILL_PROCESS, _RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low 32 bits: little-endian)
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


class SeccompUnavailable(Exception):
    """This machine's architecture has no table here, or the kernel refused the filter."""


def build_program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions. Pure, so tests can read it."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise SeccompUnavailable(f"no seccomp table for {machine}")
    arch, table = _ARCHES[machine]
    denied = [table[name] for name in DENIED_SYSCALLS]
    eperm = _RET_ERRNO | errno.EPERM

    prog: list[tuple[int, int, int, int]] = [
        (_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_JEQ_K, 1, 0, arch),
        (_RET_K, 0, 0, _RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFF_NR),
    ]
    if machine == "x86_64":
        prog += [(_JGE_K, 0, 1, 0x40000000), (_RET_K, 0, 0, _RET_KILL_PROCESS)]
    for nr in denied:
        prog += [(_JEQ_K, 0, 1, nr), (_RET_K, 0, 0, eperm)]
    # socket(): allow only the listed families.
    families = list(ALLOWED_SOCKET_FAMILIES)
    prog += [(_JEQ_K, 0, 2 + len(families) + 1, table["socket"]), (_LD_W_ABS, 0, 0, _OFF_ARG0)]
    for i, family in enumerate(families):
        prog.append((_JEQ_K, len(families) - i, 0, family))
    prog += [(_RET_K, 0, 0, _RET_ERRNO | errno.EAFNOSUPPORT), (_RET_K, 0, 0, _RET_ALLOW)]
    # clone(): no namespace flags.
    prog += [
        (_JEQ_K, 0, 3, table["clone"]),
        (_LD_W_ABS, 0, 0, _OFF_ARG0),
        (_JSET_K, 0, 1, CLONE_NAMESPACE_FLAGS),
        (_RET_K, 0, 0, eperm),
        (_RET_K, 0, 0, _RET_ALLOW),
    ]
    return prog


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_LIBC = ctypes.CDLL(None, use_errno=True)
_compiled: dict[str, ctypes.Array[ctypes.c_char]] = {}  # machine -> the filter, assembled once per process


def prepare(machine: str | None = None) -> None:
    """Assemble the filter now (the sandbox process does this once, before it forks any run)."""
    machine = machine or platform.machine()
    if machine not in _compiled:
        raw = b"".join(struct.pack("=HBBI", *ins) for ins in build_program(machine))
        _compiled[machine] = ctypes.create_string_buffer(raw, len(raw))


def install(machine: str | None = None) -> None:
    """Install the filter on the calling thread (and its future children). Needs no-new-privs set first."""
    machine = machine or platform.machine()
    prepare(machine)
    buf = _compiled[machine]
    fprog = _SockFprog(len(buf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _LIBC.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompUnavailable(f"prctl(PR_SET_SECCOMP) failed: {errno.errorcode.get(err, err)}")
