"""One confined run: fork a fresh process tree in new namespaces, build a minimal root, drop everything, run.

Process tree of one run (the sandbox process never runs untrusted code itself)::

    sandbox process ── fork ──▶ keeper: setsid, unshare(NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS), reports init's pid,
                                │       waits for it and exits with its status
                                └─ fork ──▶ init (pid 1 of the new PID namespace): builds the jail's root,
                                            pivot_root, then reaps; when the runner exits, init exits and the
                                            kernel kills every process left in the namespace
                                            └─ fork ──▶ runner (pid 2): rlimits, setgroups/setgid/setuid to the
                                                        jail uid, no-new-privs, Landlock, seccomp, then the job

The sandbox process kills init and the keeper's process group (SIGKILL) at the wall-clock deadline: that takes the
whole namespace down, including children that called setsid or double-forked. Stdout and stderr of the runner
come back on pipes, capped; a script's or file operation's result comes back as JSON on a third pipe. When the
sandbox process is not root, the keeper also unshares a user namespace (our uid becomes 0 inside, with every
capability dropped in the runner); Linux calls are wrapped in linux.py.

``weak=True`` (the development flag) skips the namespaces and the new root: the runner is forked directly and
confined with uid, no-new-privs, rlimits and seccomp only, in its work directory. Never for production.
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import landlock, seccomp
from .linux import (
    CLONE_NEWUSER,
    LIBC,
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    NAMESPACES,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    JailError,
    check,
    close_all_but,
    drop_capabilities,
    effective_capabilities,
    mount,
    pivot_root,
    prctl,
)
from .policy import DEVICES, ETC_FILES, FILES_DIR, HIDDEN_PATHS, HOSTNAME, READ_ONLY_BINDS, SYMLINKS, WORK_DIR

EXIT_SETUP_FAILED = 125  # the jail could not be built; the reason is on the runner's stderr
MAX_RESULT_BYTES = 1 << 20  # a script's or file operation's JSON result; more is dropped (and then not JSON)
Job = Callable[[int], None]  # runs inside the jail with the result pipe's fd; returns or execs


@dataclass(frozen=True)
class Paths:
    """Host directories of one run."""

    root: Path  # an empty directory, the mount point of the jail's root tmpfs
    work: Path  # this run's writable work directory (mounted at /work)
    files: Path | None  # the bot's file directory (mounted at /files), if any


@dataclass
class Outcome:
    """What a run produced, as the sandbox process saw it."""

    exit_code: int | None = None  # the runner's exit status, or -signal
    stdout: bytes = b""
    stderr: bytes = b""
    result: bytes = b""
    truncated: bool = False
    killed: str | None = None  # "wall_time" when the deadline passed
    duration_ms: int = 0
    layers: dict[str, Any] = field(default_factory=dict)


def run(job: Job, paths: Paths, uid: int, gid: int, limits: dict[str, Any], weak: bool = False) -> Outcome:
    """Run ``job`` confined; never raises for anything the job does. Raises JailError only for our own faults."""
    started = time.monotonic()
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    sandbox_pid = os.getpid()
    keeper = os.fork()
    if keeper == 0:  # pragma: no cover - runs in the child
        # As the host's root, runs switch to the jail uid; unprivileged, they enter a user namespace of their own.
        host_uid = uid if os.geteuid() == 0 else None
        _child(job, paths, host_uid, gid, limits, weak, (out_w, err_w, res_w, pid_w), sandbox_pid)
    for fd in (out_w, err_w, res_w, pid_w):
        os.close(fd)
    outcome = Outcome()
    try:
        _collect(keeper, pid_r, out_r, err_r, res_r, started + float(limits["wall_seconds"]), limits, outcome)
    finally:
        for fd in (out_r, err_r, res_r, pid_r):
            os.close(fd)
    outcome.duration_ms = int((time.monotonic() - started) * 1000)
    return outcome


def _collect(
    keeper: int, pid_r: int, out_r: int, err_r: int, res_r: int, deadline: float, limits: dict, o: Outcome
) -> None:
    """Read the pipes until every writer is gone, killing the tree at the deadline; then reap the keeper."""
    cap = int(limits["output_bytes"])
    buffers = {out_r: bytearray(), err_r: bytearray(), res_r: bytearray(), pid_r: bytearray()}
    caps = {out_r: cap, err_r: cap, res_r: MAX_RESULT_BYTES, pid_r: 32}
    poller = select.poll()
    for fd in buffers:
        poller.register(fd, select.POLLIN)
    open_fds = set(buffers)
    victim = keeper
    while open_fds:
        left = deadline - time.monotonic()
        if left <= 0:
            o.killed = "wall_time"
            _kill(_victim(buffers[pid_r], keeper), keeper)
            break
        for fd, _ in poller.poll(min(left, 1.0) * 1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                open_fds.discard(fd)
                continue
            room = caps[fd] - len(buffers[fd])
            if len(chunk) > room:
                o.truncated = True
            buffers[fd] += chunk[: max(room, 0)]
        victim = _victim(buffers[pid_r], keeper)
    if o.killed:
        _kill(victim, keeper)
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


# ---- inside the child processes -------------------------------------------------------------------------------


def _child(
    job: Job,
    paths: Paths,
    uid: int | None,
    gid: int,
    limits: dict,
    weak: bool,
    fds: tuple[int, int, int, int],
    sandbox_pid: int,
) -> None:
    """The keeper. Never returns."""
    _, err_w, _, pid_w = fds
    code = EXIT_SETUP_FAILED
    try:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != sandbox_pid:
            os._exit(code)  # the sandbox process died before the parent-death signal was armed
        # Nothing of the sandbox process's wiring stays open here: not its protocol pipes, not anything else.
        devnull = os.open("/dev/null", os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(err_w, 2)  # setup errors go to the run's stderr
        close_all_but(*fds)
        if weak:
            _runner(job, paths, uid, gid, limits, weak, fds)
        outer_uid, outer_gid = os.geteuid(), os.getegid()
        check(LIBC.unshare(NAMESPACES | (0 if uid is not None else CLONE_NEWUSER)), "unshare(namespaces)")
        if uid is None:
            # Our own uid and gid become 0 inside: capabilities over the new namespaces only, none on the host.
            # (The sandbox process is non-dumpable, which would make our own /proc files root's: undo that here;
            # the runner sets it again before any untrusted code.)
            prctl(PR_SET_DUMPABLE, 1)
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {outer_uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {outer_gid} 1")
        # init must not outlive us: it arms its parent-death signal, then checks this pipe, whose write end only
        # we hold: end-of-file means we died before the signal was armed.
        alive_r, alive_w = os.pipe()
        init = os.fork()
        if init == 0:
            os.close(alive_w)
            _init(job, paths, uid, gid, limits, fds, alive_r)
        os.close(alive_r)
        os.write(pid_w, str(init).encode())
        _, status = os.waitpid(init, 0)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
    except BaseException as exc:
        _report(f"sandbox setup failed: {exc}")
    os._exit(code)


def _init(
    job: Job, paths: Paths, uid: int | None, gid: int, limits: dict, fds: tuple[int, int, int, int], alive: int
) -> None:
    """pid 1 of the run's namespaces: build the root, start the runner, reap until it is gone. Never returns."""
    code = EXIT_SETUP_FAILED
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.set_blocking(alive, False)
        try:
            if os.read(alive, 1) == b"":
                os._exit(code)  # the keeper died before our parent-death signal was armed
        except BlockingIOError:
            pass  # the keeper is alive (and from now on its death kills us)
        os.close(alive)
        _build_root(paths, uid, gid, limits)
        check(LIBC.sethostname(HOSTNAME.encode(), len(HOSTNAME)), "sethostname")
        runner = os.fork()
        if runner == 0:
            _runner(job, paths, uid, gid, limits, False, fds)
        for fd in fds:
            os.close(fd)
        while True:  # reap orphans until the runner itself is gone
            pid, status = os.wait()
            if pid == runner:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
                break
    except BaseException as exc:
        _report(f"sandbox setup failed: {exc}")
    os._exit(code)  # the namespace dies with its init: every leftover process is killed


def _build_root(paths: Paths, uid: int | None, gid: int, limits: dict) -> None:
    """A tmpfs root holding only what policy.py lists, then pivot_root into it and drop the host's root."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    root = str(paths.root)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for host in READ_ONLY_BINDS:
        target = root + host
        os.makedirs(target)
        mount(host, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for hidden in HIDDEN_PATHS:
        mount("tmpfs", root + hidden, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    for name, to in SYMLINKS.items():
        os.symlink(to, f"{root}/{name}")
    os.makedirs(f"{root}/etc")
    for name, content in ETC_FILES.items():
        Path(f"{root}/etc/{name}").write_text(
            content.format(uid=0 if uid is None else uid, gid=0 if uid is None else gid)
        )
    os.makedirs(f"{root}/dev")
    for dev in DEVICES:
        Path(root + dev).touch()
        mount(dev, root + dev, None, MS_BIND)
        mount(None, root + dev, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
    data_flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    binds = [(str(paths.work), WORK_DIR)] + ([(str(paths.files), FILES_DIR)] if paths.files else [])
    for host, inside in binds:
        os.makedirs(root + inside)
        mount(host, root + inside, None, MS_BIND)
        mount(None, root + inside, None, MS_REMOUNT | MS_BIND | data_flags)
    os.makedirs(f"{root}/tmp")
    mount("tmpfs", f"{root}/tmp", "tmpfs", data_flags, f"size={int(limits['tmp_bytes'])},mode=1777")
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # pivot_root(".", "."): the old root ends up stacked on the new one; detaching it leaves only the jail.
    os.chdir(root)
    pivot_root(".", ".")
    check(LIBC.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def _runner(
    job: Job, paths: Paths, uid: int, gid: int, limits: dict, weak: bool, fds: tuple[int, int, int, int]
) -> None:
    """The process that runs the job: fds, limits, identity, no-new-privs, Landlock, seccomp. Never returns."""
    out_w, err_w, res_w, _ = fds
    code = EXIT_SETUP_FAILED
    try:
        devnull = os.open("/dev/null", os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.set_inheritable(res_w, False)
        close_all_but(res_w)
        os.chdir(str(paths.work) if weak else WORK_DIR)
        os.environ.clear()  # the job sees no environment; programs get theirs explicitly from shell.build_env
        _set_limits(limits)
        if uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
            if 0 in os.getresuid():
                raise JailError("still root after setresuid")
        else:
            # The sandbox itself is unprivileged: inside the jail we are uid 0 of our own user namespace (the host
            # sees the worker's uid); empty every capability set so that uid 0 grants nothing even there.
            drop_capabilities()
        if effective_capabilities() != 0:
            raise JailError("capabilities remain after dropping privileges")
        prctl(PR_SET_DUMPABLE, 0)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if not weak:
            # /dev holds only the bind-mounted devices of policy.DEVICES, on a read-only root: nothing to create.
            landlock.restrict(writable=(WORK_DIR, FILES_DIR, "/tmp", "/dev"), readable=("/etc",))
        seccomp.install()
        os.umask(0o007)
        job(res_w)
        code = 0
    except BaseException as exc:
        _report(f"{'sandbox setup failed' if code == EXIT_SETUP_FAILED else 'run failed'}: {exc}")
    os._exit(code)


def _set_limits(limits: dict) -> None:
    for which, key in (
        (resource.RLIMIT_CPU, "cpu_seconds"),
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_NPROC, "processes"),
        (resource.RLIMIT_FSIZE, "file_bytes"),
        (resource.RLIMIT_NOFILE, "open_files"),
    ):
        value = int(limits[key])
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _report(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode("utf-8", "replace"))
