#!/usr/bin/env python3
"""Round-trip latency of one sandboxed run, per workload and confinement level, and where the time goes.

    .venv/bin/python bench/sandbox_latency.py [--n 200] [--breakdown 60] [--uid 199990] [--no-userns]
        [--no-experiments] [--json out.json]
    .venv/bin/python bench/sandbox_latency.py --compare DIR [--n 200]

Needs root for the levels below (the unprivileged one runs in a helper that drops to uid 65534 in a delegated
cgroup). ``--compare DIR`` measures only the worker's view, this tree's sandbox process against DIR's (for instance
``git archive`` of an older commit's ``sandbox/``), alternating in blocks of 10 requests (2 unmeasured), root or
not (under ``tests/sandbox/service_user.py --run``: production's unprivileged mode). Writes only under fresh temp
directories.

Workloads (one request each): a trivial custom script (``result = 1``), a 10k-iteration script, the shell command
``echo hi``, a file write and a file read (of the file just written; "write + read" is the sum of both rows).

Levels:

- ``full, client``: ``SandboxClient.call`` against a real sandbox process (what the worker pays: pipes, framing,
  ``Server.handle``, the run's cgroup slot, jail, release of the slot).
- ``full, server in-process``: ``Server.handle`` of ``sandbox.__main__`` called in this process (no pipes).
- ``full, jail.run``: ``jail.run`` with the job and paths built the way ``sandbox/__main__.py`` builds them, in
  the run group this process lives in (as the sandbox process does); the slot's release is outside the timer. The
  difference to the rows above is protocol and server overhead.
- ``no netns, jail.run``: the same with ``CLONE_NEWNET`` removed from ``jail_child.NAMESPACES``.
- ``weak, jail.run``: ``weak=True`` (no namespaces, no private root; cgroup, uid, no-new-privs, rlimits, seccomp,
  Landlock on host paths).
- ``userns, jail.run``: a forked helper that dropped to uid 65534 runs the jail as an unprivileged sandbox does
  (a user namespace of its own per run).

In-process levels call ``script.warm_up()``, ``files.operate(...)`` and ``gc.freeze()`` first, like the sandbox
process. All levels and workloads are interleaved (one of each per round), so noise from other processes on the
machine hits them alike. Floors: ``subprocess.run(["/usr/bin/echo", "hi"], capture_output=True)``, ``fork()`` +
``waitpid`` of this Python process, and three nested ``fork()`` (the jail's keeper → init → runner chain without
namespaces).

The breakdown runs ``Server.handle`` in-process with the jail's functions wrapped (``jail_child.keeper``, ``_init``,
``_build_root``, ``_runner``, ``_set_limits``, ``landlock.ruleset``/``enforce``, ``seccomp.install``, the cgroup
slot's ``configure``/``enter`` and the groups' ``acquire``/``release``, the job, and ``jail.os``/``jail_child.LIBC``
through thin proxies); each wrapper writes a CLOCK_MONOTONIC timestamp
into a shared anonymous mapping, so the timestamps of the three child processes line up with the parent's.

The experiments are prototypes written here, not product code (they run without a cgroup), each checked with
the sandbox's own probe job
(``_probe_job``, read as ``Server.probe`` reads it) and run interleaved with today's ``jail.run``: one network
namespace shared by the runs (setns) instead of a new one per run; answering at EOF (the keeper and init do not
hold the output pipes, the runner closes them after the job) instead of after the whole tree is reaped; one
process per run (the sandbox process unshare()s, forks a child that is pid 1, builds the root and becomes the
runner, and setns()es itself back); and the jail pre-built before the request arrives ("zygote"). Then the cost
of single pieces: run directory, unshare flags, the script with and without copy-on-write faults, ``_build_root``
against a root built once per sandbox (setns into a template mount namespace + unshare), ``seccomp.install()``
against a prctl of a filter built in advance, and fork() of bare and sandbox-like interpreters.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import mmap
import os
import platform
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# SANDBOX_BENCH_SRC=DIR measures the sandbox/ package found in DIR instead (e.g. `git archive` of another commit).
SRC = Path(os.environ.get("SANDBOX_BENCH_SRC") or ROOT).resolve()
sys.path.insert(0, str(SRC))

from sandbox import __main__ as server_mod  # noqa: E402
from sandbox import cgroup, cgroupfs, files, jail, jail_child, landlock, linux, policy, request, script, seccomp, shell  # noqa: E402
from sandbox.client import SandboxClient  # noqa: E402

NOBODY = 65534
LOOP = "x = 0\nfor i in range(10000):\n    x = x + i\nresult = x"
CONTENT = "hello from the bench\n"
SCOPE = "bench"

# name -> (request, check of the reply as the server would answer it)
WORKLOADS: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = {
    "script `result = 1`": (
        {"kind": "script", "source": "result = 1", "params": {}},
        lambda r: r.get("ok") is True and r.get("result") == 1,
    ),
    "script 10k loop": (
        {"kind": "script", "source": LOOP, "params": {}},
        lambda r: r.get("ok") is True and r.get("result") == sum(range(10000)),
    ),
    "shell `echo hi`": (
        {"kind": "shell", "command": "echo hi", "params": {}},
        lambda r: r.get("ok") is True and r.get("stdout") == "hi\n",
    ),
    "file write": (
        {"kind": "file", "op": "write", "path": "notes/bench.txt", "content": CONTENT, "scope": SCOPE},
        lambda r: r.get("ok") is True and r.get("written") == len(CONTENT),
    ),
    "file read": (
        {"kind": "file", "op": "read", "path": "notes/bench.txt", "scope": SCOPE},
        lambda r: r.get("ok") is True and r.get("content") == CONTENT,
    ),
}
LEVELS = (
    "full, client",
    "full, server in-process",
    "full, jail.run",
    "no netns, jail.run",
    "weak, jail.run",
    "userns, jail.run",
)
FLOORS = ("client ping (pipes + framing, no run)", "subprocess.run echo", "fork+waitpid", "3 nested forks")


# ---- helpers -----------------------------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    if not s:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}

    def rank(p: float) -> float:  # nearest rank
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "max": s[-1], "n": len(s)}


def make_root(owner: int | None = None) -> Path:
    """A sandbox root like Server.prepare() makes: jail/ runs/ files/ (plus files/<scope> as _run would)."""
    root = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    root.chmod(0o755)
    for sub, mode in (("jail", 0o755), ("runs", 0o711), ("files", 0o711)):
        (root / sub).mkdir(mode=mode)
    scoped = root / "files" / SCOPE
    scoped.mkdir(mode=0o770)
    if owner is not None:
        for path in (root, root / "jail", root / "runs", root / "files", scoped):
            os.chown(path, owner, owner)
    scoped.chmod(0o2770)
    return root


def build_job(req: dict[str, Any], weak: bool, root: Path) -> jail.Job:
    """The job exactly as sandbox/__main__.py builds it for this request (default limits)."""
    limits = policy.DEFAULT_LIMITS
    if req["kind"] == "script":
        return server_mod._script_job(req["source"], req["params"], int(limits["output_bytes"]))
    if req["kind"] == "shell":
        path, argv = shell.build_argv(req["command"], req["params"])
        return shell.exec_job(path, argv, shell.build_env(None), None if weak else policy.WORK_DIR)
    base = str(root / "files" / req["scope"]) if weak else policy.FILES_DIR
    return files.file_job(base, req["op"], req["path"], req.get("content"))


def reply_of(req: dict[str, Any], out: jail.Outcome) -> dict[str, Any]:
    """What the server would answer (enough of it for the checks)."""
    if req["kind"] == "shell":
        return {"ok": out.exit_code == 0 and out.killed is None, "stdout": out.stdout.decode(errors="replace")}
    return request.parse_result(out) or {"ok": False, "error": out.stderr.decode(errors="replace")[-300:]}


_GROUPS: dict[int, cgroup.RunGroups] = {}  # this process's run cgroups (the unprivileged helper has its own)


def run_groups() -> cgroup.RunGroups:
    """This process's run group, with this process in it as the sandbox process lives in its own (runs are born
    in it: a run that migrates into a group pays for an RCU grace period now and then, which production never
    does). Shared with the in-process Server of ``measure``, which moves this process into its group anyway."""
    if os.getpid() not in _GROUPS:
        _GROUPS[os.getpid()] = cgroup.RunGroups.create(home=True)
    return _GROUPS[os.getpid()]


def jail_run_once(req: dict[str, Any], root: Path, uid: int, gid: int, weak: bool = False) -> tuple[float, dict]:
    """One jail.run of the request as Server._run makes it (its cgroup slot, /files, what it may execute); only
    jail.run is timed (a weak run's work directory and the slot's release are outside the timer)."""
    job = build_job(req, weak, root)
    work = None
    if weak:
        work = root / "runs" / uuid.uuid4().hex
        work.mkdir(mode=0o700)
        if os.geteuid() == 0:
            os.chown(work, uid, gid)
    execute = shell.executables(shell.build_argv(req["command"], req["params"])[0]) if req["kind"] == "shell" else ()
    files_dir = root / "files" / req["scope"] if req.get("scope") else None
    paths = jail.Paths(root / "jail", work, files_dir, req.get("op") == "write", execute)
    groups = run_groups()
    slot = groups.acquire()
    t0 = time.perf_counter()
    out = jail.run(job, paths, uid, gid, dict(policy.DEFAULT_LIMITS), weak, group=slot)
    dt = (time.perf_counter() - t0) * 1000
    groups.release(slot)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return dt, reply_of(req, out)


@contextlib.contextmanager
def namespaces(flags: int):
    saved = jail_child.NAMESPACES
    jail_child.NAMESPACES = flags
    try:
        yield
    finally:
        jail_child.NAMESPACES = saved


def warm_like_the_sandbox() -> None:
    script.warm_up()
    files.operate("/", "exists", "x")
    gc.collect()
    gc.freeze()


class CpuMeter:
    """Machine-wide busy CPU (/proc/stat) against this process tree's own CPU: "other" is everyone else."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
        t = os.times()
        busy = (sum(vals) - vals[3] - vals[4]) / hz
        return time.monotonic(), busy, t.user + t.system + t.children_user + t.children_system

    def report(self) -> dict[str, float]:
        end = self._read()
        wall = end[0] - self.start[0]
        busy = (end[1] - self.start[1]) / wall
        own = (end[2] - self.start[2]) / wall
        return {"wall_s": wall, "busy_cores": busy, "own_cores": own, "other_cores": max(busy - own, 0.0)}


# ---- floors ------------------------------------------------------------------------------------------------------


def floor_subprocess() -> float:
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/echo", "hi"], capture_output=True, check=True)
    return (time.perf_counter() - t0) * 1000


def floor_fork() -> float:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter() - t0) * 1000


def _nested(depth: int) -> None:
    pid = os.fork()
    if pid == 0:
        if depth > 1:
            _nested(depth - 1)
        os._exit(0)
    os.waitpid(pid, 0)


def floor_nested_forks() -> float:
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            _nested(2)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter() - t0) * 1000


# ---- the unprivileged level: a forked helper at uid 65534 ---------------------------------------------------------


class UnprivilegedHelper:
    """A child of this process that dropped to uid/gid 65534 and runs requests on demand (one byte in, one out)."""

    _REPLY = struct.Struct("=dB")

    def __init__(self) -> None:
        self.root = make_root(owner=NOBODY)
        self.groups = cgroup.delegate(f"bench-{os.getpid()}", NOBODY, NOBODY)  # as systemd's Delegate=yes does
        self.error: str | None = None
        cmd_r, self.cmd_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the helper
            code = 1
            try:
                os.close(self.cmd_w)
                os.close(self.rep_r)
                cgroup.join(self.groups)
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                reqs = [w[0] for w in WORKLOADS.values()]
                checks = [w[1] for w in WORKLOADS.values()]
                while (cmd := os.read(cmd_r, 1)) and cmd[0] != 255:
                    try:
                        dt, reply = jail_run_once(reqs[cmd[0]], self.root, NOBODY, NOBODY)
                        ok = checks[cmd[0]](reply)
                        if not ok and not self.error:
                            self.error = str(reply)[:300]
                    except Exception as exc:
                        dt, ok = float("nan"), False
                        self.error = self.error or repr(exc)
                    os.write(rep_w, self._REPLY.pack(dt, ok))
                run_groups().close()
                code = 0
            finally:
                with contextlib.suppress(OSError):
                    os.write(rep_w, (self.error or "").encode()[:300])
                os._exit(code)
        os.close(cmd_r)
        os.close(rep_w)

    def run(self, index: int) -> tuple[float, bool]:
        os.write(self.cmd_w, bytes([index]))
        data = b""
        while len(data) < self._REPLY.size:
            chunk = os.read(self.rep_r, self._REPLY.size - len(data))
            if not chunk:
                raise RuntimeError("unprivileged helper died")
            data += chunk
        dt, ok = self._REPLY.unpack(data)
        return dt, bool(ok)

    def close(self) -> str:
        with contextlib.suppress(OSError):
            os.write(self.cmd_w, b"\xff")
        os.close(self.cmd_w)
        tail = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.rep_r, 4096):
                tail += chunk
        os.close(self.rep_r)
        os.waitpid(self.pid, 0)
        shutil.rmtree(self.root, ignore_errors=True)
        for group in self.groups:
            cgroupfs.remove_tree(group)
        return tail[-300:].decode(errors="replace")


# ---- the main measurement ----------------------------------------------------------------------------------------


def measure(n: int, warmup: int, uid: int, gid: int, userns: bool) -> dict[str, Any]:
    root_client, root_server, root_jail = make_root(), make_root(), make_root()
    for r in (root_client, root_server, root_jail):  # files/<scope> as Server._run leaves it: root:gid, setgid
        os.chown(r / "files" / SCOPE, 0, gid)
    client = SandboxClient(root_client, uid, gid)
    t0 = time.perf_counter()
    hello = client.start()
    start_ms = (time.perf_counter() - t0) * 1000
    if not hello.get("ok"):
        raise SystemExit(f"the sandbox is unavailable here: {hello.get('error')}")
    server = server_mod.Server(root_server, uid, gid, allow_weak=False)
    server.prepare()  # probe included; this process now lives in the server's run group
    if server.groups is not None:
        _GROUPS[os.getpid()] = server.groups  # the jail.run levels use it too: see run_groups
    gc.collect()
    gc.freeze()
    helper = UnprivilegedHelper() if userns else None

    no_net = jail_child.NAMESPACES & ~linux.CLONE_NEWNET
    names = list(WORKLOADS)

    def one(level: str, name: str) -> tuple[float, bool, dict | None]:
        req, check = WORKLOADS[name]
        if level == "full, client":
            t = time.perf_counter()
            reply = client.call(req)
            return (time.perf_counter() - t) * 1000, check(reply), reply
        if level == "full, server in-process":
            t = time.perf_counter()
            reply = server.handle({**req, "id": 1})
            return (time.perf_counter() - t) * 1000, check(reply), reply
        if level == "full, jail.run":
            dt, reply = jail_run_once(req, root_jail, uid, gid)
            return dt, check(reply), reply
        if level == "no netns, jail.run":
            with namespaces(no_net):
                dt, reply = jail_run_once(req, root_jail, uid, gid)
            return dt, check(reply), reply
        if level == "weak, jail.run":
            dt, reply = jail_run_once(req, root_jail, uid, gid, weak=True)
            return dt, check(reply), reply
        assert helper is not None
        dt, ok = helper.run(names.index(name))
        return dt, ok, None

    levels = [lv for lv in LEVELS if userns or not lv.startswith("userns")]
    samples: dict[tuple[str, str], list[float]] = {(w, lv): [] for w in names for lv in levels}
    failures: dict[tuple[str, str], int] = dict.fromkeys(samples, 0)
    first_error: dict[tuple[str, str], str] = {}
    floors: dict[str, list[float]] = {f: [] for f in FLOORS}

    def ping() -> float:
        t = time.perf_counter()
        client.call({"kind": "ping"})
        return (time.perf_counter() - t) * 1000

    floor_fns = dict(zip(FLOORS, (ping, floor_subprocess, floor_fork, floor_nested_forks), strict=True))
    meter = CpuMeter()
    load_before = os.getloadavg()
    for i in range(warmup + n):
        for fname, fn in floor_fns.items():
            dt = fn()
            if i >= warmup:
                floors[fname].append(dt)
        for name in names:
            for level in levels:
                dt, ok, reply = one(level, name)
                if i < warmup:
                    continue
                samples[name, level].append(dt)
                if not ok:
                    failures[name, level] += 1
                    first_error.setdefault((name, level), str(reply)[:300])
    load_after = os.getloadavg()
    helper_tail = helper.close() if helper else ""
    client.close()
    cpu = meter.report()
    for r in (root_client, root_server, root_jail):
        shutil.rmtree(r, ignore_errors=True)
    if helper_tail:
        for key in samples:
            if key[1].startswith("userns") and failures[key]:
                first_error.setdefault(key, helper_tail)
    return {
        "start_ms": start_ms,
        "layers": hello.get("layers"),
        "samples": samples,
        "failures": failures,
        "errors": first_error,
        "floors": floors,
        "cpu": cpu,
        "load": (load_before, load_after),
        "levels": levels,
    }


# ---- breakdown of one full run -----------------------------------------------------------------------------------

EVENTS = (
    "handle_start", "acquire_start", "acquire_end", "run_start", "configure_end", "fork_keeper", "keeper_start",
    "enter_start", "enter_end", "fork_init", "unshare_start", "unshare_end", "init_start",
    "build_start", "build_end", "fork_runner", "runner_start", "limits_start", "limits_end", "ruleset_start",
    "ruleset_end", "landlock_start", "landlock_end", "seccomp_start", "seccomp_end", "job_start", "job_end",
    "runner_exit", "init_reaped", "init_exit", "keeper_reaped", "keeper_exit", "parent_reaped", "run_end",
    "release_start", "release_end", "handle_end",
)  # fmt: skip

# (label, from event, to event): consecutive, so they add up to handle_start -> handle_end
PHASES = (
    ("server: parse request, build job (argv policy, executables)", "handle_start", "acquire_start"),
    ("server: a cgroup slot for the run", "acquire_start", "acquire_end"),
    ("server: files dir, Paths", "acquire_end", "run_start"),
    ("jail.run: cgroup limits (written only when they change), counters", "run_start", "configure_end"),
    ("jail.run: 4 pipes, then fork() of the keeper (until it runs)", "configure_end", "keeper_start"),
    ("keeper: stderr, then into the run's cgroup", "keeper_start", "enter_end"),
    ("keeper: setsid, pdeathsig, stdio, close fds", "enter_end", "unshare_start"),
    ("keeper: unshare(NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS)", "unshare_start", "unshare_end"),
    ("keeper: fork() of init (until it runs)", "unshare_end", "init_start"),
    ("init: pdeathsig and its checks", "init_start", "build_start"),
    ("init: mounts + pivot_root (_build_root)", "build_start", "build_end"),
    ("init: sethostname, fork() of the runner (until it runs)", "build_end", "runner_start"),
    ("runner: stdio, close fds, chdir, environ", "runner_start", "limits_start"),
    ("runner: rlimits", "limits_start", "limits_end"),
    ("runner: Landlock ruleset (open the rules' paths)", "limits_end", "ruleset_end"),
    ("runner: capabilities, setgroups/setresgid/setresuid, dumpable, nnp", "ruleset_end", "landlock_start"),
    ("runner: Landlock restrict_self", "landlock_start", "landlock_end"),
    ("runner: seccomp", "landlock_end", "seccomp_end"),
    ("job (umask, the job itself)", "seccomp_end", "job_end"),
    ("runner exit (os._exit until init reaps it)", "job_end", "init_reaped"),
    ("init exit: PID namespace dies (until the keeper reaps it)", "init_reaped", "keeper_reaped"),
    ("keeper exit: mount/net/IPC/UTS namespaces released (until the sandbox reaps it)", "keeper_reaped", "parent_reaped"),
    ("jail.run: close pipes, CPU and OOM counters, return", "parent_reaped", "run_end"),
    ("server: release the slot (kill and wait for what the run left)", "run_end", "release_end"),
    ("server: reply dict", "release_end", "handle_end"),
)  # fmt: skip


class Stamps:
    """CLOCK_MONOTONIC timestamps in a MAP_SHARED page, written by the sandbox process and the run's children."""

    def __init__(self) -> None:
        self.index = {name: i for i, name in enumerate(EVENTS)}
        self.buf = mmap.mmap(-1, 8 * len(EVENTS))  # anonymous mappings from mmap(-1) are MAP_SHARED

    def mark(self, name: str) -> None:
        if name in self.index:
            struct.pack_into("q", self.buf, 8 * self.index[name], time.monotonic_ns())

    def reset(self) -> None:
        self.buf[:] = bytes(len(self.buf))

    def read(self) -> dict[str, int]:
        return {n: struct.unpack_from("q", self.buf, 8 * i)[0] for n, i in self.index.items()}


class _Proxy:
    """Delegates every attribute to ``target`` except the ones given."""

    def __init__(self, target: Any, **overrides: Any) -> None:
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@contextlib.contextmanager
def instrumented(stamps: Stamps):
    """Wrap the jail's steps so each marks a timestamp; the run itself is unchanged. Restores everything after."""
    role = {"name": "sandbox"}  # per process: every child gets its own copy at fork
    real = {
        "run": jail.run,
        **{n: getattr(jail_child, n) for n in ("keeper", "_init", "_build_root", "_runner", "_set_limits")},
    }
    real_os, real_libc = jail.os, jail_child.LIBC
    real_ruleset, real_enforce, real_install = landlock.ruleset, landlock.enforce, seccomp.install
    real_slot = {name: getattr(cgroup.Slot, name) for name in ("configure", "enter")}
    real_groups = {name: getattr(cgroup.RunGroups, name) for name in ("acquire", "release")}

    def run(job, *args, **kwargs):
        def timed_job(fd: int) -> None:
            stamps.mark("job_start")
            job(fd)
            stamps.mark("job_end")

        stamps.mark("run_start")
        try:
            return real["run"](timed_job, *args, **kwargs)
        finally:
            stamps.mark("run_end")

    def enter(name: str, event: str) -> Callable[..., Any]:
        def wrapper(*args, **kwargs):
            role["name"] = name
            stamps.mark(event)
            return real[name if name == "keeper" else f"_{name}"](*args, **kwargs)

        return wrapper

    def span(fn: Callable[..., Any], start: str, end: str) -> Callable[..., Any]:
        def wrapper(*args, **kwargs):
            stamps.mark(start)
            try:
                return fn(*args, **kwargs)
            finally:
                stamps.mark(end)

        return wrapper

    def fork() -> int:
        stamps.mark({"sandbox": "fork_keeper", "keeper": "fork_init", "init": "fork_runner"}.get(role["name"], ""))
        return os.fork()

    def wait():
        result = os.wait()
        if role["name"] == "init":
            stamps.mark("init_reaped")
        return result

    def waitpid(pid: int, options: int):
        result = os.waitpid(pid, options)
        stamps.mark("keeper_reaped" if role["name"] == "keeper" else "parent_reaped")
        return result

    def _exit(code: int) -> None:
        if role["name"] in ("init", "keeper"):
            stamps.mark(f"{role['name']}_exit")
        elif role["name"] == "runner":
            stamps.mark("runner_exit")
        os._exit(code)

    def unshare(flags: int) -> int:
        stamps.mark("unshare_start")
        try:
            return real_libc.unshare(flags)
        finally:
            stamps.mark("unshare_end")

    jail.run = run
    jail_child.keeper = enter("keeper", "keeper_start")
    jail_child._init = enter("init", "init_start")
    jail_child._runner = enter("runner", "runner_start")
    jail_child._build_root = span(real["_build_root"], "build_start", "build_end")
    jail_child._set_limits = span(real["_set_limits"], "limits_start", "limits_end")
    landlock.ruleset = span(real_ruleset, "ruleset_start", "ruleset_end")
    landlock.enforce = span(real_enforce, "landlock_start", "landlock_end")
    seccomp.install = span(real_install, "seccomp_start", "seccomp_end")
    cgroup.Slot.configure = span(real_slot["configure"], "", "configure_end")
    cgroup.Slot.enter = span(real_slot["enter"], "enter_start", "enter_end")
    cgroup.RunGroups.acquire = span(real_groups["acquire"], "acquire_start", "acquire_end")
    cgroup.RunGroups.release = span(real_groups["release"], "release_start", "release_end")
    jail.os = jail_child.os = _Proxy(os, fork=fork, wait=wait, waitpid=waitpid, _exit=_exit)
    jail_child.LIBC = _Proxy(real_libc, unshare=unshare)
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(jail if name == "run" else jail_child, name, fn)
        jail.os = jail_child.os = real_os
        jail_child.LIBC = real_libc
        landlock.ruleset, landlock.enforce, seccomp.install = real_ruleset, real_enforce, real_install
        for name, fn in real_slot.items():
            setattr(cgroup.Slot, name, fn)
        for name, fn in real_groups.items():
            setattr(cgroup.RunGroups, name, fn)


def breakdown(runs: int, uid: int, gid: int, workloads: tuple[str, ...]) -> dict[str, Any]:
    """Per-phase medians of Server.handle (full confinement, in-process) for each workload."""
    root = make_root()
    os.chown(root / "files" / SCOPE, 0, gid)
    server = server_mod.Server(root, uid, gid, allow_weak=False)
    server.prepare()
    gc.collect()
    gc.freeze()
    stamps = Stamps()
    result: dict[str, Any] = {}
    for name in workloads:
        req, check = WORKLOADS[name]
        per_phase: dict[str, list[float]] = {label: [] for label, _, _ in PHASES}
        totals: list[float] = []
        plain: list[float] = []
        bad = incomplete = 0
        with instrumented(stamps):
            for i in range(runs + 5):
                stamps.reset()
                stamps.mark("handle_start")
                reply = server.handle({**req, "id": i})
                stamps.mark("handle_end")
                seen = stamps.read()
                if i < 5:
                    continue
                bad += not check(reply)
                if not seen["job_end"]:  # an exec job: "job" then runs until init reaps the program
                    seen["job_end"] = seen["init_reaped"]
                if any(not seen[e] for e in EVENTS if e != "runner_exit"):
                    incomplete += 1  # a step did not run (a failed run): no breakdown for this one
                    continue
                for label, a, b in PHASES:
                    per_phase[label].append((seen[b] - seen[a]) / 1e6)
                totals.append((seen["handle_end"] - seen["handle_start"]) / 1e6)
        for i in range(runs + 5):  # the same, not instrumented: what the wrappers cost
            if i == 5:
                usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            server.handle({**req, "id": i})
            if i >= 5:
                plain.append((time.perf_counter() - t) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime) * 1000 / runs
        faults = (after.ru_minflt - usage.ru_minflt) / runs
        result[name] = {
            "phases": {label: _median(vals) for label, vals in per_phase.items()},
            "total": _median(totals),
            "plain": _median(plain),
            "cpu_ms": cpu,
            "minflt": faults,
            "failures": bad + incomplete,
        }
    shutil.rmtree(root, ignore_errors=True)
    return result


def _median(values: list[float]) -> float:
    return percentiles(values)["p50"] if values else float("nan")


# ---- experiments: prototypes of the suggestions ------------------------------------------------------------------

_NS_TYPES = (("mnt", linux.CLONE_NEWNS), ("net", linux.CLONE_NEWNET), ("ipc", linux.CLONE_NEWIPC),
             ("uts", linux.CLONE_NEWUTS), ("pid_for_children", linux.CLONE_NEWPID))  # fmt: skip


def _open_namespaces() -> list[tuple[int, int]]:
    """Descriptors of this process's namespaces, to setns() back after an unshare() (the one-process prototype)."""
    return [(os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), kind) for name, kind in _NS_TYPES]


class SharedNetns:
    """A network namespace made once (only a downed loopback), held by a sleeping child; runs setns() into it.

    Runs open it by path (/proc/<holder>/ns/net), because the keeper closes every inherited descriptor."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.hold_r, self.hold_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the holder
            os.close(self.hold_w)
            ok = linux.LIBC.unshare(linux.CLONE_NEWNET) == 0
            os.write(w, b"r" if ok else b"x")
            os.read(self.hold_r, 1)  # EOF when the bench closes its end
            os._exit(0)
        os.close(w)
        os.close(self.hold_r)
        ready = os.read(r, 1)
        os.close(r)
        if ready != b"r":
            self.close()
            raise RuntimeError("could not make a network namespace")
        self.path = f"/proc/{self.pid}/ns/net"

    def enter(self) -> int:
        """setns() into it; returns 0 or -1 with errno set, like the libc call it replaces."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            ctypes.set_errno(exc.errno or 0)
            return -1
        try:
            return linux.LIBC.setns(fd, linux.CLONE_NEWNET)
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.hold_w)
        os.waitpid(self.pid, 0)


def _closing(job: jail.Job) -> jail.Job:
    """The job, then close the result pipe, stdout and stderr: the sandbox sees EOF before this process exits."""

    def run(result_fd: int) -> None:
        job(result_fd)
        os.close(result_fd)
        os.close(1)
        os.close(2)

    return run


def _read_until_eof(fds: list[int], deadline: float) -> dict[int, bytes]:
    got = {fd: b"" for fd in fds}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    left = set(fds)
    while left and time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            chunk = os.read(fd, 65536)
            if not chunk:
                poller.unregister(fd)
                left.discard(fd)
            else:
                got[fd] += chunk
    return got


class Prototype:
    """One run of the trivial script built differently from jail.run (same _build_root, same _runner).

    - processes 3: keeper -> init -> runner, as today; 1: the sandbox process unshare()s, forks one child that is
      pid 1 of the new namespaces, builds the root and becomes the runner, and setns()es itself back at once.
    - prebuilt: the namespaces and root are built before the request; the request is one byte on a pipe ("go").
    - early_eof: the keeper and init drop their copies of the output pipes and the runner closes them after the
      job, so the sandbox can answer at EOF, before the processes are torn down (it reaps them afterwards).
    - netns: setns() into this SharedNetns instead of unshare(CLONE_NEWNET).
    """

    def __init__(
        self, processes: int, prebuilt: bool, early_eof: bool, saved: list[tuple[int, int]], netns: Any = None
    ) -> None:
        self.processes, self.prebuilt, self.early_eof, self.netns = processes, prebuilt, early_eof, netns
        self.saved = saved

    def bound(self, uid: int, gid: int, limits: dict) -> Callable[[jail.Job, jail.Paths], dict[str, Any]]:
        return lambda job, paths: self.run(job, paths, uid, gid, limits)

    def _flags(self) -> int:
        return jail_child.NAMESPACES & ~linux.CLONE_NEWNET if self.netns is not None else jail_child.NAMESPACES

    def _enter_netns(self) -> None:
        if self.netns is not None:
            linux.check(self.netns.enter(), "setns(net)")

    def run(self, job: jail.Job, paths: jail.Paths, uid: int, gid: int, limits: dict) -> dict[str, Any]:
        t0 = time.perf_counter()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        res_r, res_w = os.pipe2(os.O_CLOEXEC)
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        fds = (out_w, err_w, res_w, ready_w)  # _runner's 4th slot is closed with the rest
        job = _closing(job) if self.early_eof else job
        if self.processes == 1:
            pid = self._fork_one(job, paths, uid, gid, limits, fds, go_r)
        else:
            pid = self._fork_three(job, paths, uid, gid, limits, fds, go_r)
        for fd in (*fds, go_r):
            os.close(fd)
        ready = b""
        if self.prebuilt:
            ready = os.read(ready_r, 1)
            t1 = time.perf_counter()
            time.sleep(0.002)  # idle, as between two requests
        start = time.perf_counter()
        os.write(go_w, b"g")
        got = _read_until_eof([res_r, out_r, err_r], time.monotonic() + 5)
        at_eof = time.perf_counter()
        os.waitpid(pid, 0)
        reaped = time.perf_counter()
        for fd in (out_r, err_r, res_r, ready_r, go_w):
            os.close(fd)
        return {
            "critical": (at_eof - start) * 1000,
            "reaped": (reaped - start) * 1000,
            "prebuild": (t1 - t0) * 1000 if self.prebuilt else float("nan"),
            "result": got[res_r],
            "stderr": got[err_r],
            "ready": ready,
        }

    def _fork_one(self, job, paths, uid, gid, limits, fds, go_r) -> int:
        linux.check(linux.LIBC.unshare(self._flags()), "unshare")
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - pid 1 of the run, then its runner
                try:
                    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
                    os.setsid()
                    os.dup2(fds[1], 2)
                    self._enter_netns()
                    jail_child._build_root(paths, uid, gid, limits)
                    linux.check(linux.LIBC.sethostname(b"sandbox", 7), "sethostname")
                    os.write(fds[3], b"r")
                    if os.read(go_r, 1):
                        os._exit(jail_child._runner(job, paths, uid, gid, limits, False, fds))
                except BaseException as exc:
                    jail_child._report(f"prototype setup failed: {exc}")
                os._exit(jail_child.EXIT_SETUP_FAILED)
        finally:
            for fd, kind in self.saved:  # back to our own namespaces; fail closed if that is impossible
                if linux.LIBC.setns(fd, kind) != 0:
                    os.write(2, b"setns back failed: aborting\n")
                    os._exit(70)
        return pid

    def _fork_three(self, job, paths, uid, gid, limits, fds, go_r) -> int:
        devnull = os.open("/dev/null", os.O_WRONLY | os.O_CLOEXEC)
        keeper = os.fork()
        if keeper == 0:  # pragma: no cover - the keeper
            code = jail_child.EXIT_SETUP_FAILED
            try:
                os.setsid()
                linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
                os.dup2(fds[1], 2)
                linux.check(linux.LIBC.unshare(self._flags()), "unshare")
                self._enter_netns()
                init = os.fork()
                if init == 0:
                    icode = jail_child.EXIT_SETUP_FAILED
                    try:
                        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
                        jail_child._build_root(paths, uid, gid, limits)
                        linux.check(linux.LIBC.sethostname(b"sandbox", 7), "sethostname")
                        os.write(fds[3], b"r")
                        if not os.read(go_r, 1):
                            os._exit(0)
                        runner = os.fork()
                        if runner == 0:
                            try:
                                os._exit(jail_child._runner(job, paths, uid, gid, limits, False, fds))
                            finally:
                                os._exit(jail_child.EXIT_SETUP_FAILED)
                        for fd in fds:
                            os.close(fd)
                        if self.early_eof:
                            os.dup2(os.open("/dev/null", os.O_WRONLY), 2)
                        while True:
                            pid, status = os.wait()
                            if pid == runner:
                                icode = os.waitstatus_to_exitcode(status)
                                break
                    except BaseException as exc:
                        jail_child._report(f"prototype setup failed: {exc}")
                    os._exit(icode if icode >= 0 else 128 - icode)
                if self.early_eof:
                    for fd in fds:
                        os.close(fd)
                    os.dup2(devnull, 2)
                _, status = os.waitpid(init, 0)
                code = os.waitstatus_to_exitcode(status)
            except BaseException as exc:
                jail_child._report(f"prototype setup failed: {exc}")
            os._exit(code if code >= 0 else 128 - code)
        os.close(devnull)
        return keeper


def experiments(runs: int, uid: int, gid: int) -> dict[str, Any]:
    """Each variant against today's jail.run, interleaved, on the trivial script in full confinement."""
    root = make_root()
    req, check = WORKLOADS["script `result = 1`"]
    limits = dict(policy.DEFAULT_LIMITS)
    cwd = os.getcwd()  # setns() into a mount namespace moves the caller to its root
    own = {name: os.stat(f"/proc/self/ns/{name}").st_ino for name, _ in _NS_TYPES}
    netns = SharedNetns()
    real_libc = jail_child.LIBC

    def shared_unshare(flags: int) -> int:  # today's jail.run, but setns() into one network namespace
        rc = real_libc.unshare(flags)
        return rc if rc != 0 else netns.enter()

    def today(shared_net: bool) -> Callable[[jail.Job, jail.Paths], dict[str, Any]]:
        def go(job: jail.Job, paths: jail.Paths) -> dict[str, Any]:
            saved = jail_child.NAMESPACES
            if shared_net:
                jail_child.LIBC = _Proxy(real_libc, unshare=shared_unshare)
                jail_child.NAMESPACES = saved & ~linux.CLONE_NEWNET
            try:
                t = time.perf_counter()
                out = jail.run(job, paths, uid, gid, limits)
                dt = (time.perf_counter() - t) * 1000
            finally:
                jail_child.LIBC, jail_child.NAMESPACES = real_libc, saved
            return {"critical": dt, "reaped": dt, "prebuild": float("nan"), "result": out.result, "ready": b"",
                    "stderr": out.stderr}  # fmt: skip

        return go

    saved = _open_namespaces()  # where the one-process prototypes setns() back to
    variants: dict[str, Callable[[jail.Job, jail.Paths], dict[str, Any]]] = {
        "today: jail.run (3 processes, 5 new namespaces)": today(False),
        "shared network namespace (setns instead of CLONE_NEWNET)": today(True),
        "3 processes, answer at EOF": Prototype(3, False, True, saved).bound(uid, gid, limits),
        "1 process (runner is pid 1), answer at reap": Prototype(1, False, False, saved).bound(uid, gid, limits),
        "1 process, answer at EOF": Prototype(1, False, True, saved).bound(uid, gid, limits),
        "pre-built 3 processes (zygote), answer at EOF": Prototype(3, True, True, saved).bound(uid, gid, limits),
        "pre-built 1 process (zygote), answer at EOF": Prototype(1, True, True, saved).bound(uid, gid, limits),
        "1 process + shared netns, answer at EOF": Prototype(1, False, True, saved, netns).bound(uid, gid, limits),
    }
    layers: dict[str, str] = {}
    for name, fn in variants.items():  # first, the sandbox's own probe through each variant: same confinement?
        out = fn(server_mod._probe_job, jail.Paths(root / "jail"))
        layers[name] = _probe_verdict(out["result"], 1 if "1 process" in name else 2)
    seen: dict[str, dict[str, list[float]]] = {
        v: {"critical": [], "reaped": [], "prebuild": [], "cpu": []} for v in variants
    }
    failures: dict[str, int] = dict.fromkeys(variants, 0)
    errors: dict[str, str] = {}
    for i in range(runs + 3):
        for name, fn in variants.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            out = fn(build_job(req, False, root), jail.Paths(root / "jail"))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            out["cpu"] = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
            if i < 3:
                continue
            try:
                ok = check(json.loads(out["result"])) and (out["ready"] == b"r" or not out["ready"])
            except ValueError:
                ok = False
            if not ok:
                failures[name] += 1
                errors.setdefault(name, (out.get("stderr") or out["result"])[-300:].decode(errors="replace"))
            for key in seen[name]:
                seen[name][key].append(out[key])
    netns.close()
    for fd, _ in saved:
        os.close(fd)
    os.chdir(cwd)
    if {name: os.stat(f"/proc/self/ns/{name}").st_ino for name, _ in _NS_TYPES} != own:
        raise SystemExit("the one-process prototype left this process in other namespaces")
    shutil.rmtree(root, ignore_errors=True)
    return {
        name: {
            "critical": percentiles(v["critical"]),
            "reaped": _median(v["reaped"]),
            "prebuild": _median([x for x in v["prebuild"] if x == x]),
            "cpu": sum(v["cpu"]) / len(v["cpu"]),
            "failures": failures[name],
            "error": errors.get(name),
            "layers": layers[name],
        }
        for name, v in seen.items()
    }


def _probe_verdict(raw: bytes, pid: int) -> str:
    """Server.probe's reading of _probe_job's answer: 'all layers' or the missing ones."""
    try:
        seen = json.loads(raw)
    except ValueError:
        return "probe failed"
    checks = {
        "namespaces": seen["pid"] == pid and seen["hostname"] == policy.HOSTNAME,
        "pivot_root": not seen["host_visible"],
        "unprivileged_uid": seen["caps"] == 0 and seen["uid"] != 0,
        "no_new_privs": seen["nnp"] == 1,
        "rlimits": seen["nproc"] == policy.DEFAULT_LIMITS["processes"],
        "seccomp": seen["seccomp"] == 2,
        "network": seen["inet"] != "ok",
        "landlock": seen["landlock"],
    }
    missing = [k for k, ok in checks.items() if not ok]
    return "all 8 layers" if not missing else "MISSING " + ", ".join(missing)


def pieces(runs: int, uid: int, gid: int) -> dict[str, float]:
    """Costs of single pieces: run dir handling, unshare() flags (in throwaway children), the trivial script in
    this process and in a forked child (copy-on-write faults), mounts, seccomp, and fork() of other interpreters."""
    base = Path(tempfile.mkdtemp(prefix="sandbox-bench-pieces-"))
    out: dict[str, list[float]] = {
        k: [] for k in ("uuid + mkdir + chown", "shutil.rmtree (empty dir)", "os.rmdir (empty dir)")
    }
    for _ in range(runs):
        t = time.perf_counter()
        d = base / uuid.uuid4().hex
        d.mkdir(mode=0o700)
        os.chown(d, uid, gid)
        out["uuid + mkdir + chown"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        shutil.rmtree(d, ignore_errors=True)
        out["shutil.rmtree (empty dir)"].append((time.perf_counter() - t) * 1000)
        d.mkdir(mode=0o700)
        t = time.perf_counter()
        os.rmdir(d)
        out["os.rmdir (empty dir)"].append((time.perf_counter() - t) * 1000)
    shutil.rmtree(base, ignore_errors=True)
    result = {k: _median(v) for k, v in out.items()}
    flags = {
        "unshare(NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS) (today)": jail_child.NAMESPACES,
        "unshare(...) without NEWNET": jail_child.NAMESPACES & ~linux.CLONE_NEWNET,
        "unshare(NEWNET) alone": linux.CLONE_NEWNET,
        "unshare(NEWNS) alone": linux.CLONE_NEWNS,
    }
    for label, f in flags.items():
        result[label] = _median([_in_child(lambda f=f: linux.LIBC.unshare(f) == 0) for _ in range(max(runs // 2, 10))])
    inproc = []
    for _ in range(runs):
        t = time.perf_counter()
        script.run_script("result = 1", {})
        inproc.append((time.perf_counter() - t) * 1000)
    result["run_script('result = 1') in this process"] = _median(inproc)
    result["run_script('result = 1') in a forked child (COW faults)"] = _median(
        [_in_child(lambda: script.run_script("result = 1", {})["ok"]) for _ in range(runs)]
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    k = 30
    for _ in range(k):
        _in_child(lambda: script.run_script("result = 1", {})["ok"])
    result["  minor page faults of that child"] = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before) / k
    result.update(_mount_and_seccomp_pieces(runs, uid, gid))
    result["fork+waitpid of this process"] = _median([floor_fork() for _ in range(runs)])
    snippet = (
        "import os,time\nts=[]\nfor _ in range(200):\n t=time.perf_counter();p=os.fork()\n if p==0: os._exit(0)\n"
        " os.waitpid(p,0);ts.append(time.perf_counter()-t)\nts.sort();print(ts[100]*1000)"
    )
    like_sandbox = (
        f"import sys\nsys.path.insert(0, {str(SRC)!r})\nimport gc\nfrom sandbox import __main__, files, script\n"
        "script.warm_up()\nfiles.operate('/', 'exists', 'x')\ngc.freeze()\n"
    )
    for label, prefix, flags in (
        ("fork+waitpid of a bare `python -I -S`", "", ["-I", "-S"]),
        ("fork+waitpid of a process like the sandbox's (`python -I`, warmed up)", like_sandbox, ["-I"]),
    ):
        with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
            proc = subprocess.run(
                [sys.executable, *flags, "-c", prefix + snippet], capture_output=True, text=True, timeout=60
            )
            result[label] = float(proc.stdout)
    return result


def _mount_and_seccomp_pieces(runs: int, uid: int, gid: int) -> dict[str, float]:
    """_build_root today against the per-run part on a root built once; seccomp.install against a bare prctl."""
    root = make_root()
    work = root / "runs" / "w"
    work.mkdir(mode=0o700)
    os.chown(work, uid, gid)
    paths, limits = jail.Paths(root / "jail", work, root / "files" / SCOPE), dict(policy.DEFAULT_LIMITS)
    out: dict[str, float] = {}

    def fresh_ns() -> None:
        linux.check(linux.LIBC.unshare(linux.CLONE_NEWNS), "unshare(NEWNS)")

    out["_build_root today (in a child, fresh mount namespace)"] = _median(
        [_in_child(lambda: jail_child._build_root(paths, uid, gid, limits) or True, fresh_ns) for _ in range(runs)]
    )
    template = _template_namespace(paths, uid, gid)
    out["per run on a root built once: setns + unshare(NEWNS) + /work, /files, /tmp + pivot_root"] = _median(
        [_in_child(lambda: _enter_template(template, paths, limits) or True) for _ in range(runs)]
    )
    os.close(template)
    shutil.rmtree(root, ignore_errors=True)

    prog = seccomp.build_program()
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    out["seccomp.install() (in a child)"] = _median([_in_child(lambda: seccomp.install() or True) for _ in range(runs)])
    out["seccomp: prctl of a filter built in advance (in a child)"] = _median(
        [_in_child(lambda: linux.LIBC.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0) for _ in range(runs)]
    )
    return out


def _template_namespace(paths: jail.Paths, uid: int, gid: int) -> int:
    """A mount namespace holding the jail's root built once, read-only, with empty /work, /files, /tmp mount points;
    kept alive by the returned descriptor (prototype of "reuse the mount setup")."""
    r, w = os.pipe()  # child -> parent: built
    r2, w2 = os.pipe()  # parent -> child: the namespace is held, exit
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        ok = b"x"
        try:
            linux.check(linux.LIBC.unshare(linux.CLONE_NEWNS), "unshare(NEWNS)")
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            root = str(paths.root)
            linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=1m,mode=0755")
            for host in policy.READ_ONLY_BINDS:
                os.makedirs(root + host)
                linux.mount(host, root + host, None, linux.MS_BIND | linux.MS_REC)
                flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV
                linux.mount(None, root + host, None, flags)
            for hidden in getattr(policy, "HIDDEN_PATHS", ()):
                flags = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
                linux.mount("tmpfs", root + hidden, "tmpfs", flags, "size=4k,mode=0755")
            for name, to in policy.SYMLINKS.items():
                os.symlink(to, f"{root}/{name}")
            os.makedirs(f"{root}/etc")
            for name, content in policy.ETC_FILES.items():
                Path(f"{root}/etc/{name}").write_text(content.format(uid=uid, gid=gid))
            os.makedirs(f"{root}/dev")
            for dev in policy.DEVICES:
                Path(root + dev).touch()
                linux.mount(dev, root + dev, None, linux.MS_BIND)
                linux.mount(
                    None, root + dev, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | linux.MS_NOEXEC
                )
            for inside in (policy.WORK_DIR, policy.FILES_DIR, "/tmp"):
                os.makedirs(root + inside)
            linux.mount(None, root, None, linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV)
            ok = b"r"
        finally:
            os.write(w, ok)
            os.read(r2, 1)  # until the parent holds the namespace
            os._exit(0)
    os.close(w)
    os.close(r2)
    built = os.read(r, 1)
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    os.write(w2, b"x")
    os.waitpid(pid, 0)
    os.close(r)
    os.close(w2)
    if built != b"r":
        os.close(fd)
        raise RuntimeError("template root could not be built")
    return fd


def _enter_template(template: int, paths: jail.Paths, limits: dict) -> None:
    """What a run would still do on a template root: its own copy of the namespace, its /work, /files, /tmp."""
    linux.check(linux.LIBC.setns(template, linux.CLONE_NEWNS), "setns(template)")
    linux.check(linux.LIBC.unshare(linux.CLONE_NEWNS), "unshare(NEWNS)")
    root = str(paths.root)
    data_flags = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
    binds = [(str(paths.work), policy.WORK_DIR)] + ([(str(paths.files), policy.FILES_DIR)] if paths.files else [])
    for host, inside in binds:
        linux.mount(host, root + inside, None, linux.MS_BIND)
        linux.mount(None, root + inside, None, linux.MS_REMOUNT | linux.MS_BIND | data_flags)
    linux.mount("tmpfs", f"{root}/tmp", "tmpfs", data_flags, f"size={int(limits['tmp_bytes'])},mode=1777")
    os.chdir(root)
    linux.pivot_root(".", ".")
    linux.check(linux.LIBC.umount2(b".", linux.MNT_DETACH), "umount old root")
    os.chdir("/")
    if os.path.exists("/root") or not os.path.exists("/usr/bin/echo") or not os.path.isdir("/files"):
        raise RuntimeError("template root is not the jail's")


def _in_child(fn: Callable[[], Any], setup: Callable[[], Any] | None = None) -> float:
    """Time fn() in a forked child, after an untimed setup() (ms; nan when either fails)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        t = time.perf_counter()
        try:
            if setup:
                setup()
                t = time.perf_counter()
            ok = fn()
        except BaseException:
            ok = False
        dt = (time.perf_counter() - t) * 1000 if ok else float("nan")
        os.write(w, struct.pack("d", dt))
        os._exit(0)
    os.close(w)
    data = os.read(r, 8)
    os.close(r)
    os.waitpid(pid, 0)
    return struct.unpack("d", data)[0] if len(data) == 8 else float("nan")


# ---- output ------------------------------------------------------------------------------------------------------


def machine_line() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.platform()}"


def code_version() -> str:
    """The commit, whether sandbox/ differs from it, and a digest of the sandbox/*.py actually measured."""
    import hashlib

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((SRC / "sandbox").glob("*.py")))).hexdigest()
    if SRC != ROOT:
        return f"sandbox/ from {SRC} (sha256 of sandbox/*.py {digest[:12]})"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sandbox"], cwd=ROOT, capture_output=True, text=True
        )
    except OSError:
        return f"unknown commit (sha256 of sandbox/*.py {digest[:12]})"
    state = " + uncommitted changes in sandbox/" if dirty.stdout.strip() else ""
    return f"{head.stdout.strip() or 'unknown'}{state} (sha256 of sandbox/*.py {digest[:12]})"


def fmt(v: float) -> str:
    return "—" if v != v else f"{v:.2f}" if v < 10 else f"{v:.1f}"


def print_report(m: dict[str, Any], bd: dict[str, Any] | None, ex: dict[str, Any] | None, n: int) -> None:
    print(f"\nmachine: {machine_line()}")
    print(f"code: {code_version()}; landlock ABI {landlock.abi_version()}; layers {m['layers']}")
    cpu = m["cpu"]
    print(
        f"window {cpu['wall_s']:.0f} s: machine busy {cpu['busy_cores']:.2f} cores, this bench {cpu['own_cores']:.2f}, "
        f"other {cpu['other_cores']:.2f}; loadavg {m['load'][0][0]:.2f} -> {m['load'][1][0]:.2f}"
    )
    print(f"SandboxClient.start() (spawn + warm-up + probe run): {m['start_ms']:.0f} ms")
    print(f"\n### Round trip, ms ({n} runs each, interleaved)\n")
    print("| workload | level | p50 | p90 | p99 | max | failed |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for fname, vals in m["floors"].items():
        p = percentiles(vals)
        print(f"| floor | {fname} | {fmt(p['p50'])} | {fmt(p['p90'])} | {fmt(p['p99'])} | {fmt(p['max'])} | |")
    for name in WORKLOADS:
        for level in m["levels"]:
            p = percentiles(m["samples"][name, level])
            fails = m["failures"][name, level]
            print(
                f"| {name} | {level} | {fmt(p['p50'])} | {fmt(p['p90'])} | {fmt(p['p99'])} | {fmt(p['max'])} "
                f"| {fails or ''} |"
            )
    print("\n### p50 by level, ms\n")
    print("| workload | " + " | ".join(m["levels"]) + " |")
    print("|---|" + "---:|" * len(m["levels"]))
    for name in WORKLOADS:
        cells = [fmt(percentiles(m["samples"][name, lv])["p50"]) for lv in m["levels"]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for key, err in m["errors"].items():
        print(f"first failure {key}: {err}")
    trivial = percentiles(m["samples"]["script `result = 1`", "full, client"])["p50"]
    verdict = "MET" if trivial < 12 else "NOT met"
    print(f"\ntarget (trivial script, full confinement, p50 < 12 ms through the client): {trivial:.2f} ms: {verdict}")

    if bd:
        names = list(bd)
        print("\n### Breakdown of one full run (Server.handle in-process, median per phase, ms)\n")
        print("| phase | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for label, _, _ in PHASES:
            print(f"| {label} | " + " | ".join(fmt(bd[nm]["phases"][label]) for nm in names) + " |")
        sums = [sum(bd[nm]["phases"].values()) for nm in names]
        print("| **sum of the medians** | " + " | ".join(fmt(s) for s in sums) + " |")
        print("| **median total (instrumented)** | " + " | ".join(fmt(bd[nm]["total"]) for nm in names) + " |")
        print("| median total (not instrumented) | " + " | ".join(fmt(bd[nm]["plain"]) for nm in names) + " |")
        print(
            "| CPU of the run's 3 processes (user+sys, mean) | "
            + " | ".join(fmt(bd[nm]["cpu_ms"]) for nm in names)
            + " |"
        )
        print(
            "| minor page faults of the run's processes | "
            + " | ".join(f"{bd[nm]['minflt']:.0f}" for nm in names)
            + " |"
        )
        for nm in names:
            if bd[nm]["failures"]:
                print(f"breakdown {nm}: {bd[nm]['failures']} failed replies")
        print("(exec jobs never return: their 'job' row runs until init reaps the program, exec and exit included.)")

    if ex:
        print("\n### Experiments: prototypes written in this script (trivial script, full confinement), ms\n")
        print("'answer' is when the sandbox has the whole result and could reply; 'reaped' is when the run's")
        print("processes are all gone; 'pre-build' happens before the request arrives (off the critical path).\n")
        print("| variant | answer p50 | p90 | p99 | reaped p50 | pre-build p50 | CPU/run | failed | probe |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for name, v in ex["variants"].items():
            c = v["critical"]
            print(
                f"| {name} | {fmt(c['p50'])} | {fmt(c['p90'])} | {fmt(c['p99'])} | {fmt(v['reaped'])} "
                f"| {fmt(v['prebuild'])} | {fmt(v['cpu'])} | {v['failures'] or ''} | {v['layers']} |"
            )
        for name, v in ex["variants"].items():
            if v["error"]:
                print(f"first failure of {name!r}: {v['error']}")
        print("\n| piece | median ms |\n|---|---:|")
        for k, v in ex["pieces"].items():
            print(f"| {k} | {v:.0f} |" if k.startswith("  minor") else f"| {k} | {v:.3f} |")


def compare(n: int, warmup: int, uid: int, gid: int, other: Path, as_user: bool) -> None:
    """The worker's view (``SandboxClient.call``) of this tree's sandbox and of ``other``'s (e.g. ``git archive``
    of an older commit: the wire protocol has not changed), interleaved request by request in one run."""
    from sandbox import client as client_module

    trees = {"this tree": SRC, f"{other}": other.resolve()}
    roots, clients = {}, {}
    for label, tree in trees.items():
        roots[label] = make_root()
        if os.geteuid() == 0:  # files/<scope> as Server._run leaves it: root:gid, setgid
            os.chown(roots[label] / "files" / SCOPE, 0, gid)
        saved, client_module._PACKAGE_PARENT = client_module._PACKAGE_PARENT, str(tree)
        try:
            clients[label] = SandboxClient(roots[label], uid, gid)
            hello = clients[label].start()
        finally:
            client_module._PACKAGE_PARENT = saved
        if not hello.get("ok"):
            raise SystemExit(f"{label}: the sandbox is unavailable: {hello.get('error')}")
    mode = "unprivileged (a user namespace per run)" if os.geteuid() else "root"
    print(f"compare, {mode}: about {n} runs per workload and tree, alternating in blocks ({warmup} unmeasured first)\n")
    samples = {(w, t): [] for w in WORKLOADS for t in trees}
    bad = dict.fromkeys(samples, 0)
    # Blocks of BLOCK runs per tree, alternating, the first SETTLE of each block unmeasured: a run right after a
    # run of the other tree pays for that one's teardown (a run without a cgroup slows the next cgroup migration
    # by several ms on cgroup v1), which strict one-by-one interleaving would charge to one tree only.
    block, settle = 10, 2
    for i in range((n + warmup + block - settle - 1) // (block - settle)):
        for name, (req, check) in WORKLOADS.items():
            for label in trees:
                for j in range(block):
                    t = time.perf_counter()
                    reply = clients[label].call(req)
                    dt = (time.perf_counter() - t) * 1000
                    if j >= settle and i * (block - settle) >= warmup:
                        samples[(name, label)].append(dt)
                        bad[(name, label)] += not check(reply)
    for c in clients.values():
        c.close()
    for r in roots.values():
        shutil.rmtree(r, ignore_errors=True)
    labels = list(trees)
    print("| workload | " + " | ".join(f"{t} p50 / p90, ms" for t in labels) + " | ratio p50 |")
    print("|---|" + "---:|" * (len(labels) + 1))
    for name in WORKLOADS:
        cells = [percentiles(samples[(name, t)]) for t in labels]
        row = " | ".join(f"{c['p50']:.2f} / {c['p90']:.2f}" + (f" ({bad[(name, t)]} bad)" if bad[(name, t)] else "")
                         for c, t in zip(cells, labels, strict=True))  # fmt: skip
        print(f"| {name} | {row} | {cells[0]['p50'] / cells[1]['p50']:.2f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="measured runs per workload and level (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first (default 5)")
    parser.add_argument("--breakdown", type=int, default=60, help="instrumented runs per workload (0: skip)")
    parser.add_argument("--uid", type=int, default=199_990, help="the jail uid and gid (default 199990)")
    parser.add_argument("--no-userns", dest="userns", action="store_false", help="skip the uid-65534 level")
    parser.add_argument("--no-experiments", dest="experiments", action="store_false")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="only the client level, this tree against DIR's sandbox/, interleaved")  # fmt: skip
    args = parser.parse_args()
    uid = gid = args.uid
    if args.compare:
        compare(args.n, args.warmup, uid, gid, args.compare, os.geteuid() != 0)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root: the full jail is built by a root-run sandbox (as in production)")
    started = time.monotonic()
    warm_like_the_sandbox()
    print(f"measuring {len(WORKLOADS)} workloads x {len(LEVELS)} levels x {args.n} runs ...", file=sys.stderr)
    m = measure(args.n, args.warmup, uid, gid, args.userns)
    bd = None
    if args.breakdown:
        print("breakdown ...", file=sys.stderr)
        bd = breakdown(args.breakdown, uid, gid, ("script `result = 1`", "shell `echo hi`", "file write"))
    ex = None
    if args.experiments:
        print("experiments ...", file=sys.stderr)
        runs = max(args.n // 2, 20)
        ex = {"variants": experiments(runs, uid, gid), "pieces": pieces(runs, uid, gid)}
    print_report(m, bd, ex, args.n)
    print(f"\n(total bench time {time.monotonic() - started:.0f} s)")
    if args.json:
        raw = {
            "samples": {f"{w} | {lv}": v for (w, lv), v in m["samples"].items()},
            "floors": m["floors"],
            "cpu": m["cpu"],
            "breakdown": bd,
            "experiments": ex,
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
