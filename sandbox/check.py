"""``python -m sandbox check``: which confinement layers hold on this machine, tried from inside real runs.

    python -m sandbox check [--root DIR] [--uid UID] [--gid GID] [--allow-weak] [--json]
    botworker sandbox-check          (the same, with the worker's settings: SANDBOX_ROOT, SANDBOX_UID...)

It starts a sandbox process exactly as a worker does (``SandboxClient``) and asks it for a ``check``: the sandbox
runs each probe below as a job inside a run confined like every tool run (same namespaces, identity, Landlock,
seccomp, cgroup), with limits set low on purpose, and reports what the job could and could not do. Operators run
it on their VM (under the service's user, or through ``botworker sandbox-check``); reviewers read its output.
Exit status 0 when every required layer holds, 1 when one does not, 2 when no sandbox could be started.

=================  ===========================================================================================
probe              what the job tries, and what holding means
=================  ===========================================================================================
namespaces         pid 1 of a new PID namespace, the jail's hostname, no host directory visible
identity           its uid and groups (a uid of its own as root; uid 0 of its own user namespace otherwise)
capabilities       none effective or permitted, an empty bounding set, securebits locked
no_new_privs       set
seccomp            filter mode; ``unshare(CLONE_NEWUSER)`` and an ``AF_INET`` socket refused
landlock           the ABI; as a shell run allowed ``/usr/bin/true`` only: ``true`` runs, ``echo`` is refused;
                   as a script run: ``true`` is refused too
cgroup memory      four processes touch 30 MiB each under a 64 MiB run: the kernel kills some of them
cgroup pids        forks until refused under ``processes`` = 4
cgroup cpu         three processes spin under a 1 s CPU budget (each also has a 1 s RLIMIT_CPU): the run is
                   stopped near 1 s of CPU in all, not 3
disk /work, /tmp   writes past 1 MiB fail with ENOSPC; files past ``policy.TMPFS_INODES`` too
disk file size     one file past ``file_bytes`` fails with EFBIG
disk /files        read-only in a shell run
=================  ===========================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import jail, landlock, linux, policy, shell

if TYPE_CHECKING:
    from .__main__ import Server

MiB = 1 << 20
_CHECK_SCOPE = "sandbox-check"  # a scratch /files directory, removed afterwards
_CHILD_MEMORY = 30 * MiB


# ---- the jobs (run inside the jail; everything they use is imported already) --------------------------------


def _reporting(probe: Callable[[], dict[str, Any]]) -> Callable[[int], None]:
    def job(result_fd: int) -> None:
        try:
            seen = probe()
        except BaseException as exc:
            seen = {"error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(seen).encode()
        while data:
            data = data[os.write(result_fd, data) :]

    return job


def _errno_of(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


def _identity() -> dict[str, Any]:
    libc = ctypes.CDLL(None, use_errno=True)
    unshare = libc.unshare(0x10000000)  # CLONE_NEWUSER
    unshare_errno = errno.errorcode.get(ctypes.get_errno(), "?") if unshare != 0 else "ok"
    return {
        "pid": os.getpid(),
        "hostname": os.uname().nodename,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "caps": linux.effective_capabilities(),
        "bounding_empty": linux.bounding_set_empty(),
        "securebits": libc.prctl(linux.PR_GET_SECUREBITS, 0, 0, 0, 0),
        "nnp": libc.prctl(39, 0, 0, 0, 0),
        "seccomp": libc.prctl(21, 0, 0, 0, 0),
        "unshare": unshare_errno,
        "inet": _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
        "host_visible": [p for p in ("/proc/1", "/root", "/home", "/var", "/sys", "/boot") if os.path.exists(p)],
        "landlock": _errno_of(lambda: os.listdir("/")) == "EACCES",
    }


def _exec_status(path: str) -> str:
    """Fork, exec ``path`` with no arguments, and say how it went ("ok" or the errno of execve)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.execve(path, [path], {})
        except OSError as exc:
            os.write(write_end, errno.errorcode.get(exc.errno or 0, "?").encode())
        os._exit(127)
    os.close(write_end)
    said = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    return said or "ok"


def _exec_probe() -> dict[str, Any]:
    return {"true": _exec_status("/usr/bin/true"), "echo": _exec_status("/usr/bin/echo")}


def _memory_probe() -> dict[str, Any]:
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            held = b"\x01" * _CHILD_MEMORY  # every page written
            time.sleep(1.0)  # all four hold theirs at once
            os._exit(0 if held else 1)
        children.append(pid)
    outcomes = []
    for pid in children:
        _, status = os.waitpid(pid, 0)
        outcomes.append(os.waitstatus_to_exitcode(status))
    return {"survivors": outcomes.count(0), "killed": sum(1 for c in outcomes if c == -signal.SIGKILL)}


def _pids_probe() -> dict[str, Any]:
    forked = 0
    for _ in range(64):
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        forked += 1
    return {"forked": forked}


def _cpu_probe() -> dict[str, Any]:
    for _ in range(2):
        if os.fork() == 0:
            break
    while True:
        pass


def _disk_probe() -> dict[str, Any]:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal when a file outgrows file_bytes

    def fill(path: str, file_size: int = 4 * MiB) -> tuple[int, str]:
        """Write files of ``file_size`` bytes named path.0, path.1... until 4 MiB in all or an error."""
        written, chunk = 0, b"x" * 65536
        try:
            for n in range(4 * MiB // file_size):
                with open(f"{path}.{n}", "wb", buffering=0) as f:
                    for _ in range(file_size // len(chunk)):
                        written += f.write(chunk)
        except OSError as exc:
            return written, errno.errorcode.get(exc.errno or 0, "?")
        return written, "ok"

    def inodes(directory: str) -> tuple[int, str]:
        made = 0
        try:
            for n in range(policy.TMPFS_INODES + 100):
                with open(f"{directory}/{n}", "wb"):
                    made += 1
        except OSError as exc:
            return made, errno.errorcode.get(exc.errno or 0, "?")
        return made, "ok"

    work, tmp = fill("/work/fill", MiB // 8), fill("/tmp/fill", MiB // 8)  # files below file_bytes: the size stops
    for directory in ("/work", "/tmp"):
        for name in os.listdir(directory):
            os.unlink(f"{directory}/{name}")
    os.mkdir("/tmp/many")
    big = fill("/tmp/big")  # one file: file_bytes is below the /tmp size, so RLIMIT_FSIZE stops it first
    return {"work": work, "tmp": tmp, "inodes": inodes("/tmp/many"), "file": big,
            "files_dir": _errno_of(lambda: open("/files/written-by-a-shell-run", "wb").close())}  # fmt: skip


# ---- the battery (in the sandbox process) -----------------------------------------------------------------


def run_battery(server: Server) -> dict[str, Any]:
    """Run every probe through ``server`` as a confined run and judge it. Never raises."""
    results: list[dict[str, Any]] = []

    def verdict(name: str, required: bool, ok: bool, detail: str) -> None:
        results.append({"layer": name, "required": required, "ok": bool(ok), "detail": detail})

    def probe(job: Callable[[], dict[str, Any]], **kwargs: Any) -> tuple[dict[str, Any], Any]:
        limits = {**policy.DEFAULT_LIMITS, **kwargs.pop("limits", {})}
        out = server._run(_reporting(job), limits, **kwargs)
        try:
            seen = json.loads(out.result)
        except ValueError:
            tail = out.stderr.decode(errors="replace").strip().splitlines()
            seen = {"error": (tail[-1] if tail else f"the run ended with status {out.exit_code}")[:300]}
        return seen, out

    try:
        _identity_checks(server, probe(_identity)[0], verdict)
        _landlock_checks(server, probe, verdict)
        _cgroup_checks(server, probe, verdict)
        _disk_checks(server, probe, verdict)
    except Exception as exc:  # a fault of the check itself: report it rather than kill the sandbox
        verdict("check", True, False, f"the check itself failed: {type(exc).__name__}: {exc}")
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(server.root / "files" / _CHECK_SCOPE)
    ok = all(r["ok"] for r in results if r["required"])
    uid = jail.host_ids()[0]
    mode = "root (a uid of its own per lane)" if uid == 0 else "unprivileged (a user namespace per lane)"
    return {"ok": ok, "weak": server.weak, "mode": mode, "uid": uid,
            "cgroup": server.groups.version if server.groups else server.cgroup_error, "checks": results}  # fmt: skip


def _identity_checks(server: Server, seen: dict[str, Any], verdict: Callable[..., None]) -> None:
    if "error" in seen:
        verdict("namespaces", True, False, f"no run could start: {seen['error']}")
        return
    weak = server.weak
    verdict("namespaces", True, not weak and seen["pid"] == 1 and seen["hostname"] == policy.HOSTNAME,
            f"pid {seen['pid']}, hostname {seen['hostname']!r}" + (" (weak mode: none)" if weak else ""))  # fmt: skip
    verdict("private root", True, not seen["host_visible"],
            "no host directory visible" if not seen["host_visible"] else f"visible: {seen['host_visible']}")  # fmt: skip
    if jail.host_root():
        identity_ok = seen["uid"] == server.uid and seen["gid"] == server.gid and not seen["groups"]
        how = f"uid {seen['uid']} gid {seen['gid']} groups {seen['groups']} (expected {server.uid}/{server.gid}, none)"
    else:
        identity_ok = weak or seen["uid"] == 0
        how = f"uid {seen['uid']} inside its user namespace, mapped to this process's uid {jail.host_ids()[0]} on the host"
    verdict("identity", True, identity_ok, how)
    caps_ok = seen["caps"] == 0 and seen["bounding_empty"] and seen["securebits"] == linux.SECURE_ALL_LOCKED_NOROOT
    verdict("capabilities", True, caps_ok or (weak and seen["caps"] == 0),
            f"effective/permitted {seen['caps']:#x}, bounding set {'empty' if seen['bounding_empty'] else 'NOT empty'}, "
            f"securebits {seen['securebits']:#x}")  # fmt: skip
    verdict("no_new_privs", True, seen["nnp"] == 1, f"PR_GET_NO_NEW_PRIVS = {seen['nnp']}")
    verdict("seccomp", True, seen["seccomp"] == 2 and seen["unshare"] == "EPERM" and seen["inet"] != "ok",
            f"mode {seen['seccomp']}; unshare(CLONE_NEWUSER): {seen['unshare']}; AF_INET socket: {seen['inet']}")  # fmt: skip


def _landlock_checks(server: Server, probe: Callable[..., Any], verdict: Callable[..., None]) -> None:
    abi = landlock.abi_version()
    if abi == 0:
        verdict("landlock", False, False, "not in this kernel (optional: the argv policy alone decides what runs)")
        return
    as_shell, _ = probe(_exec_probe, execute=shell.executables("/usr/bin/true"))
    as_script, _ = probe(_exec_probe)
    if "error" in as_shell or "error" in as_script:
        verdict("landlock", False, False, f"probe failed: {as_shell.get('error') or as_script.get('error')}")
        return
    holds = as_shell == {"true": "ok", "echo": "EACCES"} and as_script == {"true": "EACCES", "echo": "EACCES"}
    verdict("landlock", False, holds,
            f"ABI {abi}; a shell run allowed only true: true {as_shell['true']}, echo {as_shell['echo']}; "
            f"a script run: true {as_script['true']}")  # fmt: skip


def _cgroup_checks(server: Server, probe: Callable[..., Any], verdict: Callable[..., None]) -> None:
    if server.groups is None:
        verdict("cgroup", True, False, f"no run cgroups: {server.cgroup_error}")
        return
    seen, out = probe(_memory_probe, limits={"memory_bytes": 64 * MiB, "wall_seconds": 10})
    verdict("cgroup memory", True, "error" not in seen and seen["killed"] >= 1 and out.oom_kills >= 1,
            f"4 x {_CHILD_MEMORY // MiB} MiB under a 64 MiB run: {seen.get('survivors')} survived, "
            f"{out.oom_kills} killed by the kernel for the run's limit" + _error(seen))  # fmt: skip
    seen, _ = probe(_pids_probe, limits={"processes": 4, "wall_seconds": 3})
    verdict("cgroup pids", True, "error" not in seen and seen["forked"] <= 3,
            f"forked {seen.get('forked')} more under processes = 4 (the runner is one)" + _error(seen))  # fmt: skip
    started = time.monotonic()
    seen, out = probe(_cpu_probe, limits={"cpu_seconds": 1, "wall_seconds": 10})
    used = out.cpu_ms or 0.0
    verdict("cgroup cpu", True, out.killed == "cpu_time" and used < 1200,
            f"3 spinning processes, 1 s budget: stopped ({out.killed}) after {used / 1000:.2f} s of CPU in "
            f"{time.monotonic() - started:.2f} s")  # fmt: skip


def _disk_checks(server: Server, probe: Callable[..., Any], verdict: Callable[..., None]) -> None:
    limits = {"work_bytes": MiB, "tmp_bytes": 2 * MiB, "file_bytes": MiB // 4}
    seen, _ = probe(_disk_probe, limits=limits, scope=_CHECK_SCOPE)
    if "error" in seen:
        verdict("disk", True, False, seen["error"])
        return
    (work, work_err), (tmp, tmp_err) = seen["work"], seen["tmp"]
    verdict("disk /work and /tmp", True, work <= MiB and work_err == "ENOSPC" and tmp <= 2 * MiB and tmp_err == "ENOSPC",
            f"/work took {work} bytes ({work_err}) of 1 MiB, /tmp {tmp} ({tmp_err}) of 2 MiB")  # fmt: skip
    made, made_err = seen["inodes"]
    verdict("disk inodes", True, made <= policy.TMPFS_INODES and made_err == "ENOSPC",
            f"{made} files in /tmp ({made_err}) of {policy.TMPFS_INODES}")  # fmt: skip
    size, size_err = seen["file"]
    verdict("disk file size", True, size <= MiB // 4 and size_err == "EFBIG",
            f"one file grew to {size} bytes ({size_err}) under file_bytes = {MiB // 4}")  # fmt: skip
    verdict("disk /files", True, seen["files_dir"] in ("EROFS", "EACCES"),
            f"a write to /files from a shell-like run: {seen['files_dir']}")  # fmt: skip


def _error(seen: dict[str, Any]) -> str:
    return f" ({seen['error']})" if "error" in seen else ""


# ---- the command -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from .client import SandboxClient, SandboxError

    parser = argparse.ArgumentParser(prog="python -m sandbox check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="the sandbox's state directory (default: a fresh temporary one)")
    parser.add_argument("--uid", type=int, default=100_000, help="the jail uid when run as root (default 100000)")
    parser.add_argument("--gid", type=int, default=100_000, help="the jail gid when run as root (default 100000)")
    parser.add_argument("--allow-weak", action="store_true", help="accept the development fallback")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="sandbox-check-"))
    if args.root is None:
        root.chmod(0o755)
    client = SandboxClient(root, args.uid, args.gid, args.allow_weak)
    try:
        hello = client.start()
        report = client.call({"kind": "check", "limits": {"wall_seconds": policy.MAX_LIMITS["wall_seconds"]}})
    except SandboxError as exc:
        print(f"sandbox check: no sandbox could be started: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    report["hello_error"] = hello.get("error")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report.get("ok") else 1


def format_report(report: dict[str, Any]) -> str:
    lines = [f"sandbox check: {report.get('mode')}, cgroup {report.get('cgroup')}"
             + (", WEAK MODE (development only)" if report.get("weak") else "")]  # fmt: skip
    for item in report.get("checks", []):
        mark = "ok  " if item["ok"] else ("FAIL" if item["required"] else "--  ")
        kind = "" if item["required"] else " (optional)"
        lines.append(f"  {mark}  {item['layer'] + kind:<28} {item['detail']}")
    missing = [i["layer"] for i in report.get("checks", []) if i["required"] and not i["ok"]]
    lines.append("every required layer holds" if not missing else f"MISSING: {', '.join(missing)}")
    return "\n".join(lines)
