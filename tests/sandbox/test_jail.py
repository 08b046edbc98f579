"""The OS boundary, tested as if RestrictedPython had already been broken: every job here is raw Python running in
the jail's runner with full language power. Whatever it tries, it must stay inside."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox import jail, policy, shell

UID = GID = 199_999

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the full jail is built by a root-run sandbox here")


@pytest.fixture
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., tuple[jail.Outcome, Any]]]:
    root = Path(tempfile.mkdtemp(prefix="jail-test-"))
    root.chmod(0o755)
    for sub in ("jail", "runs", "files"):
        (root / sub).mkdir(mode=0o755)
    files = root / "files" / "bot"
    files.mkdir()
    os.chown(files, 0, GID)
    files.chmod(0o2770)

    def go(job: Callable[[], Any], **limits: Any) -> tuple[jail.Outcome, Any]:
        work = root / "runs" / str(time.monotonic_ns())
        work.mkdir(mode=0o700)
        os.chown(work, UID, GID)

        def wrapped(result_fd: int) -> None:
            try:
                value = {"value": job()}
            except BaseException as exc:
                value = {"error": type(exc).__name__, "message": str(exc)}
            os.write(result_fd, json.dumps(value, default=str).encode())

        out = jail.run(wrapped, jail.Paths(root / "jail", work, files), UID, GID, {**policy.DEFAULT_LIMITS, **limits})
        shutil.rmtree(work)
        return out, json.loads(out.result) if out.result else None

    yield go
    shutil.rmtree(root, ignore_errors=True)
    assert not _leftovers(), "a run left processes behind"


def _leftovers(grace: float = 2.0) -> list[psutil.Process]:
    """Processes of the jail's uid still alive after ``grace`` seconds. The kernel tears a dead PID namespace
    down asynchronously: a killed member can still be seen exiting (state D) for a moment after the run."""
    deadline = time.monotonic() + grace
    while True:
        found = [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == UID]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _try(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as exc:
        return type(exc).__name__
    return "ok"


def test_a_run_sees_only_the_jail(run) -> None:
    out, got = run(lambda: {"root": sorted(os.listdir("/usr"))[:3], "uid": os.getuid(), "pid": os.getpid()})
    assert out.exit_code == 0 and got["value"]["uid"] == UID and got["value"]["pid"] == 2


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
    _, got = run(lambda: socket.socket(family, kind).close())
    assert got.get("error") in ("OSError", "PermissionError")


def test_cant_escalate_or_leave_the_namespaces(run) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def job() -> dict[str, Any]:
        return {
            "setuid0": _try(lambda: os.setuid(0)),
            "unshare": libc.unshare(0x10000000),  # CLONE_NEWUSER
            "mount": libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
            "chroot": _try(lambda: os.chroot("/tmp")),
            "ptrace": libc.ptrace(16, 1, 0, 0),  # PTRACE_ATTACH to init
            "kill_init": _try(lambda: os.kill(1, 9)),
            "io_uring": libc.syscall(425, 1, 0),
            "bpf": libc.syscall(321, 0, 0, 0),
        }

    _, got = run(job)
    v = got["value"]
    assert (
        v["setuid0"] == "PermissionError" and v["chroot"] == "PermissionError" and v["kill_init"] == "PermissionError"
    )
    assert v["unshare"] == v["mount"] == v["ptrace"] == v["io_uring"] == v["bpf"] == -1


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
    assert got is None and out.exit_code == 128 + 9 and time.monotonic() - started < 8


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


def test_an_unprivileged_sandbox_confines_runs_in_a_user_namespace(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same jail when the sandbox is not root (as under a systemd User=): a user namespace of its own, every
    capability dropped, and still no host files, no network, no escalation."""
    nobody = 65534
    root = Path(tempfile.mkdtemp(prefix="jail-unpriv-"))
    for sub in ("jail", "runs/w", "files/bot"):
        (root / sub).mkdir(parents=True)
    for path in [root, *root.rglob("*")]:
        os.chown(path, nobody, nobody)
    root.chmod(0o755)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "sandbox process", unprivileged
        try:
            os.setgroups([])
            os.setresgid(nobody, nobody, nobody)
            os.setresuid(nobody, nobody, nobody)

            def job(result_fd: int) -> None:
                import ctypes

                libc = ctypes.CDLL(None, use_errno=True)
                seen = {
                    "caps": jail.effective_capabilities(),
                    "pid": os.getpid(),
                    "shadow": _try(lambda: open("/etc/shadow").read()),  # noqa: SIM115
                    "inet": _try(lambda: socket.socket(socket.AF_INET).close()),
                    "write_usr": _try(lambda: open("/usr/x", "w")),  # noqa: SIM115
                    "files": _try(lambda: open("/files/ok", "w").write("x")),  # noqa: SIM115
                    "unshare": libc.unshare(0x10000000),
                    "mount": libc.mount(b"none", b"/tmp", b"tmpfs", 0, None),
                }
                os.write(result_fd, json.dumps(seen).encode())

            paths = jail.Paths(root / "jail", root / "runs" / "w", root / "files" / "bot")
            out = jail.run(job, paths, 1, 1, dict(policy.DEFAULT_LIMITS))
            os.write(write_fd, out.result or out.stderr)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        raw = pipe.read()
    os.waitpid(pid, 0)
    shutil.rmtree(root, ignore_errors=True)
    seen = json.loads(raw)
    assert seen["caps"] == 0 and seen["pid"] == 2
    assert seen["shadow"] == "FileNotFoundError" and seen["inet"] == "OSError" and seen["write_usr"] == "OSError"
    assert seen["files"] == "ok" and seen["unshare"] == -1 and seen["mount"] == -1


def test_weak_mode_still_drops_identity_and_filters_syscalls(tmp_path: Path) -> None:
    """The development fallback (no namespaces) keeps uid, no-new-privs, rlimits and seccomp."""
    import ctypes

    work = tmp_path / "work"
    work.mkdir()
    os.chown(work, UID, GID)
    tmp_path.chmod(0o755)

    def job(result_fd: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        seen = {"uid": os.getuid(), "nnp": libc.prctl(39, 0, 0, 0, 0), "seccomp": libc.prctl(21, 0, 0, 0, 0),
                "inet": _try(lambda: socket.socket(socket.AF_INET).close())}  # fmt: skip
        os.write(result_fd, json.dumps(seen).encode())

    out = jail.run(job, jail.Paths(tmp_path / "unused", work, None), UID, GID, dict(policy.DEFAULT_LIMITS), weak=True)
    assert json.loads(out.result) == {"uid": UID, "nnp": 1, "seccomp": 2, "inet": "OSError"}
