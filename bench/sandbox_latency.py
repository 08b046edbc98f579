#!/usr/bin/env python3
"""Round-trip latency and CPU of one sandboxed run, per workload and confinement level.

    .venv/bin/python bench/sandbox_latency.py [--n 200] [--uid 199990] [--no-userns] [--json out.json]
    .venv/bin/python bench/sandbox_latency.py --compare DIR [--n 200]

Needs root for the levels below (the unprivileged one runs in a helper that drops to uid 65534 in a delegated
cgroup). ``--compare DIR`` measures only the worker's view, this tree's sandbox process against DIR's (for instance
``git archive`` of an older commit's ``sandbox/``), alternating in blocks of 10 requests (2 unmeasured), root or
not (under ``tests/sandbox/service_user.py --run``: production's unprivileged mode), and the CPU each sandbox
process tree (dispatcher, lanes and the runs they reaped) spent per run. Writes only under fresh temp directories.

Workloads (one request each): a trivial custom script (``result = 1``), a 10k-iteration script, the shell command
``echo hi``, a file write and a file read (of the file just written; "write + read" is the sum of both rows).

Levels:

- ``full, client``: ``SandboxClient.call`` against a real sandbox process (what the worker pays: pipes, framing,
  ``Server.handle``, the run's cgroup slot, jail, release of the slot).
- ``full, server in-process``: ``Server.handle`` of ``sandbox.__main__`` called in this process (no pipes).
- ``full, jail.run``: ``jail.run`` with the job and paths built the way ``sandbox/__main__.py`` builds them, in
  the run group this process lives in (as the sandbox process does); the slot's release is outside the timer. The
  difference to the rows above is protocol and server overhead.
- ``no netns, jail.run``: the same with ``CLONE_NEWNET`` removed from ``jail.NAMESPACES``.
- ``weak, jail.run``: ``weak=True`` (no namespaces, no private root; cgroup, uid, no-new-privs, rlimits, seccomp,
  Landlock on host paths).
- ``userns, jail.run``: a forked helper that dropped to uid 65534 runs the jail as an unprivileged sandbox does
  (a user namespace of its own per run).

In-process levels call ``script.warm_up()``, ``files.operate(...)`` and ``gc.freeze()`` first, like the sandbox
process. All levels and workloads are interleaved (one of each per round), so noise from other processes on the
machine hits them alike. Floors: ``subprocess.run(["/usr/bin/echo", "hi"], capture_output=True)``, ``fork()`` +
``waitpid`` of this Python process, and three nested ``fork()``.

(The breakdown by phase and the prototypes that led to today's one-process run were written for the three-process
jail and went with it: ``git show 6e49782:bench/sandbox_latency.py``; their results are in docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
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
from sandbox import cgroup, cgroupfs, files, jail, landlock, linux, policy, request, script, shell  # noqa: E402
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
    saved = jail.NAMESPACES
    jail.NAMESPACES = flags
    try:
        yield
    finally:
        jail.NAMESPACES = saved


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

    no_net = jail.NAMESPACES & ~linux.CLONE_NEWNET
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


# ---- report ------------------------------------------------------------------------------------------------------


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


def print_report(m: dict[str, Any], n: int) -> None:
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
    mode = "unprivileged (a user namespace per lane)" if os.geteuid() else "root"
    print(f"compare, {mode}: about {n} runs per workload and tree, alternating in blocks ({warmup} unmeasured first)\n")
    samples = {(w, t): [] for w in WORKLOADS for t in trees}
    bad = dict.fromkeys(samples, 0)
    cpu = dict.fromkeys(samples, 0.0)  # CPU seconds of each sandbox's tree over the measured runs
    # Blocks of BLOCK runs per tree, alternating, the first SETTLE of each block unmeasured: a run right after a
    # run of the other tree pays for that one's teardown (a run without a cgroup slows the next cgroup migration
    # by several ms on cgroup v1), which strict one-by-one interleaving would charge to one tree only.
    block, settle = 10, 2
    for i in range((n + warmup + block - settle - 1) // (block - settle)):
        for name, (req, check) in WORKLOADS.items():
            for label in trees:
                for j in range(block):
                    measured = j >= settle and i * (block - settle) >= warmup
                    before = _tree_cpu(clients[label]) if measured else 0.0
                    t = time.perf_counter()
                    reply = clients[label].call(req)
                    dt = (time.perf_counter() - t) * 1000
                    if measured:
                        cpu[(name, label)] += _tree_cpu(clients[label]) - before
                        samples[(name, label)].append(dt)
                        bad[(name, label)] += not check(reply)
    for c in clients.values():
        c.close()
    for r in roots.values():
        shutil.rmtree(r, ignore_errors=True)
    labels = list(trees)
    print("| workload | " + " | ".join(f"{t} p50 / p90, ms" for t in labels) + " | ratio p50 | CPU ms/run | ratio |")
    print("|---|" + "---:|" * (len(labels) + 3))
    for name in WORKLOADS:
        cells = [percentiles(samples[(name, t)]) for t in labels]
        row = " | ".join(f"{c['p50']:.2f} / {c['p90']:.2f}" + (f" ({bad[(name, t)]} bad)" if bad[(name, t)] else "")
                         for c, t in zip(cells, labels, strict=True))  # fmt: skip
        per_run = [cpu[(name, t)] * 1000 / max(len(samples[(name, t)]), 1) for t in labels]
        print(
            f"| {name} | {row} | {cells[0]['p50'] / cells[1]['p50']:.2f} "
            f"| {per_run[0]:.2f} vs {per_run[1]:.2f} | {per_run[0] / per_run[1]:.2f} |"
        )


def _tree_cpu(client: SandboxClient) -> float:
    """CPU seconds of a sandbox process and its lanes, with the runs each has reaped (/proc/<pid>/stat: utime,
    stime, cutime, cstime). Runs are reaped before their reply is sent, so a call's CPU is in by its reply."""
    pids = [client.proc.pid] if client.proc is not None else []
    pids += list(client.hello.get("lanes") or [])
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="measured runs per workload and level (default 200)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first (default 5)")
    parser.add_argument("--uid", type=int, default=199_990, help="the jail uid and gid (default 199990)")
    parser.add_argument("--no-userns", dest="userns", action="store_false", help="skip the uid-65534 level")
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
    print_report(m, args.n)
    print(f"\n(total bench time {time.monotonic() - started:.0f} s)")
    if args.json:
        raw = {
            "samples": {f"{w} | {lv}": v for (w, lv), v in m["samples"].items()},
            "floors": m["floors"],
            "cpu": m["cpu"],
        }
        args.json.write_text(json.dumps(raw, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
