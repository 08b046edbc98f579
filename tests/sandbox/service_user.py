"""The sandbox tests' second pass: as an unprivileged user, the way the systemd unit runs the worker.

    .venv/bin/python tests/sandbox/service_user.py [pytest arguments]     (as root; ./dev test runs it)
    .venv/bin/python tests/sandbox/service_user.py --run COMMAND...       (any command, the same way)

Without a path among the arguments it runs ``tests/sandbox``. ``--run`` is for measuring the production mode too
(``--run .venv/bin/python bench/sandbox_latency.py --compare DIR``).

The unit runs the worker as ``User=botworker`` with ``Delegate=yes`` and ``NoNewPrivileges=yes``, in a mount
namespace of its own (``ProtectHome=``, ``PrivateTmp=``). This launcher, started as root (as CI is), gives a test
process the same situation and then runs pytest on ``tests/sandbox`` in it:

- a uid and gid of their own (``SERVICE_UID``, no entry in /etc/passwd, no supplementary groups), no-new-privs;
- a delegated cgroup: ``<our cgroup>/botworker-test-<pid>`` in every hierarchy the sandbox uses, owned by that uid
  (the directory and its ``cgroup.procs``, ``tasks``, ``cgroup.subtree_control``, ``cgroup.threads``, as systemd
  chowns them), with the test process inside;
- a private mount namespace in which directories on the way to the Python installation and the checkout that the
  user could not traverse (``/root`` holding pyenv, typically) are replaced by an empty tmpfs showing only the
  needed child, as ``ProtectHome=`` hides home directories.

Everything is undone when pytest ends (the groups are removed, the namespace goes with the process); the exit
status is pytest's.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from sandbox import cgroup, cgroupfs  # noqa: E402

SERVICE_UID = SERVICE_GID = 64_999
_CLONE_NEWNS, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x00020000, 4096, 16384, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                       data and data.encode()), f"mount {target}")  # fmt: skip


def reachable_paths(paths: list[Path], staging: str) -> None:
    """In a private mount namespace, make every directory on the way to ``paths`` traversable by others.
    ``staging`` is an empty directory the caller removes once this process is gone (its mounts go with it)."""
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
    for target in paths:
        parts = target.resolve().parts
        for depth in range(2, len(parts)):
            directory = Path(*parts[:depth])
            if os.stat(directory).st_mode & stat.S_IXOTH:
                continue
            # Keep the real directory reachable at a staging place, cover it with an empty tmpfs, and put back
            # only the child on our way.
            keep = Path(staging) / str(depth)
            keep.mkdir()
            _mount(str(directory), str(keep), None, _MS_BIND)
            _mount("tmpfs", str(directory), "tmpfs", 0, "mode=0755,size=64k")
            child = directory / parts[depth]
            (child.mkdir if (keep / parts[depth]).is_dir() else child.touch)()
            _mount(str(keep / parts[depth]), str(child), None, _MS_BIND | _MS_REC)


def become_service_user() -> None:
    """Drop to the service's uid and gid, with no supplementary group, and set no-new-privs (NoNewPrivileges=)."""
    os.setgroups([])
    os.setresgid(SERVICE_GID, SERVICE_GID, SERVICE_GID)
    os.setresuid(SERVICE_UID, SERVICE_UID, SERVICE_UID)
    _check(_libc.prctl(38, 1, 0, 0, 0), "no-new-privs")


def in_delegated_child(who: str, child: Callable[[], None], parent: Callable[[int], None] = lambda pid: None) -> int:
    """Fork a child into cgroups delegated to the service user (made here, removed after it ends), in a private
    mount namespace where the Python installation and the checkout are reachable; it runs ``child()``, which
    should exec (exit 3 if it returns or fails). We run ``parent(child's pid)``, then return its exit status."""
    groups = cgroup.delegate(f"botworker-{who}-{os.getpid()}", SERVICE_UID, SERVICE_GID)
    staging = tempfile.mkdtemp(prefix="service-user-")
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                cgroup.join(groups)
                reachable_paths([Path(sys.base_prefix), Path(sys.prefix), REPO], staging)
                child()
            except BaseException as exc:
                print(f"{who}: cannot start the command: {exc!r}", file=sys.stderr)
            finally:
                os._exit(3)
        parent(pid)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for group in reversed(groups):
            cgroupfs.remove_tree(group)


def main(args: list[str]) -> int:
    if os.geteuid() != 0:
        print("service_user.py: run it as root (it creates the unprivileged pass's user and cgroup)", file=sys.stderr)
        return 2

    def child() -> None:
        become_service_user()
        os.chdir(REPO)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tempfile.gettempdir(),
               "PYTHONDONTWRITEBYTECODE": "1", "TMPDIR": tempfile.gettempdir()}  # fmt: skip
        if args[:1] == ["--run"]:
            os.execve(args[1], args[1:], env)
        # Only the sandbox's tests: other test paths among the arguments are left to root's pass.
        rest = [a for a in args if a.startswith("tests/sandbox") or not a.startswith("tests")]
        paths = [] if any(a.startswith("tests/sandbox") for a in rest) else ["tests/sandbox"]
        os.execve(sys.executable, [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *rest, *paths], env)

    return in_delegated_child("test", child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
