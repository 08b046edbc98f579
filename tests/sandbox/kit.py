"""What the sandbox tests share: which of the two modes this pass runs in, and the processes runs left behind.

Every test here runs twice (``./dev test``, as CI does): once as root, where the sandbox gives each worker a jail
uid of its own, and once as an unprivileged user in a delegated cgroup, where each run gets a user namespace of its
own, the way the systemd unit (``User=botworker``) runs it. ``service_user.py`` starts that second pass.
Expectations that differ between the modes (the uid a run has, who owns a file it wrote) read ``ROOT_MODE``.

A run's processes, whatever they do, stay in the run's cgroup (``sandbox-<pid>/run-<n>``, where the sandbox
process <pid> lives too): a process left behind by a run is found there, in both modes, rather than by its uid
(which, unprivileged, is our own).
"""

from __future__ import annotations

import os
import re
import time

ROOT_MODE = os.geteuid() == 0
MODE = "root" if ROOT_MODE else "unprivileged"
JAIL_UID = JAIL_GID = 150_000  # the uid/gid root-mode runs get (unused in unprivileged mode)
_RUN_GROUP = re.compile(r":/(?:.*/)?sandbox-(\d+)(?:\.\d+)?/(run|lane)-\d+$", re.MULTILINE)


def run_processes() -> list[int]:
    """Processes that are in some sandbox's run group right now: not the sandbox process itself, which lives in
    its run group, nor its lanes (children of it, each living in a ``lane-<n>`` group of its own), nor zombies:
    one runs nothing, and a run orphaned when a test killed its sandbox is reaped by the host's init, which on
    some machines (a container's) reaps nobody."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cgroup") as f:
                group = _RUN_GROUP.search(f.read())
            if not group or group.group(1) == entry:
                continue
            if group.group(2) == "lane" and parent(int(entry)) == int(group.group(1)):
                continue
            found.append(int(entry))
        except OSError:
            continue  # gone meanwhile
    return found


def parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rfind(")") + 2 :].split()[1])


def leftovers(grace: float = 3.0) -> list[int]:
    """Run processes still alive after ``grace`` seconds (a killed namespace takes a moment to go)."""
    deadline = time.monotonic() + grace
    while (found := run_processes()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def jail_identity() -> tuple[int, int]:
    """The uid and gid a run has inside the jail (the jail's /etc/passwd says the same)."""
    return (JAIL_UID, JAIL_GID) if ROOT_MODE else (0, 0)


def host_owner() -> int:
    """The host uid that owns what a run writes."""
    return JAIL_UID if ROOT_MODE else os.getuid()
