"""The OS boundary, tested as if RestrictedPython had already been broken: every job here is raw Python running in
the jail's runner with full language power. Whatever it tries, it must stay inside."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import cgroup, jail, jail_child, landlock, policy, shell

import kit

UID, GID = kit.JAIL_UID + 2, kit.JAIL_GID + 2
Run = Callable[..., tuple[jail.Outcome, Any]]


@pytest.fixture(scope="module")
def groups() -> Iterator[cgroup.RunGroups]:
    made = cgroup.RunGroups.create()
    yield made
    made.close()


@pytest.fixture
def jail_root(groups: cgroup.RunGroups) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="jail-test-"))
    root.chmod(0o755)
    for sub in ("jail", "files"):
        (root / sub).mkdir(mode=0o755)
    files = root / "files" / "bot"
    files.mkdir()
    if kit.ROOT_MODE:
        os.chown(files, 0, GID)
    files.chmod(0o2770)
    yield root
    shutil.rmtree(root, ignore_errors=True)
    assert not kit.leftovers(), "a run left processes behind"


def _own_size() -> int:
    return int(Path("/proc/self/status").read_text().split("VmSize:")[1].split()[0]) << 10


def _go(groups: cgroup.RunGroups, root: Path, job: jail.Job, execute: tuple[str, ...], limits: dict) -> jail.Outcome:
    """One run of ``job``. Its runner is a fork of this test process, far larger than the sandbox process whose
    forks production runs are: unless a test sets it, the memory limit leaves room beyond our own size."""
    limits.setdefault(
        "memory_bytes", max(policy.DEFAULT_LIMITS["memory_bytes"], min(_own_size() + (128 << 20), 1 << 30))
    )
    paths = jail.Paths(root / "jail", files=root / "files" / "bot", files_writable=True, execute=execute)
    slot = groups.acquire()
    try:
        return _single_threaded(lambda: jail.run(job, paths, UID, GID, {**policy.DEFAULT_LIMITS, **limits}, group=slot))
    finally:
        groups.release(slot)


def _single_threaded(body: Callable[[], jail.Outcome]) -> jail.Outcome:
    """``body()`` in a fork of this process: jail.run clones only from a single-threaded process (a lane is one),
    and by now pytest's process may hold threads of earlier tests. The outcome comes back pickled."""
    read_end, write_end = os.pipe()
    helper = os.fork()
    if helper == 0:  # pragma: no cover - the helper
        code = 1
        try:
            os.close(read_end)
            data = pickle.dumps(body())
            while data:
                data = data[os.write(write_end, data) :]
            code = 0
        except BaseException:
            traceback.print_exc()  # (pytest shows the helper's stderr with the failure)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(helper, 0)
    assert status == 0 and data, f"the helper running the jail failed (status {status})"
    return pickle.loads(data)


def _reporting(job: Callable[[], Any]) -> jail.Job:
    def wrapped(result_fd: int) -> None:
        try:
            value = {"value": job()}
        except BaseException as exc:
            value = {"error": type(exc).__name__, "message": str(exc)}
        os.write(result_fd, json.dumps(value, default=str).encode())

    return wrapped


@pytest.fixture
def run(groups: cgroup.RunGroups, jail_root: Path) -> Run:
    """Run a raw Python job (RestrictedPython assumed broken) in a full jail with a writable /files; ``execute``
    names the files it may execute (a shell run's program)."""

    def go(job: Callable[[], Any], execute: tuple[str, ...] = (), **limits: Any) -> tuple[jail.Outcome, Any]:
        out = _go(groups, jail_root, _reporting(job), execute, limits)
        return out, json.loads(out.result) if out.result else None

    return go


@pytest.fixture
def run_raw(groups: cgroup.RunGroups, jail_root: Path) -> Callable[..., jail.Outcome]:
    """The job as jail.run gets it (no wrapper catching its exceptions)."""
    return lambda job, **limits: _go(groups, jail_root, job, (), limits)


def _try(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def test_a_run_sees_only_the_jail(run) -> None:
    out, got = run(lambda: {"root": sorted(os.listdir("/usr"))[:3], "uid": os.getuid(), "pid": os.getpid()})
    expected_uid = UID if kit.ROOT_MODE else 0  # unprivileged: uid 0 of the run's own user namespace
    assert out.exit_code == 0 and got["value"]["uid"] == expected_uid and got["value"]["pid"] == 1


@pytest.mark.parametrize(
    "path", ["/etc/shadow", "/root", "/home", "/proc/1/environ", "/proc/self/environ", "/var/log", "/tmp/../root"]
)
def test_cant_read_host_files(run, path: str) -> None:
    _, got = run(lambda: open(path).read())  # noqa: SIM115
    assert "error" in got


def test_cant_read_the_real_passwd_or_the_worker_environment(run) -> None:
    os.environ["BOTWORKER_TEST_SECRET"] = "s3cr3t"
    try:
        _, got = run(lambda: (open("/etc/passwd").read(), dict(os.environ)))  # noqa: SIM115
    finally:
        del os.environ["BOTWORKER_TEST_SECRET"]
    passwd, env = got["value"]
    assert "s3cr3t" not in json.dumps(env) and env == {}
    assert passwd.count("\n") == 2 and "nobody" not in passwd


@pytest.mark.parametrize("path", ["/usr/evil", "/etc/evil", "/evil", "/dev/evil", "/bin/evil"])
def test_cant_write_outside_work_files_and_tmp(run, path: str) -> None:
    _, got = run(lambda: open(path, "w").write("x"))  # noqa: SIM115
    assert "error" in got


def test_can_write_work_files_and_tmp_but_not_execute_there(run) -> None:
    def job() -> Any:
        for d in ("/work", "/files", "/tmp"):
            with open(f"{d}/x.sh", "w") as f:
                f.write("#!/usr/bin/echo\n")
            os.chmod(f"{d}/x.sh", 0o755)
        return _try(lambda: os.execv("/tmp/x.sh", ["x"]))

    _, got = run(job)
    assert got["value"] == "PermissionError"


@pytest.mark.parametrize(
    ("family", "kind"),
    [(socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET6, socket.SOCK_DGRAM), (socket.AF_NETLINK, socket.SOCK_RAW),
     (socket.AF_PACKET, socket.SOCK_RAW)],
)  # fmt: skip
def test_cant_open_network_sockets(run, family: int, kind: int) -> None:
    """Not with socket(), nor with socketpair(), whose family would otherwise reach the kernel's code for it (a
    module such as TIPC could even be loaded for it)."""
    for make in (lambda: socket.socket(family, kind).close(), lambda: socket.socketpair(family, kind)):
        _, got = run(make)
        assert got.get("error") in ("OSError", "PermissionError"), got


def test_cant_escalate_or_leave_the_namespaces(run) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def job() -> dict[str, Any]:
        return {
            # root's pass: uid 0 of the host; the unprivileged pass is uid 0 of its own namespace already, so any
            # other uid (none is mapped, and no capability is left to switch)
            "setuid0": _try(lambda: os.setuid(0 if kit.ROOT_MODE else 1)),
            "unshare": libc.unshare(0x10000000),  # CLONE_NEWUSER
            "mount": libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
            "chroot": _try(lambda: os.chroot("/tmp")),
            "ptrace": libc.ptrace(16, 1, 0, 0),  # PTRACE_ATTACH to pid 1 (the job itself)
            # The job is pid 1 of its namespace: a SIGKILL from inside it is ignored (the run goes on to answer)
            "kill_pid_1": _try(lambda: os.kill(1, 9)),
            "io_uring": libc.syscall(425, 1, 0),
            "bpf": libc.syscall(321, 0, 0, 0),
        }

    _, got = run(job)
    v = got["value"]
    assert (
        v["setuid0"] in ("PermissionError", "OSError") and v["chroot"] == "PermissionError" and v["kill_pid_1"] == "ok"
    )
    assert v["unshare"] == v["mount"] == v["ptrace"] == v["io_uring"] == v["bpf"] == -1


def test_cant_use_system_v_ipc_or_message_queues(run) -> None:
    """Runs get no IPC namespace of their own (the systemd unit allows none to be made), so IPC calls are refused
    outright: nothing one run creates can reach another run, and no IPC object outside reaches a run."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def attempt(call: Callable[[], int]) -> str:
        ctypes.set_errno(0)
        result = call()
        return errno.errorcode.get(ctypes.get_errno(), "?") if result == -1 else f"made {result}"

    def job() -> dict[str, str]:
        return {
            "shmget": attempt(lambda: libc.shmget(0, 4096, 0o1600)),  # IPC_PRIVATE, IPC_CREAT | 0600
            "semget": attempt(lambda: libc.semget(0, 1, 0o1600)),
            "msgget": attempt(lambda: libc.msgget(0, 0o1600)),
            "mq_open": attempt(lambda: libc.mq_open(b"/q", 0o100 | 2, 0o600, None)),  # O_CREAT | O_RDWR
        }

    out, got = run(job)
    assert got is not None and got["value"] == dict.fromkeys(("shmget", "semget", "msgget", "mq_open"), "EPERM"), (
        got,
        out,
    )


def test_cant_fork_bomb(run) -> None:
    def job() -> int:
        children = 0
        for _ in range(1000):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                children += 1
            except OSError:
                break
        return children

    out, got = run(job, wall_seconds=3)
    assert got["value"] < policy.DEFAULT_LIMITS["processes"]
    assert out.killed is None  # the runner returned; its sleeping children died with the namespace


def test_cant_outlive_the_run_with_setsid_children(run) -> None:
    def job() -> str:
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            os._exit(0)
        return "parent done"

    _, got = run(job)
    assert got["value"] == "parent done"  # the fixture then checks that no process of the jail uid is left


def test_cant_loop_past_the_cpu_limit(run) -> None:
    started = time.monotonic()

    def spin() -> None:
        while True:
            pass

    out, got = run(spin, cpu_seconds=1, wall_seconds=10)
    assert got is None and (out.killed == "cpu_time" or out.exit_code == 128 + 9) and time.monotonic() - started < 8


def test_cant_sleep_past_the_deadline(run) -> None:
    started = time.monotonic()
    out, _ = run(lambda: time.sleep(30), wall_seconds=1)
    assert out.killed == "wall_time" and time.monotonic() - started < 5


def test_cant_allocate_past_the_memory_limit(run) -> None:
    _, got = run(lambda: len(bytearray(512 << 20)), memory_bytes=128 << 20)
    assert got["error"] == "MemoryError"


def test_cant_flood_the_output(run) -> None:
    def job() -> str:
        chunk = b"x" * 65536
        for _ in range(200):  # 12.5 MiB
            os.write(1, chunk)
        return "done"

    out, got = run(job, output_bytes=4096)
    assert got["value"] == "done" and len(out.stdout) == 4096 and out.truncated


def test_cant_write_a_file_past_the_size_limit(run) -> None:
    out, got = run(lambda: open("/work/big", "wb").write(b"x" * (2 << 20)), file_bytes=1 << 20)  # noqa: SIM115
    assert got is None or "error" in got
    assert out.exit_code != 0 or got.get("error")


def test_cant_follow_a_planted_symlink_out_of_files(run) -> None:
    from sandbox import files

    def job() -> Any:
        os.symlink("/etc/passwd", "/files/link")
        os.symlink("/usr", "/files/dir")
        return [files.operate("/files", "read", "link"), files.operate("/files", "read", "dir/bin/ls")]

    _, got = run(job)
    assert all(not r["ok"] and "symbolic link" in r["error"] and "content" not in r for r in got["value"])


def test_shell_arguments_stay_single_elements() -> None:
    path, argv = shell.build_argv("echo {{a}} '{{b}}'", {"a": "x; rm -rf / $(id)", "b": "--help"})
    assert path == "/usr/bin/echo" and argv == ["echo", "x; rm -rf / $(id)", "--help"]
    for bad in ("sh -c id", "/usr/bin/echo hi", "{{p}} x", "find / -exec id ;", "env", ""):
        with pytest.raises(shell.ShellRefused):
            shell.build_argv(bad, {"p": "echo"})
    with pytest.raises(shell.ShellRefused):
        shell.build_argv("echo {{a}}", {"a": "x\x00y"})
    with pytest.raises(shell.ShellRefused):
        shell.build_env({"LD_PRELOAD": "/tmp/x.so"})


def test_weak_mode_still_drops_identity_and_filters_syscalls(tmp_path: Path, groups: cgroup.RunGroups) -> None:
    """The development fallback (no namespaces) keeps uid, no-new-privs, rlimits, seccomp, Landlock and the
    run's cgroup."""
    import ctypes

    work = tmp_path / "work"
    work.mkdir()
    if kit.ROOT_MODE:
        os.chown(work, UID, GID)
    tmp_path.chmod(0o755)

    def job(result_fd: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        seen = {"uid": os.getuid(), "nnp": libc.prctl(39, 0, 0, 0, 0), "seccomp": libc.prctl(21, 0, 0, 0, 0),
                "inet": _try(lambda: socket.socket(socket.AF_INET).close()),
                "etc": _try(lambda: open("/etc/hostname").read()),  # noqa: SIM115
                "work": _try(lambda: open("x", "w").close())}  # fmt: skip
        os.write(result_fd, json.dumps(seen).encode())

    slot = groups.acquire()
    try:
        out = jail.run(job, jail.Paths(tmp_path / "unused", work), UID, GID, dict(policy.DEFAULT_LIMITS), True, slot)
    finally:
        groups.release(slot)
    expected_uid = UID if kit.ROOT_MODE else os.getuid()
    assert json.loads(out.result) == {"uid": expected_uid, "nnp": 1, "seccomp": 2, "inet": "OSError",
                                      "etc": "PermissionError", "work": "ok"}, out  # fmt: skip


# ---- what a run may execute (Landlock) -----------------------------------------------------------------------


def _exec(path: str, *args: str) -> str:
    """Fork and exec; "ok" when the program ran (exit 0), else the exception's name or the exit status."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(path, [path, *args])
        except OSError as exc:
            os._exit(100 + (exc.errno or 0))
        os._exit(99)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else "EACCES" if code == 100 + 13 else f"status {code}"


@pytest.mark.skipif(not landlock.abi_version(), reason="this kernel has no Landlock")
def test_cant_execute_anything_but_the_runs_own_program(run: Run) -> None:
    true = shell.executables("/usr/bin/true")
    _, got = run(lambda: [_exec("/usr/bin/true"), _exec("/usr/bin/echo"), _exec("/usr/bin/dash", "-c", "id")],
                       execute=true)  # fmt: skip
    assert got["value"] == ["ok", "EACCES", "EACCES"], got
    # A script or file run executes nothing at all.
    _, got = run(lambda: [_exec("/usr/bin/true"), _exec(true[1], "/usr/bin/true")])
    assert got["value"] == ["EACCES", "EACCES"], got


# ---- one budget for the whole run (its cgroup) ---------------------------------------------------------------


def test_cant_use_more_memory_than_the_run_by_forking(run: Run) -> None:
    # Four sorts of an endless line: each grows its buffer until its own address-space limit (the run's memory)
    # refuses more. Together they would hold several times the run's memory; its cgroup lets them hold that much in
    # all, and the kernel kills the rest.
    def job() -> list[int]:
        children = []
        for _ in range(4):
            pid = os.fork()
            if pid == 0:
                os.execve("/usr/bin/sort", ["sort", "/dev/zero"], {})
            children.append(pid)
        return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]

    # The runner is a fork of this (large) test process: give it room beyond its own address space.
    memory = min(_own_size() + (192 << 20), int(policy.MAX_LIMITS["memory_bytes"]))
    # CPU to spare: the bigger this test process, the longer the sorts take to fill the run's memory (a 2 s budget
    # ran out first when the whole suite had grown the process).
    out, got = run(
        job, execute=shell.executables("/usr/bin/sort"), memory_bytes=memory, wall_seconds=20, cpu_seconds=20
    )
    # The kernel killed processes of the run for the run's limit. (Which ones is its choice: when the runner, whose
    # copy of this test process counts as its size, is among them, the namespace takes the sorts with it.)
    assert out.oom_kills >= 1, (got, out)
    assert got is None or got["value"].count(-9) >= 1, got


def test_cant_use_more_cpu_than_the_run_by_respawning(run: Run) -> None:
    def job() -> None:  # each process has its own 1 s RLIMIT_CPU; dying ones are replaced
        while True:
            pid = os.fork()
            if pid == 0:
                for _ in range(2):
                    if os.fork() == 0:
                        break
                while True:
                    pass
            os.waitpid(pid, 0)

    started = time.monotonic()
    out, _ = run(job, cpu_seconds=1, wall_seconds=8)
    elapsed = time.monotonic() - started
    assert out.killed == "cpu_time" and elapsed < 3, (out, elapsed)  # not the 8 s wall limit
    assert out.cpu_ms is not None and out.cpu_ms < 1100, out


def test_cant_hold_more_processes_than_the_run(run: Run) -> None:
    def job() -> int:
        runner = os.getpid()
        read_end, write_end = os.pipe()
        for _ in range(8):  # a chain: each new process forks the next, so no process holds many children
            try:
                pid = os.fork()
            except OSError:
                break
            if pid:
                os.waitpid(pid, 0)  # the chain stays alive until its deepest member could fork no more
                break
            os.write(write_end, b"x")
        if os.getpid() != runner:
            os._exit(0)
        os.close(write_end)
        return len(os.read(read_end, 64))

    _, got = run(job, processes=4, wall_seconds=5)
    assert got["value"] <= 3, got  # the runner and 3 more, however they are forked


@pytest.mark.parametrize(("where", "limit"), [("/work", "work_bytes"), ("/tmp", "tmp_bytes")])
def test_cant_write_past_the_scratch_space(run: Run, where: str, limit: str) -> None:
    def job() -> list[Any]:
        written, made = 0, 0
        try:
            for n in range(64):
                with open(f"{where}/fill{n}", "wb") as f:
                    f.write(b"x" * (1 << 20))
                written += 1 << 20
        except OSError as exc:
            full = exc.strerror
        try:
            for n in range(policy.TMPFS_INODES + 10):
                open(f"{where}/i{n}", "wb").close()
                made += 1
        except OSError as exc:
            return [written, full, made, exc.strerror]
        return [written, full, made, "no limit"]

    _, got = run(job, **{limit: 4 << 20})
    written, full, made, inodes = got["value"]
    assert written <= 4 << 20 and full == "No space left on device", got
    assert made <= policy.TMPFS_INODES and inodes == "No space left on device", got


# ---- identity -------------------------------------------------------------------------------------------------


def test_cant_keep_any_capability_in_the_bounding_set(run: Run) -> None:
    from sandbox import linux

    _, got = run(lambda: [linux.bounding_set_empty(), linux.effective_capabilities()])
    assert got["value"] == [True, 0], got


def test_cant_make_a_child_return_into_the_sandbox_with_an_unprintable_error(
    run_raw: Callable[..., jail.Outcome],
) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def job(result_fd: int) -> None:
        raise Unprintable()

    out = run_raw(job)
    assert out.exit_code == jail_child.EXIT_SETUP_FAILED and b"could not be formatted" in out.stderr, out


# ---- weak mode (the development fallback) ---------------------------------------------------------------------


@pytest.mark.skipif(not landlock.abi_version(), reason="this kernel has no Landlock")
def test_cant_reach_another_bots_files_in_weak_mode(groups: cgroup.RunGroups) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="weak-files-"))  # traversable by the jail uid: only Landlock stops it
    tmp_path.chmod(0o755)
    work, mine, theirs = tmp_path / "work", tmp_path / "files" / "mine", tmp_path / "files" / "theirs"
    for d in (work, mine, theirs):
        d.mkdir(parents=True)
        d.chmod(0o777)
    (theirs / "secret.txt").write_text("theirs")
    (theirs / "secret.txt").chmod(0o666)

    def job(result_fd: int) -> None:
        seen = [_try(lambda: open(theirs / "secret.txt").read()), _try(lambda: open(mine / "x", "w").close())]  # noqa: SIM115
        os.write(result_fd, json.dumps(seen).encode())

    slot = groups.acquire()
    try:
        paths = jail.Paths(tmp_path / "unused", work, mine, files_writable=True)
        out = jail.run(job, paths, UID, GID, dict(policy.DEFAULT_LIMITS), True, slot)
    finally:
        groups.release(slot)
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert json.loads(out.result) == ["PermissionError", "ok"], out


def test_cant_outlast_the_deadline_by_closing_every_pipe(run_raw: Callable[..., jail.Outcome]) -> None:
    """A run that closed stdout, stderr and its result pipe (nothing left to read) is still killed at its deadline."""

    def job(result_fd: int) -> None:
        for fd in (1, 2, result_fd):
            os.close(fd)
        time.sleep(60)

    started = time.monotonic()
    out = run_raw(job, wall_seconds=1)
    assert out.killed == "wall_time" and time.monotonic() - started < 5, out


def test_runs_sharing_a_lanes_network_namespace_leave_nothing_in_it(groups: cgroup.RunGroups, jail_root: Path) -> None:
    """A lane's runs share its network namespace (``jail.share_namespaces``). What a run could leave there is a unix
    socket: bound to an abstract name, or holding its own descriptors in flight, which keeps it (and the memory
    it carries, charged to the lane's group) alive after the run until the kernel's unix garbage collector next
    runs: a channel to the lane's next run, found by an attack review. Runs can make no socket at all: after a run
    that tried every way, the namespace holds none."""

    def leaver(fd: int) -> None:
        tried = {}
        for name, make in (
            ("unix stream", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)),
            ("unix datagram", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)),
            ("socketpair", lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)),
        ):
            try:
                make()
                tried[name] = "made"
            except OSError as exc:
                tried[name] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        os.write(fd, json.dumps(tried).encode())

    read_end, write_end = os.pipe()
    lane = os.fork()
    if lane == 0:  # pragma: no cover - a lane-like process: its own namespaces, then a run
        try:
            os.close(read_end)
            jail.share_namespaces()
            out = _go(groups, jail_root, leaver, (), {})
            left = Path("/proc/self/net/unix").read_text().splitlines()[1:]  # our (the shared) network namespace
            seen = {"tried": json.loads(out.result or b"null"), "stderr": out.stderr.decode()[-300:], "left": left}
            os.write(write_end, json.dumps(seen).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        got = json.loads(pipe.read() or b"null")
    os.waitpid(lane, 0)
    assert got is not None, "the lane-like process failed"
    assert got["tried"] == {"unix stream": "EAFNOSUPPORT", "unix datagram": "EAFNOSUPPORT", "socketpair": "EPERM"}, got
    assert got["left"] == [], got
