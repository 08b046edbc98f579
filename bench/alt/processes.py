"""The processes of one system under comparison (``bench/compare.py``): start its command lines, pause and resume
them, their CPU seconds (reaped children included) and their PSS, and stop them as their operators would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import psutil

from . import ROOT, System


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [float(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0.0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Fleet:
    """The processes of one system's command lines, each in its own session (so a stuck one can be killed whole)."""

    def __init__(self, system: System, procs: int, env: dict[str, str], logdir: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = logdir / f"{system.name}-{uuid.uuid4().hex[:6]}.log"
        with open(self.log, "wb") as out:
            for argv in system.commands(procs):
                self.procs.append(
                    subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
                )

    @property
    def roots(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; see {self.log}")

    def signal_all(self, sig: signal.Signals) -> None:
        """Send a signal to every process of the fleet's trees (SIGSTOP/SIGCONT: pause and resume it)."""
        for proc in tree(self.roots):
            with suppress(psutil.Error):
                proc.send_signal(sig)

    def stop(self, grace: float = 15.0) -> tuple[list[int], str]:
        """SIGTERM to each command line's process (a warm stop, as its operator would ask); a second SIGTERM (a cold
        stop, for each of these systems) to those still running after ``grace`` seconds, then SIGKILL to the
        session. Returns the exit codes and, if the first SIGTERM was not enough, what it took."""
        self.signal_all(signal.SIGCONT)  # (never leave a paused process behind)
        took = ""
        for sig, name in ((signal.SIGTERM, ""), (signal.SIGTERM, "a second SIGTERM"), (signal.SIGKILL, "SIGKILL")):
            alive = [p for p in self.procs if p.poll() is None]
            if not alive:
                break
            took = name
            for p in alive:
                with suppress(ProcessLookupError):
                    if sig == signal.SIGKILL:
                        os.killpg(p.pid, sig)
                    else:
                        p.send_signal(sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                time.sleep(0.05)
        codes = [p.wait() for p in self.procs]
        note = f"{took} needed {grace:g}s after SIGTERM ({self.log})" if took else ""
        return codes, note


def tree(roots: list[int | None]) -> list[psutil.Process]:
    out = []
    for pid in roots:
        if pid is None:
            continue
        with suppress(psutil.Error):
            root = psutil.Process(pid)
            out += [root, *root.children(recursive=True)]
    return out


def cpu_seconds(roots: list[int | None]) -> dict[int, float]:
    """CPU seconds per pid of the trees, each with its reaped children's (RQ's work horses, PostgreSQL backends of
    closed connections); a child reaped during a window brings its whole life's CPU in, a small overcount."""
    out: dict[int, float] = {}
    for proc in tree(roots):
        with suppress(psutil.Error):
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system + t.children_user + t.children_system
    return out


def cpu_snapshot(groups: dict[str, list[int | None]]) -> dict[str, Any]:
    busy = machine_busy()
    snap: dict[str, Any] = {name: cpu_seconds(roots) for name, roots in groups.items()}
    own = psutil.Process().cpu_times()
    snap["bench"] = {os.getpid(): own.user + own.system}
    snap["machine"] = busy
    return snap


def cpu_used(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    out = {
        name: sum(max(0.0, t - before[name].get(pid, 0.0)) for pid, t in pids.items())
        for name, pids in after.items()
        if name != "machine"
    }
    out["machine"] = after["machine"] - before["machine"]
    out["other"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
    return out


def pss_mib(roots: list[int]) -> float:
    """Proportional set size of every process of the trees: shared pages split between their sharers."""
    total = 0
    for proc in tree(list(roots)):
        with suppress(OSError), open(f"/proc/{proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
    return total / 1024
