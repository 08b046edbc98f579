"""One confined run: fork a fresh process tree in its own cgroup and new namespaces, build a minimal root, drop
everything, run.

Process tree of one run (the sandbox process never runs untrusted code itself)::

    sandbox process ── fork ──▶ keeper: joins the run's cgroup, setsid, unshare(NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS),
                                │       reports init's pid, waits for it and exits with its status
                                └─ fork ──▶ init (pid 1 of the new PID namespace): builds the jail's root,
                                            pivot_root, then reaps; when the runner exits, init exits and the
                                            kernel kills every process left in the namespace
                                            └─ fork ──▶ runner (pid 2): rlimits, capabilities and identity,
                                                        no-new-privs, Landlock, seccomp, then the job

Every process of the run, and everything it forks, is in the run's cgroup (cgroup.py): memory, processes and CPU
are held for the tree as a whole. The sandbox process watches the wall clock and the group's CPU time; at either
budget it kills init and the keeper's process group (SIGKILL), which takes the whole namespace down, including
children that called setsid or forked twice, and then every member of the group. Stdout and stderr of the runner
come back on pipes, capped; a script's or file operation's result comes back as JSON on a third pipe. When the
sandbox process is not root, the keeper also unshares a user namespace (our uid becomes 0 inside, with every
capability dropped in the runner); Linux calls are wrapped in linux.py. Each child process ends in ``os._exit``
whatever happens in it: nothing ever unwinds back into the sandbox's own code in a forked child. What the
children do is in ``jail_child.py``; this module forks the keeper and watches the run from outside.

``weak=True`` (the development flag) skips the namespaces and the new root: the runner is forked directly and
confined with its cgroup (when the machine has one), uid, no-new-privs, rlimits, seccomp and Landlock (when the
kernel has it, on host paths), in its work directory. Never for production.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from . import jail_child
from .cgroup import Slot
from .jail_child import Job, Paths
from .policy import (
    RUN_CPU_CORES,
)

MAX_RESULT_BYTES = 1 << 20  # a script's or file operation's JSON result; more is dropped (and then not JSON)


@dataclass
class Outcome:
    """What a run produced, as the sandbox process saw it."""

    exit_code: int | None = None  # the runner's exit status, or -signal
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
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    sandbox_pid = os.getpid()
    keeper = os.fork()
    if keeper == 0:  # pragma: no cover - runs in the child
        # As the host's root, runs switch to the jail uid; unprivileged, they enter a user namespace of their own.
        host_uid = uid if os.geteuid() == 0 else None
        jail_child.exit_after(
            lambda: jail_child.keeper(
                job, paths, host_uid, gid, limits, weak, (out_w, err_w, res_w, pid_w), sandbox_pid, group
            )
        )
    for fd in (out_w, err_w, res_w, pid_w):
        os.close(fd)
    outcome = Outcome()
    try:
        _collect(keeper, (pid_r, out_r, err_r, res_r), started, limits, outcome, group)
    finally:
        for fd in (out_r, err_r, res_r, pid_r):
            os.close(fd)
    if group is not None:  # (what a run leaves, a weak one especially, is killed when its group is released)
        outcome.cpu_ms = round(group.cpu_seconds() * 1000, 3)
        outcome.oom_kills = group.oom_kills()
    outcome.duration_ms = int((time.monotonic() - started) * 1000)
    return outcome


def _collect(
    keeper: int, fds: tuple[int, int, int, int], started: float, limits: dict, o: Outcome, group: Slot | None
) -> None:
    """Read the pipes until every writer is gone, killing the tree at the wall-clock or CPU budget; reap the keeper."""
    pid_r, out_r, err_r, res_r = fds
    deadline = started + float(limits["wall_seconds"])
    cpu_budget = float(limits["cpu_seconds"])
    cap = int(limits["output_bytes"])
    buffers = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray(), pid_r: bytearray()}
    caps = {out_r: cap, err_r: cap, res_r: MAX_RESULT_BYTES, pid_r: 32}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    open_fds = set(buffers)
    # The group cannot use CPU much faster than RUN_CPU_CORES (CFS bandwidth lets it run a little ahead within a
    # period, hence the margin), so its budget cannot run out before this.
    rate = RUN_CPU_CORES * 1.25
    cpu_check = started + cpu_budget / rate if group is not None else float("inf")
    while open_fds:
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
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            room = caps[fd] - len(buffers[fd])
            if len(chunk) > room:
                o.truncated = True
            buffers[fd] += chunk[: max(room, 0)]
    if o.killed:
        _kill(_victim(buffers[pid_r], keeper), keeper)
        if group is not None:
            group.kill()
    _, status = os.waitpid(keeper, 0)
    o.exit_code = os.waitstatus_to_exitcode(status)
    o.stdout, o.stderr, o.result = bytes(buffers[out_r]), bytes(buffers[err_r]), bytes(buffers[res_r])


def _victim(pid_bytes: bytearray, keeper: int) -> int:
    """The process whose death ends the run: the namespace's init once the keeper reported it."""
    text = pid_bytes.decode(errors="replace").strip()
    return int(text) if text.isdigit() else keeper


def _kill(pid: int, group: int) -> None:
    """Kill the namespace's init (which takes the namespace down) and the keeper's process group: init is in it
    from its fork until the end, so even an init not yet armed with its parent-death signal dies here."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
