"""The sandbox process: confine itself once, probe the confinement layers, then serve requests from its pipes,
up to ``--lanes`` at once (lanes.py: each request is answered by ``Server.handle`` in a lane of its own).

    python -I -m sandbox --root DIR --uid UID --gid GID [--lanes N] [--allow-weak] [--parent-pid PID]
    python -m sandbox check [--root DIR] [--uid UID] [--gid GID] [--allow-weak] [--json]     (see check.py)

stdin and stdout carry protocol frames (see protocol.py); stderr is for log lines. The first frame it writes is
``{"type": "hello", "ok", "layers", "weak", "error", "cgroup", "lanes"}``. Then, per request frame (answers come
in any order; each carries its request's ``id``)::

    {"id", "kind": "script", "source", "params", "limits"?}
    {"id", "kind": "shell", "command", "params", "secret_env"?, "cwd"?, "limits"?, "scope"?}
    {"id", "kind": "file", "op", "path", "content"?, "scope", "limits"?}
    {"id", "kind": "ping"}
    {"id", "kind": "check"}                   every layer tried from inside real runs (check.py)

one response frame ``{"id", "ok", "error"?, "result"?, "stdout"?, "stderr"?, "exit_code"?, "killed"?,
"truncated"?, "duration_ms"?, "cpu_ms"?, "lost"?}`` (``killed``: "wall_time", "cpu_time" or "memory"; ``lost``: the
lane answering it died). A run that names a
``scope`` (the bot's id) gets ``ROOT/files/<scope>`` as ``/files``: writable in file operations, read-only in shell
runs, not at all in scripts. Nothing else of a run lives on the host (``/work`` and ``/tmp`` are tmpfs), except in
weak mode, whose work directories under ``ROOT/runs`` are removed in the background (and swept at start-up).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import shutil
import signal
import socket
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

from . import cgroup, check, files, jail, lanes, policy, request, script, seccomp, shell
from .linux import alive, effective_capabilities
from .protocol import write_frame

_PR_SET_DUMPABLE, _PR_GET_NO_NEW_PRIVS, _PR_GET_SECCOMP = 4, 39, 21
_PR_SET_NO_NEW_PRIVS = 38


class Server:
    def __init__(self, root: Path, uid: int, gid: int, allow_weak: bool) -> None:
        self.root, self.uid, self.gid = root, uid, gid
        self.allow_weak = allow_weak
        self.weak = False
        self.layers: dict[str, Any] = {}
        self.unavailable: str | None = None
        self.groups: cgroup.RunGroups | None = None
        self.cgroup_error: str | None = None
        self._cleaners: list[int] = []  # background processes removing stale directories

    # ---- start-up --------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Directories, pre-imports (nothing may load lazily inside a jail), run cgroups, then the probe."""
        if self.uid == 0 or self.gid == 0:
            raise SystemExit("sandbox: --uid and --gid must not be 0")
        for sub, mode in (("jail", 0o755), ("runs", 0o711), ("files", 0o711)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            (self.root / sub).chmod(mode)
        self._sweep_runs()
        script.warm_up()
        seccomp.prepare()  # assembled once here, inherited by every run
        for program in policy.SHELL_PROGRAMS.values():
            with contextlib.suppress(OSError):  # a program missing here is refused when a command names it
                shell.executables(program.path)
        try:
            self.groups = cgroup.RunGroups.create(home=True)  # this process lives in its runs' group
        except cgroup.CgroupUnavailable as exc:
            self.cgroup_error = str(exc)
        self.probe()

    def probe(self) -> None:
        """Run a real job in full confinement and read back what it could and could not do."""
        for weak in (False, True):
            if weak and not self.allow_weak:
                break
            self.weak = weak
            out = self._run(_probe_job, dict(policy.DEFAULT_LIMITS))
            try:
                seen = json.loads(out.result)
            except ValueError:
                self.unavailable = (out.stderr.decode(errors="replace").strip() or f"exit {out.exit_code}")[:500]
                continue
            self.layers = {
                "namespaces": not weak and seen["pid"] == 1 and seen["hostname"] == policy.HOSTNAME,
                "pivot_root": not weak and not seen["host_visible"],
                # As root: a uid of its own. Unprivileged: uid 0 of the run's user namespace (the host sees our
                # own unprivileged uid) with every capability dropped.
                "unprivileged_uid": seen["caps"] == 0 and (seen["uid"] != 0 or not jail.host_root()),
                "no_new_privs": seen["nnp"] == 1,
                "rlimits": seen["nproc"] == policy.DEFAULT_LIMITS["processes"],
                "seccomp": seen["seccomp"] == 2,
                "cgroup": bool(out.cpu_ms),  # the run's CPU time was seen in its group
                "network": seen["inet"] != "ok",
                "landlock": seen["landlock"],
            }
            missing = [name for name in policy.REQUIRED_LAYERS if not self.layers.get(name)]
            if not missing or weak:
                self.unavailable = None
                return
            reasons = {"cgroup": self.cgroup_error}
            self.unavailable = "confinement layers missing: " + ", ".join(
                f"{name} ({reasons[name]})" if reasons.get(name) else name for name in missing
            )
        self.weak = False

    def hello(self) -> dict[str, Any]:
        return {"type": "hello", "ok": self.unavailable is None, "layers": self.layers, "weak": self.weak,
                "error": self.unavailable, "cgroup": self.groups.version if self.groups else self.cgroup_error}  # fmt: skip

    # ---- requests ------------------------------------------------------------------------------------------

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request's reply. Its ``id`` is the request's, set last: nothing a run wrote can change it."""
        rid = req.get("id")
        try:
            self._reap_cleaners()
            kind = req.get("kind")
            if not isinstance(kind, str):
                raise request.Refused("`kind` must be a string")
            if kind == "ping":
                return {"ok": True, **self.hello(), "id": rid}
            if kind == "check":
                return {**check.run_battery(self), "id": rid}
            if self.unavailable:
                raise request.Refused(f"sandbox unavailable: {self.unavailable}")
            limits = request.limits(req.get("limits"))
            scope = request.scope(req.get("scope"))
            run = {"script": self._script, "shell": self._shell, "file": self._file}.get(kind)
            if run is None:
                raise request.Refused(f"unknown request kind {kind!r}")
            reply = run(req, limits, scope)
            if self.weak:
                reply["weak"] = True  # every result of a weakly confined run says so
            return {**reply, "id": rid}
        except (request.Refused, shell.ShellRefused, files.FileRefused) as exc:
            return {"id": rid, "ok": False, "error": str(exc)}
        except Exception as exc:  # a bug of ours must cost one request, not the sandbox process
            traceback.print_exc(file=sys.stderr)
            return {"id": rid, "ok": False, "error": f"sandbox internal error: {type(exc).__name__}"}

    def _script(self, req: dict[str, Any], limits: dict[str, Any], scope: str | None) -> dict[str, Any]:
        source, params = req.get("source"), req.get("params") or {}
        if not isinstance(source, str) or not isinstance(params, dict):
            raise request.Refused("script needs `source` (string) and `params` (object)")
        # No /files and nothing to execute: a script reads its params and returns its result, nothing more.
        out = self._run(_script_job(source, params, int(limits["output_bytes"])), limits)
        reply = request.parse_result(out)
        if reply is None:
            return {"ok": False, "error": request.death(out, "script"), **request.meta(out)}
        # The script's own print collector may have cut its output too: either cut makes the reply truncated.
        return {**reply, **request.meta(out), "truncated": bool(reply.get("truncated")) or out.truncated}

    def _shell(self, req: dict[str, Any], limits: dict[str, Any], scope: str | None) -> dict[str, Any]:
        params, secret = req.get("params") or {}, req.get("secret_env")
        if not isinstance(params, dict) or not (secret is None or isinstance(secret, dict)):
            raise request.Refused("`params` and `secret_env` must be objects")
        path, argv = shell.build_argv(req.get("command"), params)
        env = shell.build_env(secret)
        cwd = request.cwd(req.get("cwd"), scope)
        try:
            execute = shell.executables(path)
        except OSError as exc:
            raise request.Refused(f"program {argv[0]!r} cannot run on this machine: {exc}") from None
        job = shell.exec_job(path, argv, env, None if self.weak else cwd)
        # /files is read-only here: a command cannot fill the bot's quota, nor stash what it was given (a secret)
        # for a later read.
        out = self._run(job, limits, scope, execute=execute)
        ok = out.exit_code == 0 and out.killed is None
        reply: dict[str, Any] = {"ok": ok, "stdout": out.stdout.decode("utf-8", "replace"),
                                 "stderr": out.stderr.decode("utf-8", "replace")}  # fmt: skip
        if not ok:
            reply["error"] = request.death(out, argv[0])
        return {**reply, **request.meta(out)}

    def _file(self, req: dict[str, Any], limits: dict[str, Any], scope: str | None) -> dict[str, Any]:
        if scope is None:
            raise request.Refused("file operations need a scope")
        if self.weak and not self.layers.get("landlock"):
            raise request.Refused(
                "file operations are off in weak mode without Landlock (runs could reach other bots' files)"
            )
        op, path, content = req.get("op"), req.get("path"), req.get("content")
        files.check_request(op, path, content)
        base = str(self.root / "files" / scope) if self.weak else policy.FILES_DIR
        out = self._run(files.file_job(base, op, path, content), limits, scope, files_writable=op == "write")
        reply = request.parse_result(out)
        if reply is None:
            return {"ok": False, "error": request.death(out, "file operation"), **request.meta(out)}
        return {**reply, **request.meta(out)}

    def _run(
        self,
        job: jail.Job,
        limits: dict[str, Any],
        scope: str | None = None,
        files_writable: bool = False,
        execute: tuple[str, ...] = (),
    ) -> jail.Outcome:
        as_root = jail.host_root()  # unprivileged: runs keep our uid (inside a user namespace), no chown needed
        work = None
        if self.weak:  # no private /work tmpfs without namespaces: a host directory, removed after the run
            work = self.root / "runs" / f"{os.getpid()}-{uuid.uuid4().hex}"
            work.mkdir(mode=0o700)
            if as_root:
                os.chown(work, self.uid, self.gid)
        files_dir = None
        if scope and not (self.weak and not self.layers.get("landlock")):
            files_dir = self.root / "files" / scope
            if not files_dir.exists():
                # Another worker's sandbox may make it at the same moment (one bot's first runs on two workers):
                # then both set it up, the same way, each before its own run uses it.
                with contextlib.suppress(FileExistsError):
                    files_dir.mkdir(mode=0o770)
                if as_root:
                    os.chown(files_dir, 0, self.gid)
                files_dir.chmod(0o2770)  # setgid: files stay in the sandbox group whoever writes them
        paths = jail.Paths(self.root / "jail", work, files_dir, files_writable, execute)
        try:
            slot = self.groups.acquire() if self.groups else None
        except cgroup.CgroupUnavailable as exc:
            raise request.Refused(str(exc)) from None
        try:
            return jail.run(job, paths, self.uid, self.gid, limits, self.weak, group=slot)
        finally:
            # Clean-up comes after the outcome was measured: it never counts against the run's deadline.
            if slot is not None and self.groups is not None:
                self.groups.release(slot)
            if work is not None:
                self._remove_later([work])

    # ---- clean-up ------------------------------------------------------------------------------------------

    def _sweep_runs(self) -> None:
        """Work directories of weak runs whose sandbox process is gone (killed before it could remove them)."""
        stale = []
        for entry in (self.root / "runs").iterdir():
            pid = entry.name.split("-", 1)[0]
            if not (pid.isdigit() and int(pid) != os.getpid() and alive(int(pid))):
                stale.append(entry)
        if stale:
            self._remove_later(stale)

    def _remove_later(self, paths: list[Path]) -> None:
        """Delete in a child process, so that a run that made a million files delays nothing."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                devnull = os.open("/dev/null", os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                for path in paths:
                    _remove_tree(path)
            finally:
                os._exit(0)
        self._cleaners.append(pid)

    def _reap_cleaners(self) -> None:
        alive = []
        for pid in self._cleaners:
            with contextlib.suppress(ChildProcessError):  # (not ours: a lane inherited the list)
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    alive.append(pid)
        self._cleaners = alive

    def close(self) -> None:
        if self.groups is not None:
            self.groups.close()


# ---- helpers ---------------------------------------------------------------------------------------------------


def _remove_tree(path: Path) -> None:
    """rmtree that also gets through directories a run made unreadable (a weak run owns its work directory)."""

    def retry(function: Any, name: str, _: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
            function(name)

    shutil.rmtree(path, onerror=retry)


def _probe_job(result_fd: int) -> None:
    # Runs inside the jail: everything it uses was imported before (there is no Python library in the jail).
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        inet = "ok"
    except OSError as exc:
        inet = exc.strerror or "denied"
    seen = {
        "uid": os.getuid(),
        "caps": effective_capabilities(),
        "pid": os.getpid(),
        "hostname": os.uname().nodename,
        "nnp": libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        "seccomp": libc.prctl(_PR_GET_SECCOMP, 0, 0, 0, 0),
        "nproc": resource.getrlimit(resource.RLIMIT_NPROC)[0],
        "host_visible": any(os.path.exists(p) for p in ("/root", "/home", "/var", "/proc/1")),
        "inet": inet,
        "landlock": _landlock_active(),
    }
    os.write(result_fd, json.dumps(seen).encode())


def _landlock_active() -> bool:
    """Inside a Landlock domain, reading a directory that no rule covers fails with EACCES."""
    try:
        os.listdir("/")
    except PermissionError:
        return True
    return False


def _script_job(source: str, params: dict[str, Any], max_output: int) -> jail.Job:
    def job(result_fd: int) -> None:
        reply = script.run_script(source, params, max_output=max_output)
        data = json.dumps(reply, ensure_ascii=False).encode("utf-8")
        while data:
            data = data[os.write(result_fd, data) :]

    return job


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:
        return check.main(argv[1:])
    parser = argparse.ArgumentParser(prog="sandbox")
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--uid", required=True, type=int)
    parser.add_argument("--gid", required=True, type=int)
    parser.add_argument("--allow-weak", action="store_true")
    parser.add_argument("--parent-pid", type=int)
    parser.add_argument("--lanes", type=int, default=1, help=f"runs at once, 1 to {policy.MAX_LANES} (lanes.py)")
    args = parser.parse_args(argv)
    if not 1 <= args.lanes <= policy.MAX_LANES:
        parser.error(f"--lanes must be between 1 and {policy.MAX_LANES}")

    libc = ctypes.CDLL(None, use_errno=True)
    # No parent-death signal here: it fires when the worker *thread* that started us ends, and any of a worker's
    # threads may restart its sandbox. We stop when the worker's end of our stdin closes (it died, or closed it),
    # and our lanes and runs die with us (theirs are armed against single-threaded parents).
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the worker died before we started
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace, no /proc/<pid>/mem of this process
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # nothing it or its runs exec can gain privileges
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o022)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    server = Server(args.root, args.uid, args.gid, args.allow_weak)
    server.prepare()
    # Everything imported so far moves to the permanent generation: a forked run's garbage collector then never
    # walks (and copies, page by page) the sandbox's own objects. Halves the cost of a trivial script.
    gc.freeze()
    if server.weak:
        print("sandbox: WEAK MODE (development flag): no namespaces, no private root", file=sys.stderr)
    dispatcher = lanes.Dispatcher(server, args.lanes)
    try:
        dispatcher.start()
        write_frame(1, {**server.hello(), "lanes": dispatcher.pids()})
        dispatcher.run()
    finally:
        dispatcher.stop()
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
