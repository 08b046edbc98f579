"""Inside one run: what its one process does to confine itself before the job (``jail.py`` creates it, watches
the run from outside and says how the run is laid out). Every function here runs in that child of the sandbox
process and ends it through ``exit_after``: nothing unwinds back into the sandbox's code."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import landlock, seccomp
from .cgroup import Slot
from .linux import (
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
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    JailError,
    check,
    clear_capabilities,
    close_all_but,
    effective_capabilities,
    lock_capabilities,
    mount,
    pivot_root,
    prctl,
)
from .policy import (
    DEVICES,
    ETC_FILES,
    FILES_DIR,
    HIDDEN_PATHS,
    HOSTNAME,
    READ_ONLY_BINDS,
    SYMLINKS,
    TMPFS_INODES,
    WORK_DIR,
)

EXIT_SETUP_FAILED = 125  # the jail could not be built; the reason is on the runner's stderr
Job = Callable[[int], None]  # runs inside the jail with the result pipe's fd; returns or execs


@dataclass(frozen=True)
class Paths:
    """What one run gets of the host: its root's mount point, the bot's files, and (weak mode only) a work dir."""

    root: Path  # an empty directory, the mount point of the jail's root tmpfs
    work: Path | None = None  # weak mode: the run's work directory on the host (else /work is a tmpfs of its own)
    files: Path | None = None  # the bot's file directory (mounted at /files), if any
    files_writable: bool = False  # only file operations write /files
    execute: tuple[str, ...] = ()  # the only files the run may execute (Landlock): a shell run's program


def exit_after(body: Callable[[], int]) -> None:
    """Run a forked child's body and leave through ``os._exit`` whatever happens: an exception (even one whose
    message cannot be formatted) never unwinds into the code the child was forked from."""
    code = EXIT_SETUP_FAILED
    try:
        code = body()
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            _report(f"sandbox setup failed: {_describe(exc)}")
    finally:
        os._exit(code)


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except BaseException:
        return f"{type(exc).__name__} (its message could not be formatted)"


def child(
    job: Job,
    paths: Paths,
    uid: int | None,
    gid: int,
    limits: dict,
    weak: bool,
    fds: tuple[int, int, int],
    alive: int,
    outer: tuple[int, int] | None,
    group: Slot | None,
) -> int:
    """The run's process, from its first instruction to the job: pid 1 of its new namespaces (a plain child in
    weak mode). ``uid`` is the host uid to run as (root sandbox) or None (unprivileged: uid 0 of a user namespace,
    its lane's or, when ``outer`` is given, a new one of its own, where ``outer``, the sandbox's uid and gid,
    becomes 0)."""
    os.dup2(fds[1], 2)  # setup errors go to the run's stderr
    if uid is None:
        # The sandbox process is non-dumpable, which makes our own /proc files root's; undo that here (the runner
        # part sets it again before any untrusted code) so that we can write them: oom_score_adj just below, and,
        # in a user namespace, the uid and gid maps.
        prctl(PR_SET_DUMPABLE, 1)
    if group is not None:
        group.enter()  # (a no-op when born in it) everything the run does from here on counts against its group
        group.close()
        # When the run's memory runs out, the kernel kills the largest process of the group: any of the run's,
        # never the sandbox process that shares the group (see cgroup.Slot).
        Path("/proc/self/oom_score_adj").write_text("1000")
    os.setsid()
    # Nothing of the sandbox process's wiring stays open here: not its protocol pipes, not anything else.
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    close_all_but(*fds, alive)  # (our copy of the alive pipe's write end goes here)
    os.set_blocking(alive, False)
    if not _die_with_parent(alive):
        return EXIT_SETUP_FAILED
    if weak:
        return _runner(job, paths, uid, gid, limits, weak, fds, alive)
    if outer is not None:
        # Our own uid and gid become 0 inside: capabilities over the new namespaces only, none on the host.
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {outer[0]} 1")
        Path("/proc/self/gid_map").write_text(f"0 {outer[1]} 1")
    _build_root(paths, uid, gid, limits)
    check(LIBC.sethostname(HOSTNAME.encode(), len(HOSTNAME)), "sethostname")
    # In the lane's user namespace (unprivileged, outer unset), RLIMIT_NPROC counts the lane too: it is uid 0 there.
    lane_counts = uid is None and outer is None
    return _runner(job, paths, uid, gid, limits, False, fds, alive, lane_counts)


def _die_with_parent(alive: int) -> bool:
    """Arm the parent-death signal, then make sure the parent (the sandbox process) did not die before: only it
    holds the alive pipe's write end, so end-of-file there means it is gone and the signal will never come."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        return os.read(alive, 1) != b""
    except BlockingIOError:
        return True  # alive (and from now on its death kills us)


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
    owner = "" if uid is None else f",uid={uid},gid={gid}"
    for inside, size, mode in ((WORK_DIR, limits["work_bytes"], "0700"), ("/tmp", limits["tmp_bytes"], "1777")):
        os.makedirs(root + inside)
        options = f"size={int(size)},nr_inodes={TMPFS_INODES},mode={mode}{owner if inside == WORK_DIR else ''}"
        mount("tmpfs", root + inside, "tmpfs", data_flags, options)
    if paths.files is not None:
        os.makedirs(root + FILES_DIR)
        mount(str(paths.files), root + FILES_DIR, None, MS_BIND)
        readonly = 0 if paths.files_writable else MS_RDONLY
        mount(None, root + FILES_DIR, None, MS_REMOUNT | MS_BIND | data_flags | readonly)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # pivot_root(".", "."): the old root ends up stacked on the new one; detaching it leaves only the jail.
    os.chdir(root)
    pivot_root(".", ".")
    check(LIBC.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


def _runner(
    job: Job,
    paths: Paths,
    uid: int | None,
    gid: int,
    limits: dict,
    weak: bool,
    fds: tuple[int, int, int],
    alive: int,
    lane_counts: bool = False,
) -> int:
    """The last steps before the job: fds, limits, identity, no-new-privs, Landlock, seccomp. ``lane_counts``: one
    more process of our uid (the lane) counts against RLIMIT_NPROC, so the run gets one more."""
    out_w, err_w, res_w = fds
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.set_inheritable(res_w, False)
    close_all_but(res_w, alive)
    os.chdir(str(paths.work) if weak else WORK_DIR)
    os.environ.clear()  # the job sees no environment; programs get theirs explicitly from shell.build_env
    _set_limits(limits, 1 if lane_counts else 0)
    rules = landlock.ruleset(_landlock_rules(paths, weak))  # enforced below, once no-new-privs is set
    # No capability, ever again: bounding and ambient sets emptied and securebits locked while we may still (as
    # root, or as uid 0 of our own user namespace), then the uid (as root) and the remaining sets.
    if uid is not None or effective_capabilities() != 0:  # (an unprivileged weak run has none to give up)
        lock_capabilities()
    if uid is not None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if 0 in os.getresuid():
            raise JailError("still root after setresuid")
        # A change of uid clears the parent-death signal: arm it again (and check the parent once more).
        if not _die_with_parent(alive):
            return EXIT_SETUP_FAILED
    os.close(alive)
    clear_capabilities()
    if effective_capabilities() != 0:
        raise JailError("capabilities remain after dropping privileges")
    prctl(PR_SET_DUMPABLE, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    landlock.enforce(rules)
    seccomp.install()
    os.umask(0o007)
    job(res_w)  # an exception here ends the run through _exit_after, with its reason on stderr
    return 0


def _landlock_rules(paths: Paths, weak: bool) -> list[tuple[str, int]]:
    """What this run may touch, inside the jail (or, in weak mode, on the host): read the system, write its
    scratch space, write /files only in file operations, execute only its own program."""
    files_access = landlock.READ | (landlock.WRITE if paths.files_writable else 0)
    if weak:  # host paths: the system read-only, the run's own directories, nothing else of the host
        rules = [("/usr", landlock.READ), (str(paths.work), landlock.READ | landlock.WRITE)]
        rules += [(dev, landlock.READ_FILE | landlock.WRITE_FILE) for dev in DEVICES]
        if paths.files is not None:
            rules.append((str(paths.files), files_access))
    else:
        # /dev holds only the bind-mounted devices of policy.DEVICES, on a read-only root: nothing to create.
        rules = [("/usr", landlock.READ), ("/etc", landlock.READ), ("/dev", landlock.READ | landlock.WRITE)]
        rules += [(WORK_DIR, landlock.READ | landlock.WRITE), ("/tmp", landlock.READ | landlock.WRITE)]
        if paths.files is not None:
            rules.append((FILES_DIR, files_access))
    return rules + [(path, landlock.RUN) for path in paths.execute]


def _set_limits(limits: dict, others_of_our_uid: int = 0) -> None:
    for which, key in (
        (resource.RLIMIT_CPU, "cpu_seconds"),
        (resource.RLIMIT_AS, "memory_bytes"),
        (resource.RLIMIT_NPROC, "processes"),
        (resource.RLIMIT_FSIZE, "file_bytes"),
        (resource.RLIMIT_NOFILE, "open_files"),
    ):
        value = int(limits[key]) + (others_of_our_uid if which == resource.RLIMIT_NPROC else 0)
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _report(text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode("utf-8", "replace"))
