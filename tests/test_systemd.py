"""The systemd unit as shipped, and what the supervisor tells systemd.

Under an emulation of the unit's confinement (``tests/unit_confinement.py``: its user, delegated cgroup, private
user namespace, empty bounding set, no-new-privs, private /proc and its seccomp filters), every sandbox layer holds
and a worker answers a message with a sandboxed tool.

The unit passes `systemd-analyze verify` and rates at most 2.0 in `systemd-analyze security` (systemd 252, the
Debian 12 package); its stop timeout covers a warm stop that lets a reply in progress finish; the worker reads the
settings file itself (so a reload re-reads it); `systemd-sysusers` makes its user. A real supervisor speaks the
notification protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) to a datagram socket standing in for
systemd's, and takes those variables out of the environment its workers inherit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from unit_confinement import service_directives

from botworker.config import Config, load_config
from botworker.notify import Notifier
from botworker.queue import ERRORS, RESPONSES
from botworker.supervisor import Slot, Supervisor
from botworker.worker import Heartbeat

from conftest import ROOT, Bot, Fleet, events, push, wait_for
from toolkit import add_tool

UNIT = ROOT / "systemd" / "botworker.service"
SYSUSERS = ROOT / "systemd" / "botworker.sysusers"
ENV_EXAMPLE = ROOT / "systemd" / "botworker.env.example"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is missing (Debian package systemd)")
CONFINE = ROOT / "tests" / "unit_confinement.py"
SERVICE_UID = SERVICE_GID = 64_999  # tests/sandbox/service_user.py's
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the emulation of the unit starts as root (CI does)")


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value.strip())
    assert match, value
    return int(match[1]) * (60 if match[2] == "min" else 1)


@needs_analyze
def test_the_unit_verifies_cleanly(tmp_path: Path) -> None:
    """`verify` checks that ExecStart's program exists: point it at this checkout's entry point."""
    entry = Path(sys.executable).parent / "botworker"
    assert entry.is_file(), entry
    text = UNIT.read_text().replace("/opt/botworker/venv/bin/botworker", str(entry))
    text = text.replace("WorkingDirectory=/opt/botworker", f"WorkingDirectory={tmp_path}")
    unit = tmp_path / "botworker.service"
    unit.write_text(text)
    done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done


@needs_analyze
def test_the_unit_rates_at_most_2_0_in_systemd_analyze_security() -> None:
    done = subprocess.run(
        [ANALYZE, "security", "--offline=true", str(UNIT)], capture_output=True, text=True, timeout=60
    )
    found = re.search(r"Overall exposure level for botworker\.service: (\d+\.\d)", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr
    assert float(found[1]) <= 2.0, done.stdout


def test_a_warm_stop_under_the_unit_lets_a_reply_in_progress_finish() -> None:
    """GRACEFUL_TIMEOUT (default and the example file's) is at least LLM_DEADLINE, and the unit's stop timeout
    leaves the supervisor time beyond it to requeue what is left."""
    unit = service_directives()
    stop = _seconds(unit["TimeoutStopSec"][-1])
    defaults = load_config(environ={}, env_file=None)
    example = load_config(environ={}, env_file=ENV_EXAMPLE)
    for cfg in (defaults, example):
        assert cfg.llm_deadline <= cfg.graceful_timeout <= stop - 10, (cfg.graceful_timeout, stop)
        assert cfg.warnings() == []
    assert unit["KillSignal"] == ["SIGTERM"] and unit["KillMode"] == ["mixed"]


def test_the_unit_has_the_worker_read_its_settings_file_so_that_a_reload_rereads_it() -> None:
    unit = service_directives()
    assert "EnvironmentFile" not in unit
    assert unit["ExecStart"][-1].split()[1:] == ["run", "--env-file", "/etc/botworker/botworker.env"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"] and _seconds(unit["WatchdogSec"][-1]) > 0


def test_the_units_user_is_made_by_sysusers(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is missing (Debian package systemd)")
    (tmp_path / "etc").mkdir()
    done = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    user = next(line for line in (tmp_path / "etc/passwd").read_text().splitlines() if line.startswith("botworker:"))
    _, _, uid, gid, _, home, shell = user.split(":")
    assert int(uid) < 1000 and int(gid) < 1000 and home == "/var/lib/botworker" and shell == "/usr/sbin/nologin"
    assert service_directives()["User"] == ["botworker"] and service_directives()["StateDirectory"] == ["botworker"]


def test_graceful_timeout_below_the_llm_deadline_is_warned_about() -> None:
    warned = load_config(environ={"GRACEFUL_TIMEOUT": "30"}, env_file=None).warnings()
    assert len(warned) == 1 and "GRACEFUL_TIMEOUT=30" in warned[0] and "LLM_DEADLINE=60" in warned[0]


# ---- the notification protocol ----------------------------------------------------------------------------------


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a datagram socket in the test's directory."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str = "1", timeout: float = 20.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.seen.append(message)
            if message.get(key) == value:
                return message
        raise AssertionError(f"no {key}={value} from the supervisor; seen {self.seen}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify")
    yield fake
    fake.close()


def test_the_supervisor_tells_systemd_when_it_is_ready_alive_reloading_and_stopping(
    start_fleet: Callable[..., Fleet], systemd: FakeSystemd
) -> None:
    fleet = start_fleet(2, wait=False, NOTIFY_SOCKET=systemd.path, WATCHDOG_USEC="1000000")
    ready = systemd.wait_for("READY")
    assert ready["MAINPID"] == str(fleet.proc.pid) and ready["STATUS"].startswith("2 worker(s), 0/"), ready
    # READY only once the workers have booted: by now both are in the node's list
    assert len(fleet.wait_workers(2, timeout=5)) == 2
    first = systemd.wait_for("WATCHDOG")
    started = time.monotonic()
    systemd.wait_for("WATCHDOG", timeout=3)  # every half of WATCHDOG_USEC
    assert first and time.monotonic() - started < 2
    fleet.signal(signal.SIGHUP)
    systemd.wait_for("RELOADING")
    systemd.wait_for("READY")
    fleet.signal(signal.SIGTERM)
    assert systemd.wait_for("STOPPING")["STATUS"].startswith("warm stop")
    assert fleet.wait() == 0


def test_the_watchdog_is_fed_only_while_workers_beat(make_cfg: Callable[..., Config]) -> None:
    """No worker, or one silent past WORKER_TIMEOUT that is not yet being killed: systemd gets no WATCHDOG=1, so
    a supervisor that stopped looking after its workers is restarted."""
    supervisor = Supervisor(make_cfg(WORKER_TIMEOUT="90"), reload=lambda: make_cfg())
    assert not supervisor._healthy()  # no worker yet
    beating, silent = Heartbeat(2), Heartbeat(2)
    supervisor.slots = {1: Slot(0, 1, beating, time.monotonic(), 2), 2: Slot(1, 2, silent, time.monotonic(), 2)}
    assert supervisor._healthy()
    silent._cells[0] = time.monotonic() - 91  # thread 0 of worker 1 last beat 91 s ago
    assert not supervisor._healthy()
    supervisor.slots[2].killed = True  # being replaced: the rest is healthy again
    assert supervisor._healthy()


def test_without_notify_socket_nothing_is_sent_and_the_variables_are_taken_out() -> None:
    env = {"NOTIFY_SOCKET": "@botworker-test-nowhere", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}
    notifier = Notifier.from_environment(env)
    assert env == {} and notifier.address == "\0botworker-test-nowhere"
    assert notifier.watchdog_every is None  # WATCHDOG_PID names another process
    assert not Notifier.from_environment({}).send(READY="1")
    os_env_before = dict(os.environ)
    Notifier.from_environment()  # the real environment has none of them here: unchanged
    assert dict(os.environ) == os_env_before


# ---- the sandbox and a worker under the unit's confinement ------------------------------------------------------


@pytest.fixture
def service_dir() -> Iterator[Path]:
    """A state directory the service user owns, as StateDirectory= makes one (on a path it can reach)."""
    path = Path(tempfile.mkdtemp(prefix="botworker-unit-"))
    path.chmod(0o755)
    (path / "sandbox").mkdir()
    os.chown(path / "sandbox", SERVICE_UID, SERVICE_GID)
    yield path / "sandbox"
    shutil.rmtree(path, ignore_errors=True)


@needs_analyze
@needs_root
def test_every_sandbox_layer_holds_under_the_units_confinement(service_dir: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(CONFINE), sys.executable, "-m", "sandbox", "check", "--root", str(service_dir),
         "--uid", "199990", "--gid", "199990", "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    failed = [check for check in report["checks"] if not check["ok"]]
    assert report["ok"] and not report["weak"] and not failed, failed
    assert report["mode"].startswith("unprivileged") and report["uid"] == SERVICE_UID
    assert {c["layer"] for c in report["checks"]} >= {"namespaces", "private root", "identity", "capabilities",
                                                       "no_new_privs", "seccomp", "landlock"}  # fmt: skip
    pids = next(c for c in report["checks"] if c["layer"] == "cgroup pids")
    assert "forked 3 more under processes = 4" in pids["detail"], pids  # the lane does not cost the run a process


@needs_analyze
@needs_root
def test_a_worker_under_the_units_confinement_answers_with_a_sandboxed_tool(
    spawn: Callable[..., Fleet], r: redis.Redis, db: Any, bot: Bot, service_dir: Path
) -> None:
    add_tool(db, bot, "counter", "custom_script", {"script": "result = len(params['param1'].split())"})
    r.delete(RESPONSES, ERRORS)
    argv = [sys.executable, str(CONFINE), sys.executable, "-m", "botworker", "run", "--procs", "1", "--env-file", ""]
    fleet = spawn(argv, SANDBOX_ROOT=str(service_dir), SANDBOX_CONCURRENCY="2", WORKER_THREADS="2")
    push(r, bot.message('run the counter on "one two three"'))
    [event] = wait_for(lambda: events(r, RESPONSES) or events(r, ERRORS), 60, "a reply from the confined worker")
    assert "botResponse" in event, (event, fleet.log()[-3000:])
    [call] = [c for c in event["botResponse"]["metadata"]["toolCalls"] if c["tool"] == "counter"]
    assert call["ok"] and call["result"]["result"] == 3, call
    assert "sandbox ready" in fleet.log() and " NO" not in fleet.log() and "WEAK" not in fleet.log(), fleet.log()[
        -3000:
    ]
    fleet.signal(signal.SIGTERM)
    assert fleet.wait(60) == 0, fleet.log()[-3000:]
