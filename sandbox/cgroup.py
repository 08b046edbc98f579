"""One cgroup per run: the memory, process count and CPU time of a run's whole process tree, and a kill that reaches
every process of it.

rlimits hold one process each; a run that forks holds several. So every run is placed, before it does anything
else, in a group of its own, and the group is what the limits hold:

==============  =========================================  ==================================================
limit           cgroup v2                                  cgroup v1
==============  =========================================  ==================================================
memory_bytes    ``memory.max``, ``memory.swap.max`` = 0     ``memory.limit_in_bytes`` (+ ``memsw``: no swap)
processes       ``pids.max`` = processes + 1 (the sandbox process: see ``Slot``)
cpu_seconds     ``cpu.stat`` usage, polled by the sandbox   ``cpuacct.usage``, polled the same way
                (jail.py kills the run at the budget)
CPU rate        ``cpu.max`` = ``policy.RUN_CPU_CORES``      ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
kill            SIGKILL to every member of the run (the sandbox process excepted) until none is left
==============  =========================================  ==================================================

Where the groups live: under the cgroup the sandbox process starts in (``/proc/self/cgroup``), in each hierarchy
that holds one of ``policy.CGROUP_CONTROLLERS`` (v2 when the unified hierarchy has it, else its v1 hierarchy, plus
v1 ``cpuacct`` for the usage)::

    <own cgroup>/sandbox-<pid>/run-0        the sandbox process lives here; each run's processes are born here
                                            (no migration per run) and are killed and waited for after it; the
                                            group is reused (one made and removed per run would leave a "dying"
                                            memory cgroup behind for as long as its page cache lives)

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

from . import cgroupfs
from .cgroupfs import CgroupUnavailable, Hierarchy, find_hierarchies, remove_tree
from .linux import alive
from .policy import RUN_CPU_CORES

PERIOD_US = 100_000  # CPU bandwidth period
PROCESS_LEAF = "service"  # v2: where the processes of a delegated group go so that its children get controllers
_PREFIX = "sandbox-"


@dataclass
class Slot:
    """The group of one run at a time: configure, enter (from the run's first process), watch, kill.

    A *home* slot holds the sandbox process itself: a run's first process is then in the group from its fork on,
    and no run ever migrates. (Migrating a process takes the cgroup core's thread-group lock for writing, which
    waits for an RCU grace period: measured here, 8-30 ms for one run in ten.) The sandbox is one more member
    (``pids.max`` counts it); its own CPU and memory while a run goes on count too, and are small."""

    dirs: list[tuple[Hierarchy, str]]
    home: bool = False
    procs_fds: list[int] = field(default_factory=list)
    _written: dict[str, str] = field(default_factory=dict)
    _absent: set[str] = field(default_factory=set)  # optional files this kernel does not have (no swap accounting)
    _cpu_base: int = 0
    _oom_base: int = 0

    def __post_init__(self) -> None:
        for _, directory in self.dirs if not self.home else ():
            self.procs_fds.append(os.open(f"{directory}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        _, memory = self._dir("memory")
        for name in ("memory.swap.max", "memory.memsw.limit_in_bytes"):
            if not os.path.exists(f"{memory}/{name}"):
                self._absent.add(f"{memory}/{name}")

    def _dir(self, controller: str) -> tuple[int, str]:
        for hierarchy, directory in self.dirs:
            if controller in hierarchy.controllers:
                return hierarchy.version, directory
        raise CgroupUnavailable(f"no {controller} controller")  # find_hierarchies made sure there is one

    def _set(self, path: str, value: str) -> None:
        if self._written.get(path) != value and path not in self._absent:
            cgroupfs.write(path, value)
            self._written[path] = value

    def configure(self, memory_bytes: int, processes: int) -> None:
        """Set this run's limits (written only when they differ from the last run's) and note the counters."""
        version, memory = self._dir("memory")
        if version == 2:
            self._set(f"{memory}/memory.max", str(memory_bytes))
            self._set(f"{memory}/memory.swap.max", "0")
        else:
            limit, memsw = f"{memory}/memory.limit_in_bytes", f"{memory}/memory.memsw.limit_in_bytes"
            # memsw (memory + swap) may never be below the memory limit: lower the limit first, raise memsw first.
            current = int(cgroupfs.read(limit))
            for path in [limit, memsw] if memory_bytes < current else [memsw, limit]:
                self._set(path, str(memory_bytes))
        version, pids = self._dir("pids")
        self._set(f"{pids}/pids.max", str(processes + self.home))  # (+ us)
        version, cpu = self._dir("cpu")
        quota = int(RUN_CPU_CORES * PERIOD_US)
        if version == 2:
            self._set(f"{cpu}/cpu.max", f"{quota} {PERIOD_US}")
        else:
            self._set(f"{cpu}/cpu.cfs_period_us", str(PERIOD_US))
            self._set(f"{cpu}/cpu.cfs_quota_us", str(quota))
        self._cpu_base = self._cpu_total()
        self._oom_base = self._oom_total()

    def relax(self) -> None:
        """Between runs, lift the memory and process limits of a home slot: the sandbox process, alone in it then,
        reads the next request (frames of up to 8 MiB) under no run's budget."""
        version, memory = self._dir("memory")
        if version == 2:
            self._set(f"{memory}/memory.max", "max")
        else:
            self._set(f"{memory}/memory.memsw.limit_in_bytes", "-1")  # first: never below the memory limit
            self._set(f"{memory}/memory.limit_in_bytes", "-1")
        _, pids = self._dir("pids")
        self._set(f"{pids}/pids.max", "max")

    def enter(self) -> None:
        """Move the calling process into the group (the run's first process calls this right after its fork;
        nothing to do in a home slot, where it was born in the group)."""
        for fd in self.procs_fds:
            os.write(fd, b"0")

    def _cpu_total(self) -> int:
        version, cpu = self._dir("cpu")
        if version == 2:
            return cgroupfs.keyed(f"{cpu}/cpu.stat", "usage_usec") * 1000
        _, acct = self._dir("cpuacct")
        return int(cgroupfs.read(f"{acct}/cpuacct.usage"))

    def _oom_total(self) -> int:
        version, memory = self._dir("memory")
        return cgroupfs.keyed(f"{memory}/memory.events" if version == 2 else f"{memory}/memory.oom_control", "oom_kill")

    def cpu_seconds(self) -> float:
        """CPU time used by the run's processes so far."""
        return (self._cpu_total() - self._cpu_base) / 1e9

    def oom_kills(self) -> int:
        """Processes of the run the kernel killed for the group's memory limit."""
        return self._oom_total() - self._oom_base

    def members(self) -> list[int]:
        """The run's processes in the group (the sandbox itself not counted)."""
        return [pid for pid in cgroupfs.members(self.dirs[0][1]) if pid != os.getpid()]

    def kill(self) -> None:
        """SIGKILL every process of the run (cgroup.kill where the kernel has it and the group is not home)."""
        for hierarchy, directory in self.dirs if not self.home else ():
            if hierarchy.version == 2 and os.path.exists(f"{directory}/cgroup.kill"):
                with contextlib.suppress(OSError):
                    cgroupfs.write(f"{directory}/cgroup.kill", "1")
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

    def close(self) -> None:
        for fd in self.procs_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.procs_fds.clear()


class RunGroups:
    """The groups of one sandbox process: ``<own cgroup>/sandbox-<pid>/run-<n>`` in each hierarchy.

    ``home=True`` (the sandbox process): one slot, run-0, which the process moves into once, at start. Otherwise
    (tests that call jail.run in-process) slots are made as needed and each run's first process enters its own."""

    _made = 0

    def __init__(self, hierarchies: list[Hierarchy], home: bool = False) -> None:
        self.hierarchies = hierarchies
        versions = {h.version for h in hierarchies}
        self.version = "v2" if versions == {2} else "v1" if versions == {1} else "v1+v2"
        RunGroups._made += 1  # a second set in one process (tests) gets a name of its own: sandbox-<pid>.<n>
        name = f"{_PREFIX}{os.getpid()}" + (f".{RunGroups._made - 1}" if RunGroups._made > 1 else "")
        self.parents = [f"{h.base}/{name}" for h in hierarchies]
        self.origins = [h.base for h in hierarchies]  # where this process was (to go back there at close)
        self.home: Slot | None = None
        self._free: list[Slot] = []
        self._dirty: list[Slot] = []
        self._count = 0

    @classmethod
    def create(cls, home: bool = False) -> RunGroups:
        """Find the hierarchies, sweep what dead sandboxes left, and make this process's parent groups (and, with
        ``home``, its run group, with this process in it)."""
        try:
            found = find_hierarchies(cgroupfs.read("/proc/self/mountinfo"), cgroupfs.read("/proc/self/cgroup"))
        except OSError as exc:
            raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from None
        groups = cls(found, home)
        for hierarchy in found:
            _sweep(hierarchy.base)
        try:
            for n, (hierarchy, parent) in enumerate(zip(found, groups.parents, strict=True)):
                if hierarchy.version == 2 and _enable(hierarchy.base, hierarchy.controllers, move_processes=True):
                    groups.origins[n] = f"{hierarchy.base}/{PROCESS_LEAF}"
                if os.path.isdir(parent):  # left by an earlier process that had our pid
                    remove_tree(parent)
                os.mkdir(parent, 0o755)
                if hierarchy.version == 2:
                    _enable(parent, hierarchy.controllers, move_processes=False)
            if home:
                groups.home = groups._new_slot(home=True)
                join([directory for _, directory in groups.home.dirs])
        except OSError as exc:
            groups.close()
            hint = " (under systemd: Delegate=yes in the unit)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
            raise CgroupUnavailable(f"cannot create run cgroups: {exc}{hint}") from None
        return groups

    def move_home(self, name: str) -> None:
        """For a lane (a process forked from the sandbox process to hold runs of its own): a home group
        ``<parent>/<name>`` (reused when a lane that died left it), with no limit until a run sets them, and the
        calling process in it. The group it leaves stays the sandbox process's."""
        dirs = [(h, f"{p}/{name}") for h, p in zip(self.hierarchies, self.parents, strict=True)]
        for _, directory in dirs:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o755)
        slot = Slot(dirs, home=True)
        slot.relax()  # (a dead lane's last run may have left its limits)
        join([directory for _, directory in dirs])
        self.home = slot

    def _new_slot(self, home: bool = False) -> Slot:
        directories = [(h, f"{p}/run-{self._count}") for h, p in zip(self.hierarchies, self.parents, strict=True)]
        self._count += 1
        for _, directory in directories:
            os.mkdir(directory, 0o755)
        return Slot(directories, home)

    def acquire(self) -> Slot:
        """A group with no process of an earlier run in it, for the next run."""
        if self.home is not None:
            if not self.home.drain(2.0):
                raise CgroupUnavailable("processes of an earlier run cannot be removed from the run group")
            return self.home
        for slot in list(self._dirty):  # a group that could not be emptied earlier may be empty by now
            if not slot.members():
                self._dirty.remove(slot)
                self._free.append(slot)
        return self._free.pop() if self._free else self._new_slot()

    def release(self, slot: Slot) -> None:
        """After a run: kill what is left of it; a group that cannot be emptied is set aside (home: retried at the
        next acquire). Leftover page cache charged to a group stays until the kernel reclaims it."""
        emptied = slot.drain(2.0)
        if slot.home:
            slot.relax()
            return
        (self._free if emptied else self._dirty).append(slot)

    def close(self) -> None:
        if self.home is not None:
            with contextlib.suppress(OSError):
                join(self.origins)  # back where we came from, so the groups can go
            self.home = None
        for slot in self._free + self._dirty:
            slot.close()
        self._free.clear()
        self._dirty.clear()
        for parent in self.parents:
            if os.path.isdir(parent):
                remove_tree(parent)


def delegate(name: str, uid: int, gid: int) -> list[str]:
    """As root: a group ``<our cgroup>/<name>`` in every hierarchy the sandbox uses, owned by ``uid`` the way
    systemd's ``Delegate=yes`` hands a service its cgroup (the directory and its ``cgroup.procs``, ``tasks``,
    ``cgroup.subtree_control``, ``cgroup.threads``). A process that joins them (``join``) and then drops to that
    uid can run an unprivileged sandbox with run cgroups. For the tests' and benchmarks' unprivileged passes."""
    hierarchies = find_hierarchies(cgroupfs.read("/proc/self/mountinfo"), cgroupfs.read("/proc/self/cgroup"))
    made = []
    for hierarchy in hierarchies:
        group = f"{hierarchy.base}/{name}"
        os.mkdir(group, 0o755)
        made.append(group)
        for entry in ("", "cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"):
            path = f"{group}/{entry}" if entry else group
            if os.path.exists(path):
                os.chown(path, uid, gid)
        if hierarchy.version == 2:
            with contextlib.suppress(OSError):  # (systemd may have done it; EBUSY if our own group holds processes)
                _enable(hierarchy.base, hierarchy.controllers, move_processes=False)
    return made


def join(groups: list[str]) -> None:
    """Move the calling process into ``groups``."""
    for group in groups:
        cgroupfs.write(f"{group}/cgroup.procs", "0")


def _enable(directory: str, controllers: frozenset[str], move_processes: bool) -> bool:
    """Hand ``controllers`` to the children of a v2 group. True when its processes had to move to its leaf."""
    wanted = " ".join(f"+{c}" for c in sorted(controllers))
    try:
        cgroupfs.write(f"{directory}/cgroup.subtree_control", wanted)
        return False
    except OSError as exc:
        if exc.errno != errno.EBUSY or not move_processes:
            raise
    # "No internal processes": the group's own processes (this one included) move to a leaf first.
    leaf = f"{directory}/{PROCESS_LEAF}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    for _ in range(50):
        members = cgroupfs.members(directory)
        if not members:
            break
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                cgroupfs.write(f"{leaf}/cgroup.procs", str(pid))
    cgroupfs.write(f"{directory}/cgroup.subtree_control", wanted)
    return True


def _sweep(base: str) -> None:
    """Remove the groups of sandbox processes that are gone."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(base):
            pid = entry.name[len(_PREFIX) :].split(".")[0]
            if entry.name.startswith(_PREFIX) and pid.isdigit() and not alive(int(pid)):
                remove_tree(entry.path)
