"""One confined run: clone a fresh process in its own cgroup and new namespaces, build a minimal root, drop
everything, run.

One process per run (the sandbox process never runs untrusted code itself)::

    sandbox process ── clone(NEWNS|NEWPID|NEWUTS [|NEWNET|NEWUSER]) ──▶ the run: pid 1 of its new PID
        namespace, born in the run's cgroup. setsid, parent-death signal, stdio and descriptors; (unprivileged: its
        uid and gid maps); builds the jail's root and pivot_root; then rlimits, capabilities and identity,
        no-new-privs, Landlock, seccomp, and the job, which runs in it or execs the program in its place. When
        it exits, the kernel kills every process left in its namespace.

The child is created with ``clone`` and the namespace flags (``linux.fork_into``), so the sandbox process never
enters the run's namespaces. A lane (lanes.py) has a network namespace, and unprivileged a user namespace, of its
own, which its runs share (``share_namespaces``); elsewhere (the start-up probe) a run gets new ones. Being pid 1,
the run reaps its own orphans (or leaves them as zombies until it ends, bounded by RLIMIT_NPROC and the group's
``pids.max``), and signals sent to it from inside its namespace without a handler are ignored (it cannot SIGKILL
itself, which harms nothing).

Every process of the run, and everything it forks, is in the run's cgroup (cgroup.py): memory, processes and CPU
are held for the tree as a whole. The sandbox process watches the wall clock and the group's CPU time; at either
budget it kills the run's pid 1 (SIGKILL, which takes the whole namespace down, including children that called
setsid or forked twice) and its process group, and then every member of the group. It also watches the run's
pid through a pidfd, so a run that closed its output pipes is still held to its deadline. Stdout and stderr of the
run come back on pipes, capped; a script's or file operation's result comes back as JSON on a third pipe. When
the sandbox process is not root, the run is in a user namespace (our uid becomes 0 inside, with every
capability dropped before the job); Linux calls are wrapped in linux.py. The child ends in ``os._exit`` whatever
happens in it: nothing ever unwinds back into the sandbox's own code. What it does is in ``jail_child.py``; this
module creates it and watches the run from outside.

``weak=True`` (the development flag) skips the namespaces and the new root: the child is a plain fork, confined
with its cgroup (when the machine has one), uid, no-new-privs, rlimits, seccomp and Landlock (when the kernel has
it, on host paths), in its work directory. Never for production.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import jail_child
from .cgroup import Slot
from .jail_child import Job, Paths
from .linux import (
    CLONE_NEWNET,
    CLONE_NEWUSER,
    LIBC,
    NAMESPACES,
    PR_SET_DUMPABLE,
    check,
    fork_into,
    prctl,
)
from .policy import (
    RUN_CPU_CORES,
)

# Our host uid and gid when share_namespaces() moved us into the namespaces our runs share (else None)
_shared_by: tuple[int, int] | None = None
MAX_RESULT_BYTES = 1 << 20  # a script's or file operation's JSON result; more is dropped (and then not JSON)


@dataclass
class Outcome:
    """What a run produced, as the sandbox process saw it."""

    exit_code: int | None = None  # the run's exit status; 128 + n when signal n ended it, as shells say
    stdout: bytes = b""
    stderr: bytes = b""
    result: bytes = b""
    truncated: bool = False
    killed: str | None = None  # "wall_time" or "cpu_time" when the sandbox killed it at a budget
    oom_kills: int = 0  # processes the kernel killed for the run's memory limit
    cpu_ms: float | None = None  # CPU time of the whole run (when it had a cgroup)
    duration_ms: int = 0
    layers: dict[str, Any] = field(default_factory=dict)


def run(
    job: Job,
    paths: Paths,
    uid: int,
    gid: int,
    limits: dict[str, Any],
    weak: bool = False,
    group: Slot | None = None,
) -> Outcome:
    """Run ``job`` confined; never raises for anything the job does. Raises JailError only for our own faults."""
    started = time.monotonic()
    if group is not None:
        group.configure(int(limits["memory_bytes"]), int(limits["processes"]))
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    # Only we hold the write end once the child closed its copy: end-of-file there tells the child we died before
    # its parent-death signal was armed.
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    # As the host's root, runs switch to the jail uid; unprivileged, they get a user namespace of their own (a
    # lane's: see share_namespaces), where they are uid 0.
    host_uid = uid if host_root() else None
    if weak:
        flags = 0
    elif _shared_by is not None:
        flags = NAMESPACES & ~CLONE_NEWNET  # the lane's network (and user) namespace
    else:
        flags = NAMESPACES | (0 if host_uid is not None else CLONE_NEWUSER)
    outer = (os.geteuid(), os.getegid()) if flags & CLONE_NEWUSER else None
    try:
        child = fork_into(flags)
    except BaseException:
        for fd in (out_r, out_w, err_r, err_w, res_r, res_w, alive_r, alive_w):
            os.close(fd)
        raise
    if child == 0:  # pragma: no cover - runs in the child
        jail_child.exit_after(
            lambda: jail_child.child(
                job, paths, host_uid, gid, limits, weak, (out_w, err_w, res_w), alive_r, outer, group
            )
        )
    for fd in (out_w, err_w, res_w, alive_r):
        os.close(fd)
    outcome = Outcome()
    try:
        _collect(child, (out_r, err_r, res_r), started, limits, outcome, group)
    finally:
        for fd in (out_r, err_r, res_r, alive_w):
            os.close(fd)
    if group is not None:  # (what a run leaves, a weak one especially, is killed when its group is released)
        outcome.cpu_ms = round(group.cpu_seconds() * 1000, 3)
        outcome.oom_kills = group.oom_kills()
    outcome.duration_ms = int((time.monotonic() - started) * 1000)
    return outcome


def share_namespaces() -> None:
    """For a lane (lanes.py), once at its start, before any run: move this process into a new network namespace
    (holding only a downed loopback) and, when it is not root, a new user namespace whose uid and gid 0 are our
    own; every run it starts then shares those two instead of creating its own (a network namespace costs ≈ 0.8 ms
    of CPU per run to create and tear down). The runs still get their own mount, PID and UTS namespaces and drop
    every capability as before. What the sharing gives a run: the namespaces of the lane's earlier runs, whose
    processes are all gone (a run's pid 1 is reaped only after the kernel killed everything in its PID namespace)
    and which could make no socket (seccomp: a unix socket holding descriptors in flight would outlive its run),
    and of the lane itself, which holds no socket (it talks over pipes). Runs of other lanes, which may run
    concurrently, are in other namespaces. Landlock and seccomp are unchanged. In the lane's user namespace
    RLIMIT_NPROC counts the lane too, so its runs get one process more (jail_child._runner)."""
    global _shared_by
    outer = (os.geteuid(), os.getegid())
    if outer[0] == 0:
        check(LIBC.unshare(CLONE_NEWNET), "unshare(network namespace)")
    else:
        # Our /proc files are root's while we are non-dumpable; dumpable only for the three writes below, before
        # any run exists.
        prctl(PR_SET_DUMPABLE, 1)
        try:
            check(LIBC.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare(user and network namespaces)")
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {outer[0]} 1")
            Path("/proc/self/gid_map").write_text(f"0 {outer[1]} 1")
        finally:
            prctl(PR_SET_DUMPABLE, 0)
    _shared_by = outer


def host_ids() -> tuple[int, int]:
    """Our uid and gid on the host (in a lane's own user namespace, our euid is 0)."""
    return (os.geteuid(), os.getegid()) if _shared_by is None else _shared_by


def host_root() -> bool:
    """Whether this sandbox runs as the host's root."""
    return host_ids()[0] == 0


def _collect(
    child: int, fds: tuple[int, int, int], started: float, limits: dict, o: Outcome, group: Slot | None
) -> None:
    """Read the pipes until every writer is gone and the child has exited, killing the run at the wall-clock or
    CPU budget; reap the child."""
    out_r, err_r, res_r = fds
    deadline = started + float(limits["wall_seconds"])
    cpu_budget = float(limits["cpu_seconds"])
    cap = int(limits["output_bytes"])
    buffers = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray()}
    caps = {out_r: cap, err_r: cap, res_r: MAX_RESULT_BYTES}
    exit_fd = os.pidfd_open(child)  # readable once the child has exited (our unreaped child: its pid stays ours)
    poller = select.poll()
    for fd in (*buffers, exit_fd):
        poller.register(fd, select.POLLIN)
    open_fds = set(buffers)
    exited = False
    # The group cannot use CPU much faster than RUN_CPU_CORES (CFS bandwidth lets it run a little ahead within a
    # period, hence the margin), so its budget cannot run out before this.
    rate = RUN_CPU_CORES * 1.25
    cpu_check = started + cpu_budget / rate if group is not None else float("inf")
    try:
        while open_fds or not exited:
            now = time.monotonic()
            if now >= cpu_check and group is not None:
                left_cpu = cpu_budget - group.cpu_seconds()
                if left_cpu <= 0:
                    o.killed = "cpu_time"
                    break
                cpu_check = now + max(left_cpu / rate, 0.005)
            if now >= deadline:
                o.killed = "wall_time"
                break
            for fd, _ in poller.poll(max(min(deadline, cpu_check) - now, 0) * 1000):
                if fd == exit_fd:
                    exited = True
                    poller.unregister(fd)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                room = caps[fd] - len(buffers[fd])
                if len(chunk) > room:
                    o.truncated = True
                buffers[fd] += chunk[: max(room, 0)]
    finally:
        os.close(exit_fd)
    if o.killed:
        _kill(child)
        if group is not None:
            group.kill()
    _, status = os.waitpid(child, 0)
    code = os.waitstatus_to_exitcode(status)
    o.exit_code = 128 - code if code < 0 else code
    o.stdout, o.stderr, o.result = bytes(buffers[out_r]), bytes(buffers[err_r]), bytes(buffers[res_r])


def _kill(child: int) -> None:
    """Kill the run's pid 1 (which takes its namespace down) and its process group (all of a weak run that did
    not leave it)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child, signal.SIGKILL)
