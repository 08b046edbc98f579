"""Where this process's cgroup hierarchies are (read from /proc/self/mountinfo and /proc/self/cgroup), and the
small file operations on cgroup directories that ``cgroup.py`` builds runs' groups with. Nothing here decides a
limit."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass

from .policy import CGROUP_CONTROLLERS


class CgroupUnavailable(Exception):
    """This machine (or this user) cannot give runs a cgroup of their own; the message says why and what to do."""


@dataclass(frozen=True)
class Hierarchy:
    version: int  # 1 or 2
    base: str  # our own cgroup's directory in this hierarchy
    controllers: frozenset[str]  # the ones we use here (v1 may also hold "cpuacct")


def find_hierarchies(mountinfo: str, proc_cgroup: str) -> list[Hierarchy]:
    """Where each needed controller lives for this process (pure: the text of /proc/self/mountinfo and
    /proc/self/cgroup in, the hierarchies out). Raises CgroupUnavailable naming what is missing."""
    own_v1: dict[str, str] = {}
    own_v2 = None
    for line in proc_cgroup.splitlines():
        number, names, path = line.split(":", 2)
        if number == "0" and names == "":
            own_v2 = path
        for name in names.split(","):
            own_v1[name] = path
    mounts_v1: dict[frozenset[str], tuple[str, str]] = {}
    mount_v2 = None
    for line in mountinfo.splitlines():
        fields = line.split()
        sep = fields.index("-")
        root, point, fstype, options = fields[3], _unescape(fields[4]), fields[sep + 1], fields[sep + 3]
        if fstype == "cgroup2" and mount_v2 is None:
            mount_v2 = (root, point)
        elif fstype == "cgroup":
            names = frozenset(o for o in options.split(",") if o in (*CGROUP_CONTROLLERS, "cpuacct"))
            if names and names not in mounts_v1:
                mounts_v1[names] = (root, point)
    wanted = set(CGROUP_CONTROLLERS) | ({"cpuacct"} if any("cpu" in n for n in mounts_v1) else set())
    found: list[Hierarchy] = []
    for names, (root, point) in mounts_v1.items():
        path = own_v1.get(next(iter(names)))
        if path is not None and names & wanted:
            found.append(Hierarchy(1, _join(point, root, path), names & wanted))
            wanted -= names
    if wanted - {"cpuacct"} and mount_v2 is not None and own_v2 is not None:
        base = _join(mount_v2[1], mount_v2[0], own_v2)
        try:
            available = set(read(f"{base}/cgroup.controllers").split())
        except OSError:
            available = set()
        here = frozenset((wanted - {"cpuacct"}) & available)
        if here:
            found.append(Hierarchy(2, base, here))
            wanted -= here | {"cpuacct"}  # v2 reports usage in cpu.stat
    if wanted:
        raise CgroupUnavailable(f"no cgroup hierarchy gives the {', '.join(sorted(wanted))} controller(s) here")
    return found


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _join(point: str, root: str, own: str) -> str:
    """The directory of cgroup ``own`` in a hierarchy mounted at ``point`` whose mount shows ``root``."""
    if root != "/" and not (own == root or own.startswith(root + "/")):
        raise CgroupUnavailable(f"our cgroup {own} is outside the mounted part {root} of the hierarchy at {point}")
    rel = own[len(root) :] if root != "/" else own
    return point.rstrip("/") + "/" + rel.strip("/") if rel.strip("/") else point.rstrip("/")


def write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def keyed(path: str, key: str) -> int:
    """A value from a flat keyed file (memory.events, cpu.stat, memory.oom_control): 0 when absent."""
    with contextlib.suppress(OSError):
        for line in read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def members(directory: str) -> list[int]:
    try:
        return [int(p) for p in read(f"{directory}/cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def remove_tree(directory: str) -> None:
    """Kill whatever is left in a group tree and remove it, deepest first (errors ignored: swept again later)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False):
                remove_tree(entry.path)
    for pid in members(directory):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                return  # not ours to remove, or still busy: the next sweep tries again
            time.sleep(0.01)  # killed members take a moment to leave
