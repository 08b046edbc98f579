"""Thin ctypes wrappers for the Linux calls the jail needs and Python does not expose (3.11): clone with
namespace flags, mount, unshare, pivot_root, prctl, capabilities. Each failure raises ``JailError`` naming the call
and the errno.
"""

from __future__ import annotations

import ctypes
import errno
import os

LIBC = ctypes.CDLL(None, use_errno=True)
# The same C library, called with the GIL held (ctypes.CDLL releases it around each call): for clone, which must
# run exactly as os.fork runs fork().
_LIBC_GIL = ctypes.PyDLL(None, use_errno=True)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER = 0x20000000, 0x40000000, 0x10000000
# No IPC namespace: a run may make no System V or POSIX message-queue IPC call at all (policy.DENIED_SYSCALLS),
# so the systemd unit need not allow IPC namespaces (RestrictNamespaces=).
NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
PR_CAPBSET_READ, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 23, 24, 28, 47, 4
PR_GET_SECUREBITS = 27
SECURE_ALL_LOCKED_NOROOT = 0x2F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
_CAP_VERSION_3 = 0x20080522
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}
_SIGCHLD = 17


class JailError(Exception):
    """The jail could not be built on this machine."""


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


def fork_into(namespaces: int) -> int:
    """``os.fork()`` whose child starts in new namespaces (``clone(2)`` with ``CLONE_NEW*`` flags; 0 is a plain
    fork, done by ``os.fork`` itself): returns the child's pid (as the caller sees it) in the parent and 0 in the
    child. The caller's own namespaces never change, which is why this is used instead of unshare-then-fork: that
    would leave the caller in the new mount, PID-for-children and UTS namespaces, and an unprivileged caller in a
    user namespace it cannot leave. Python 3.11 has no ``os.clone``, so this does around the raw system call what
    ``os.fork`` does around ``fork()``: the interpreter's before-fork and after-fork steps (import lock, thread
    states, at-fork hooks), with the GIL held throughout.

    The raw call skips glibc's own fork handling, which matters only with other threads: glibc locks malloc's
    arenas across ``fork()`` so that no other thread holds them in the child. This refuses to run in a process
    with more than one thread (the sandbox's lanes have one). glibc's cached thread id in the child stays the
    parent's; the child, like any forked child of the jail, never returns into the caller's code
    (``jail_child.exit_after``), and nothing it runs relies on that cache."""
    if not namespaces:
        return os.fork()
    if len(os.listdir("/proc/self/task")) != 1:
        raise JailError("clone with namespaces needs a single-threaded process; this one has other threads")
    number = _SYS_CLONE[os.uname().machine]
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    # clone(flags, stack, parent_tid, child_tid or tls, tls or child_tid): no new stack, no tid writes; the child
    # continues on a copy-on-write copy of ours, exactly as after fork().
    pid = _LIBC_GIL.syscall(ctypes.c_long(number), ctypes.c_ulong(namespaces | _SIGCHLD), None, None, None, None)
    if pid == 0:
        api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise JailError(f"clone(namespaces): {os.strerror(err)} ({errno.errorcode.get(err, err)})")
    return pid


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(
        LIBC.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def prctl(option: int, arg: int) -> None:
    check(LIBC.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def pivot_root(new_root: str, put_old: str) -> None:
    check(LIBC.syscall(_SYS_PIVOT_ROOT[os.uname().machine], new_root.encode(), put_old.encode()), "pivot_root")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def effective_capabilities() -> int:
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    check(LIBC.capget(ctypes.byref(header), data), "capget")
    return data[0].effective | data[1].effective << 32 | data[0].permitted | data[1].permitted << 32


def lock_capabilities() -> None:
    """Empty the bounding and ambient sets and lock securebits (no capability from uid 0, no setuid fix-up, no
    keep-caps), for good. Needs CAP_SETPCAP, so it comes before any uid change; then ``clear_capabilities``."""
    for cap in range(64):
        if LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            check(-1, f"drop capability {cap} from the bounding set")
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    check(LIBC.prctl(PR_SET_SECUREBITS, SECURE_ALL_LOCKED_NOROOT, 0, 0, 0), "securebits")


def clear_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets."""
    header, data = _CapHeader(_CAP_VERSION_3, 0), (_CapData * 2)()
    check(LIBC.capset(ctypes.byref(header), data), "capset")


def bounding_set_empty() -> bool:
    return all(LIBC.prctl(PR_CAPBSET_READ, cap, 0, 0, 0) != 1 for cap in range(64))


def alive(pid: int) -> bool:
    """Whether a process with this pid exists (a process we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_all_but(*keep: int) -> None:
    """Close every descriptor above 2 except ``keep``."""
    low = 3
    for fd in sorted(k for k in keep if k > 2):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)
