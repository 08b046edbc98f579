"""Run a command confined the way ``systemd/botworker.service`` confines the worker, on a machine without systemd as
its init (CI, this one): ``tests/test_systemd.py`` runs the sandbox's own check and a worker this way.

    .venv/bin/python tests/unit_confinement.py COMMAND...     (as root; the exit status is the command's)

Signals sent to this launcher are passed on to the command, as systemd sends them to the main process.

Reproduced from the unit, read from the unit file itself:

- ``User=`` and ``Delegate=yes``: a uid and gid of their own, and a cgroup delegated to them (``service_user.py``);
- ``PrivateUsers=yes``: a user namespace mapping only root, that user and nobody to themselves;
- ``CapabilityBoundingSet=`` and ``AmbientCapabilities=`` (both empty) and ``NoNewPrivileges=yes``;
- ``ProtectProc=invisible`` and ``ProcSubset=pid``: a /proc of our own with those options (a private mount
  namespace, as the unit's other protections make one);
- the seccomp filters systemd derives from ``SystemCallFilter=`` (its groups expanded by ``systemd-analyze
  syscall-filter``, as systemd expands them; denied calls fail with ``SystemCallErrorNumber=``; native
  architecture only), ``RestrictAddressFamilies=``, ``RestrictNamespaces=`` and ``MemoryDenyWriteExecute=``, built
  with libseccomp and stacked as systemd stacks them.

Not reproduced: the file-system views (``ProtectSystem=``, ``ProtectHome=``, ``PrivateTmp=``, ``PrivateDevices=``,
``ProtectKernelTunables=``), ``IPAddressDeny=`` (BPF on the unit's cgroup), ``PrivateIPC=``, and the few seccomp
rules of ``LockPersonality=``, ``RestrictRealtime=`` and ``RestrictSUIDSGID=``, whose calls the sandbox does not
make (and its runs' own filter refuses).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "sandbox")]


from service_user import SERVICE_GID, SERVICE_UID, become_service_user, in_delegated_child  # noqa: E402

UNIT = REPO / "systemd" / "botworker.service"
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWUSER = 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 2, 4, 8
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, _PR_SET_NO_NEW_PRIVS = 24, 47, 4, 38
# RestrictNamespaces= names and their clone flags
_NAMESPACE_FLAGS = {"cgroup": 0x02000000, "ipc": 0x08000000, "net": 0x40000000, "mnt": 0x00020000,
                    "pid": 0x20000000, "user": 0x10000000, "uts": 0x04000000, "time": 0x00000080}  # fmt: skip
_FAMILIES = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
_AF_MAX = 46
_PROT_WRITE, _PROT_EXEC = 2, 4


def service_directives() -> dict[str, list[str]]:
    """Every value of every directive of the unit's [Service] section, in order."""
    found: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def expand(name: str, analyze: str, seen: set[str] | None = None) -> set[str]:
    """A system call, or a @group expanded recursively by systemd-analyze (this systemd's own definition)."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    listing = subprocess.run([analyze, "syscall-filter", "--no-pager", name], capture_output=True, text=True,
                             check=True).stdout.split("\n")[1:]  # fmt: skip
    calls: set[str] = set()
    for line in listing:
        word = line.strip()
        if word and not word.startswith("#"):
            calls |= expand(word, analyze, seen)
    return calls


def allowed_calls(directives: dict[str, list[str]], analyze: str) -> set[str]:
    """SystemCallFilter= lines in order: the first without ``~`` starts an allow list, ``~`` lines remove from it."""
    allowed: set[str] = set()
    for line in directives["SystemCallFilter"]:
        deny = line.startswith("~")
        names = set().union(*(expand(n, analyze) for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]


class Filter:
    """One libseccomp filter (stacked on those loaded before it)."""

    EQ, MASKED_EQ = 4, 7
    ALLOW = 0x7FFF0000

    def __init__(self, default: int) -> None:
        self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                                    ctypes.POINTER(_ArgCmp)]  # fmt: skip
        self.ctx = self.lib.seccomp_init(ctypes.c_uint32(default))
        if not self.ctx:
            raise OSError("seccomp_init failed")

    @staticmethod
    def errno_action(number: int) -> int:
        return 0x00050000 | (number & 0xFFFF)

    def rule(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> bool:
        number = self.lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            return False  # not a call of this architecture (systemd skips those too)
        array = (_ArgCmp * len(cmps))(*[_ArgCmp(*c) for c in cmps]) if cmps else None
        rc = self.lib.seccomp_rule_add_array(self.ctx, action, number, len(cmps), array)
        if rc < 0:
            raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        return True

    def load(self) -> None:
        rc = self.lib.seccomp_load(ctypes.c_void_p(self.ctx))
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")


def build_filters(directives: dict[str, list[str]], analyze: str) -> list[Filter]:
    error = getattr(errno, directives.get("SystemCallErrorNumber", ["EPERM"])[-1])
    assert directives.get("SystemCallArchitectures") == ["native"]  # libseccomp's default: the native one only
    filters = []

    families = {_FAMILIES[f] for f in directives["RestrictAddressFamilies"][-1].split()}
    sockets = Filter(Filter.ALLOW)
    for family in range(_AF_MAX):
        if family not in families:
            sockets.rule(Filter.errno_action(errno.EAFNOSUPPORT), "socket", (0, Filter.EQ, family, 0))
    filters.append(sockets)

    allowed_ns = {_NAMESPACE_FLAGS[n] for n in directives["RestrictNamespaces"][-1].split()}
    spaces = Filter(Filter.ALLOW)
    spaces.rule(Filter.errno_action(errno.ENOSYS), "clone3")  # its flags are out of a filter's reach
    for flag in set(_NAMESPACE_FLAGS.values()) - allowed_ns:
        spaces.rule(Filter.errno_action(errno.EPERM), "unshare", (0, Filter.MASKED_EQ, flag, flag))
        if flag != _NAMESPACE_FLAGS["time"]:  # (shares its bit with clone's exit signal)
            spaces.rule(Filter.errno_action(errno.EPERM), "clone", (0, Filter.MASKED_EQ, flag, flag))
        spaces.rule(Filter.errno_action(errno.EPERM), "setns", (1, Filter.EQ, flag, 0))
    filters.append(spaces)

    if directives.get("MemoryDenyWriteExecute") == ["yes"]:
        wx = _PROT_WRITE | _PROT_EXEC
        memory = Filter(Filter.ALLOW)
        memory.rule(Filter.errno_action(errno.EPERM), "mmap", (2, Filter.MASKED_EQ, wx, wx))
        memory.rule(Filter.errno_action(errno.EPERM), "mprotect", (2, Filter.MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        memory.rule(Filter.errno_action(errno.EPERM), "pkey_mprotect", (2, Filter.MASKED_EQ, _PROT_EXEC, _PROT_EXEC))
        filters.append(memory)
    # The allow list goes last, as systemd loads it: once it is in, loading another filter may be refused.
    calls = Filter(Filter.errno_action(error))
    for name in sorted(allowed_calls(directives, analyze)):
        calls.rule(Filter.ALLOW, name)
    return [*filters, calls]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def main(argv: list[str]) -> int:
    if os.geteuid() != 0 or not argv:
        print("usage (as root): unit_confinement.py COMMAND...", file=sys.stderr)
        return 2
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        print("unit_confinement.py: systemd-analyze is missing (Debian package systemd)", file=sys.stderr)
        return 2
    directives = service_directives()
    assert directives["PrivateUsers"] == ["yes"] and directives["CapabilityBoundingSet"] == [""]
    assert directives["NoNewPrivileges"] == ["yes"] and directives["Delegate"] == ["yes"]
    filters = build_filters(directives, analyze)  # (before the fork: systemd-analyze runs as root, unconfined)
    mapped_r, mapped_w = os.pipe()
    unshared_r, unshared_w = os.pipe()

    def service() -> None:  # the service's process, from the fork to the exec
        os.close(mapped_w)
        os.close(unshared_r)
        options = f"hidepid={directives['ProtectProc'][-1]},subset={directives['ProcSubset'][-1]}"
        _check(_libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(_MS_NOSUID | _MS_NODEV | _MS_NOEXEC),
                           options.encode()), "mount /proc")  # fmt: skip
        _check(_libc.unshare(_CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")  # PrivateUsers=yes
        os.write(unshared_w, b"u")
        if os.read(mapped_r, 1) != b"m":
            raise OSError("the launcher did not map our user namespace")
        for cap in range(64):  # CapabilityBoundingSet= (while uid 0 of our namespace may still)
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
        _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "ambient")
        become_service_user()
        os.chdir(REPO)
        for seccomp_filter in filters:
            seccomp_filter.load()
        os.execve(argv[0], argv, dict(os.environ))

    def launcher(pid: int) -> None:
        os.close(mapped_r)
        os.close(unshared_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, lambda signum, _frame: os.kill(pid, signum))  # systemd signals the main process
        if os.read(unshared_r, 1) == b"u":
            # As systemd maps PrivateUsers=: root, the service's user and group, and nobody, each to itself.
            lines = "0 0 1\n{0} {0} 1\n65534 65534 1\n"
            Path(f"/proc/{pid}/uid_map").write_text(lines.format(SERVICE_UID))
            Path(f"/proc/{pid}/gid_map").write_text(lines.format(SERVICE_GID))
            os.write(mapped_w, b"m")

    return in_delegated_child("unit", service, launcher)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
