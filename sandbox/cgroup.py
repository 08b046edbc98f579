"""One cgroup per run: the memory, process count and CPU time of a run's whole process tree, and a kill that reaches
every process of it.

rlimits hold one process each; a run that forks holds several. So every run is placed, before it does anything
else, in a group of its own, and the group is what the limits hold:

==============  =========================================  ==================================================
limit           cgroup v2                                  cgroup v1
==============  =========================================  ==================================================
memory_bytes    ``memory.max``, ``memory.swap.max`` = 0     ``memory.limit_in_bytes`` (+ ``memsw``: no swap)
processes       ``pids.max`` = processes + 2 (the jail's keeper and init)
cpu_seconds     ``cpu.stat`` usage, polled by the sandbox   ``cpuacct.usage``, polled the same way
                (jail.py kills the run at the budget)
CPU rate        ``cpu.max`` = ``policy.RUN_CPU_CORES``      ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
kill            ``cgroup.kill``, else SIGKILL to every      SIGKILL to every member until none is left
                member until none is left
==============  =========================================  ==================================================

Where the groups live: under the cgroup the sandbox process starts in (``/proc/self/cgroup``), in each hierarchy
that holds one of ``policy.CGROUP_CONTROLLERS`` (v2 when the unified hierarchy has it, else its v1 hierarchy, plus
v1 ``cpuacct`` for the usage)::

    <own cgroup>/sandbox-<pid>/run-<n>      one per run slot of this sandbox process, emptied and reset between
                                            runs and reused (a group made and removed per run would leave a
                                            "dying" memory cgroup behind for as long as its page cache lives)

Under systemd the service needs ``Delegate=yes`` so that its (unprivileged) user may create groups there. On v2 a
group that holds processes cannot hand controllers to its children ("no internal processes"): when enabling them
fails with EBUSY, the sandbox first moves every process of its own group into ``<own cgroup>/service`` (the
supervisor and workers included; a service cgroup delegated to us holds nothing else). Groups left by a sandbox
process that died are swept at start-up. Nothing here is reachable from inside a run: the jail mounts no cgroup
file system and seccomp refuses new cgroup namespaces.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass, field

from .policy import CGROUP_CONTROLLERS, RUN_CPU_CORES

PERIOD_US = 100_000  # CPU bandwidth period
PROCESS_LEAF = "service"  # v2: where the processes of a delegated group go so that its children get controllers
_PREFIX = "sandbox-"


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
            available = set(_read(f"{base}/cgroup.controllers").split())
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


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(path: str, key: str) -> int:
    """A value from a flat keyed file (memory.events, cpu.stat, memory.oom_control): 0 when absent."""
    with contextlib.suppress(OSError):
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def _members(directory: str) -> list[int]:
    try:
        return [int(p) for p in _read(f"{directory}/cgroup.procs").split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_tree(directory: str) -> None:
    """Kill whatever is left in a group tree and remove it, deepest first (errors ignored: swept again later)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False):
                remove_tree(entry.path)
    for pid in _members(directory):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while True:
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


@dataclass
class Slot:
    """The group of one run at a time: configure, enter (from the run's first process), watch, kill, reset."""

    dirs: list[tuple[Hierarchy, str]]
    procs_fds: list[int] = field(default_factory=list)
    _written: dict[str, str] = field(default_factory=dict)
    _cpu_base: int = 0
    _oom_base: int = 0

    def __post_init__(self) -> None:
        for _, directory in self.dirs:
            self.procs_fds.append(os.open(f"{directory}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))

    def _dir(self, controller: str) -> tuple[int, str]:
        for hierarchy, directory in self.dirs:
            if controller in hierarchy.controllers:
                return hierarchy.version, directory
        raise CgroupUnavailable(f"no {controller} controller")  # find_hierarchies made sure there is one

    def _set(self, path: str, value: str) -> None:
        if self._written.get(path) != value:
            _write(path, value)
            self._written[path] = value

    def configure(self, memory_bytes: int, processes: int) -> None:
        """Set this run's limits (written only when they differ from the last run's) and note the counters."""
        version, memory = self._dir("memory")
        if version == 2:
            self._set(f"{memory}/memory.max", str(memory_bytes))
            if os.path.exists(f"{memory}/memory.swap.max"):
                self._set(f"{memory}/memory.swap.max", "0")
        else:
            limit, memsw = f"{memory}/memory.limit_in_bytes", f"{memory}/memory.memsw.limit_in_bytes"
            # memsw (memory + swap) may never be below the memory limit: lower the limit first, raise memsw first.
            current = int(self._written.get(limit) or _read(limit))
            for path in [limit, memsw] if memory_bytes < current else [memsw, limit]:
                if path == limit or os.path.exists(memsw):
                    self._set(path, str(memory_bytes))
        version, pids = self._dir("pids")
        self._set(f"{pids}/pids.max", str(processes + 2))
        version, cpu = self._dir("cpu")
        quota = int(RUN_CPU_CORES * PERIOD_US)
        if version == 2:
            self._set(f"{cpu}/cpu.max", f"{quota} {PERIOD_US}")
        else:
            self._set(f"{cpu}/cpu.cfs_period_us", str(PERIOD_US))
            self._set(f"{cpu}/cpu.cfs_quota_us", str(quota))
        self._cpu_base = self._cpu_total()
        self._oom_base = self._oom_total()

    def enter(self) -> None:
        """Move the calling process into the group (the run's first process calls this right after its fork)."""
        for fd in self.procs_fds:
            os.write(fd, b"0")

    def _cpu_total(self) -> int:
        version, cpu = self._dir("cpu")
        if version == 2:
            return _keyed(f"{cpu}/cpu.stat", "usage_usec") * 1000
        _, acct = self._dir("cpuacct")
        return int(_read(f"{acct}/cpuacct.usage"))

    def _oom_total(self) -> int:
        version, memory = self._dir("memory")
        return _keyed(f"{memory}/memory.events" if version == 2 else f"{memory}/memory.oom_control", "oom_kill")

    def cpu_seconds(self) -> float:
        """CPU time used by the run's processes so far."""
        return (self._cpu_total() - self._cpu_base) / 1e9

    def oom_kills(self) -> int:
        """Processes of the run the kernel killed for the group's memory limit."""
        return self._oom_total() - self._oom_base

    def members(self) -> list[int]:
        return _members(self.dirs[0][1])

    def kill(self) -> None:
        """SIGKILL every process of the group (cgroup.kill where the kernel has it)."""
        for hierarchy, directory in self.dirs:
            if hierarchy.version == 2 and os.path.exists(f"{directory}/cgroup.kill"):
                with contextlib.suppress(OSError):
                    _write(f"{directory}/cgroup.kill", "1")
                return
        for _ in range(100):  # a member may fork while we kill its siblings; pids.max bounds how often
            members = self.members()
            if not members:
                return
            for pid in members:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)

    def drain(self, timeout: float) -> bool:
        """Wait until no process is left in the group (killed ones take a moment to go). False on timeout."""
        deadline = time.monotonic() + timeout
        while self.members():
            if time.monotonic() > deadline:
                return False
            self.kill()
            time.sleep(0.002)
        return True

    def reset(self) -> None:
        """Between runs, in an empty group: give back the memory still charged to it (page cache, v1)."""
        version, memory = self._dir("memory")
        if version == 1:
            with contextlib.suppress(OSError):
                _write(f"{memory}/memory.force_empty", "0")
        elif os.path.exists(f"{memory}/memory.reclaim"):
            with contextlib.suppress(OSError):  # EAGAIN when less than asked could be reclaimed: fine
                _write(f"{memory}/memory.reclaim", str(1 << 30))

    def close(self) -> None:
        for fd in self.procs_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.procs_fds.clear()


class RunGroups:
    """The groups of one sandbox process: ``<own cgroup>/sandbox-<pid>/run-<n>`` in each hierarchy."""

    _made = 0

    def __init__(self, hierarchies: list[Hierarchy]) -> None:
        self.hierarchies = hierarchies
        self.version = (
            "v2"
            if all(h.version == 2 for h in hierarchies)
            else "v1"
            if all(h.version == 1 for h in hierarchies)
            else "v1+v2"
        )
        RunGroups._made += 1  # a second set in one process (tests) gets a name of its own: sandbox-<pid>.<n>
        name = f"{_PREFIX}{os.getpid()}" + (f".{RunGroups._made - 1}" if RunGroups._made > 1 else "")
        self.parents = [f"{h.base}/{name}" for h in hierarchies]
        self._free: list[Slot] = []
        self._dirty: list[Slot] = []
        self._count = 0

    @classmethod
    def create(cls) -> RunGroups:
        """Find the hierarchies, sweep what dead sandboxes left, and make this process's parent groups."""
        try:
            found = find_hierarchies(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"))
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from None
        groups = cls(found)
        for hierarchy in found:
            _sweep(hierarchy.base)
        try:
            for hierarchy, parent in zip(found, groups.parents, strict=True):
                if hierarchy.version == 2:
                    _enable(hierarchy.base, hierarchy.controllers, move_processes=True)
                if os.path.isdir(parent):  # left by an earlier process that had our pid
                    remove_tree(parent)
                os.mkdir(parent, 0o755)
                if hierarchy.version == 2:
                    _enable(parent, hierarchy.controllers, move_processes=False)
        except OSError as exc:
            groups.close()
            hint = " (under systemd: Delegate=yes in the unit)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
            raise CgroupUnavailable(f"cannot create run cgroups: {exc}{hint}") from None
        return groups

    def acquire(self) -> Slot:
        """A clean group for the next run."""
        for slot in list(self._dirty):  # a group that could not be emptied earlier may be empty by now
            if not slot.members():
                self._dirty.remove(slot)
                slot.reset()
                self._free.append(slot)
        if self._free:
            return self._free.pop()
        directories = [(h, f"{p}/run-{self._count}") for h, p in zip(self.hierarchies, self.parents, strict=True)]
        self._count += 1
        for _, directory in directories:
            os.mkdir(directory, 0o755)
        return Slot(directories)

    def release(self, slot: Slot) -> None:
        """After a run: an empty group is reset and reused; one still holding processes is set aside."""
        if slot.drain(2.0):
            slot.reset()
            self._free.append(slot)
        else:
            self._dirty.append(slot)

    def close(self) -> None:
        for slot in self._free + self._dirty:
            slot.close()
        self._free.clear()
        self._dirty.clear()
        for parent in self.parents:
            if os.path.isdir(parent):
                remove_tree(parent)


def _enable(directory: str, controllers: frozenset[str], move_processes: bool) -> None:
    """Hand ``controllers`` to the children of a v2 group."""
    wanted = " ".join(f"+{c}" for c in sorted(controllers))
    try:
        _write(f"{directory}/cgroup.subtree_control", wanted)
        return
    except OSError as exc:
        if exc.errno != errno.EBUSY or not move_processes:
            raise
    # "No internal processes": the group's own processes (this one included) move to a leaf first.
    leaf = f"{directory}/{PROCESS_LEAF}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    for _ in range(50):
        members = _members(directory)
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                _write(f"{leaf}/cgroup.procs", str(pid))
    _write(f"{directory}/cgroup.subtree_control", wanted)


def _sweep(base: str) -> None:
    """Remove the groups of sandbox processes that are gone."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            pid = entry.name[len(_PREFIX) :].split(".")[0]
            if entry.name.startswith(_PREFIX) and pid.isdigit() and not _alive(int(pid)):
                remove_tree(entry.path)
