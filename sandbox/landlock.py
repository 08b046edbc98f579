"""Landlock (Linux >= 5.13), a second fence around the file system and the network, applied in every run.

The jail's mount namespace already shows nothing of the host but ``/usr`` (read-only); Landlock then limits what
the run may do even inside that view (jail.py chooses the rules per run): read ``/usr``, ``/etc`` and ``/dev``,
write only where the run may write (``/work`` and ``/tmp``; ``/files`` in file operations), and **execute only the
one program of a shell run and its ELF interpreter** (nothing at all in script and file runs); no TCP bind/connect
(ABI >= 4); no signals or abstract unix sockets outside the run (ABI >= 6). Every file-system right the kernel
knows is handled, so whatever no rule grants is denied. It is an optional layer: ``ruleset`` returns None when the
kernel has no Landlock, and ``enforce`` then does nothing (the run is still confined by the other layers). Standard library only
(ctypes).
"""

from __future__ import annotations

import ctypes
import os
import stat

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same numbers on x86_64 and aarch64
_VERSION_FLAG = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = READ_FILE | READ_DIR
WRITE = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_FIFO | MAKE_SOCK | TRUNCATE
RUN = EXECUTE | READ_FILE  # for a rule on one program file
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # the only rights a rule on a file may carry

_libc = ctypes.CDLL(None, use_errno=True)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI version, 0 when unavailable."""
    version = _libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_VERSION_FLAG))
    return max(int(version), 0)


def ruleset(rules: list[tuple[str, int]]) -> int | None:
    """A ruleset granting ``rules``: (path, rights) pairs, a path being a directory (the rights hold beneath it) or a
    file. Paths that do not exist are skipped. Returns its descriptor, or None when the kernel has no Landlock.
    (Built before the runner gives up its identity, so that it can open paths its new uid could not reach.)"""
    abi = abi_version()
    if abi == 0:
        return None
    handled_fs = _FS_BY_ABI[max(v for v in _FS_BY_ABI if v <= abi)]
    attr = _RulesetAttr(handled_fs, _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0, 0)
    if abi >= 6:
        attr.scoped = _SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for path, access in rules:
            try:
                target = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                is_dir = stat.S_ISDIR(os.fstat(target).st_mode)
                rule = _PathBeneath(access & handled_fs & (~0 if is_dir else FILE_RIGHTS), target)
                if _libc.syscall(_ADD_RULE, fd, _RULE_PATH_BENEATH, ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
            finally:
                os.close(target)
    except BaseException:
        os.close(fd)
        raise
    return fd


def enforce(fd: int | None) -> None:
    """Restrict the calling process (and its future children) to a ruleset; needs no-new-privs set first."""
    if fd is None:
        return
    try:
        if _libc.syscall(_RESTRICT_SELF, fd, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(fd)
