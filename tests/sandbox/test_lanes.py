"""Concurrent runs in one sandbox process (lanes.py): how many at once, kept apart, and a lane that dies.

Overlap is observed, not timed: a sampler reads which lane group (``lane-<n>``) each run process is in while the
calls are in flight. Runs here are ``tail -c 1 /dev/zero``, which runs until the sandbox kills it at its wall limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sandbox import client as client_module
from sandbox import policy
from sandbox.client import SandboxClient, SandboxError

import kit

UID, GID = kit.JAIL_UID + 10, kit.JAIL_GID
_LANE = re.compile(r"/sandbox-\d+(?:\.\d+)?/lane-(\d+)$", re.MULTILINE)
LONG = {"kind": "shell", "command": "tail -c 1 /dev/zero", "params": {}, "limits": {"wall_seconds": 1.5}}


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sandbox-lanes-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _client(root: Path, lanes: int) -> SandboxClient:
    client = SandboxClient(root, UID, GID, lanes=lanes)
    assert client.start()["ok"], client.hello
    return client


def _runs_by_lane() -> dict[int, list[int]]:
    """Run processes (not the lanes themselves) by the lane whose group they are in."""
    found: dict[int, list[int]] = {}
    for pid in kit.run_processes():
        try:
            group = _LANE.search(Path(f"/proc/{pid}/cgroup").read_text())
        except OSError:
            continue
        if group:
            found.setdefault(int(group.group(1)), []).append(pid)
    return found


class Sampler:
    """Watches the lanes' runs until stopped: the most lanes busy at once, and the uids seen in each lane."""

    def __init__(self) -> None:
        self.most = 0
        self.uids: dict[int, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            busy = _runs_by_lane()
            self.most = max(self.most, len(busy))
            for lane, pids in busy.items():
                for pid in pids:
                    try:
                        uid = Path(f"/proc/{pid}/status").read_text().split("\nUid:\t")[1].split()[0]
                    except (OSError, IndexError):
                        continue
                    self.uids.setdefault(lane, set()).add(int(uid))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _many(client: SandboxClient, requests: list[dict[str, Any]]) -> list[Any]:
    def one(request: dict[str, Any]) -> Any:
        try:
            return client.call(request)
        except SandboxError as exc:
            return exc

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def test_runs_overlap_up_to_the_lanes_and_the_rest_wait_in_line(root: Path) -> None:
    client = _client(root, lanes=3)
    sampler = Sampler()
    try:
        replies = _many(client, [LONG] * 6)
    finally:
        sampler.stop()
        client.close()
    assert all(isinstance(r, dict) and r["killed"] == "wall_time" for r in replies), replies
    assert sampler.most == 3, f"{sampler.most} lanes were busy at once, not 3"
    assert not kit.leftovers()


def test_each_lane_has_its_own_run_group_and_as_root_its_own_uid(root: Path) -> None:
    client = _client(root, lanes=2)
    sampler = Sampler()
    try:
        replies = _many(client, [LONG] * 2)
        lanes = client.call({"kind": "ping"})["lanes"]
        for number, pid in enumerate(lanes):
            group = _LANE.search(Path(f"/proc/{pid}/cgroup").read_text())
            assert group and int(group.group(1)) == number, f"lane {number} (pid {pid}) is not in lane-{number}"
    finally:
        sampler.stop()
        client.close()
    assert all(r["killed"] == "wall_time" for r in replies), replies
    assert set(sampler.uids) == {0, 1}, sampler.uids
    if kit.ROOT_MODE:  # a uid per lane (the jail's keeper and init are root): RLIMIT_NPROC holds each run alone
        assert {lane: uids - {0} for lane, uids in sampler.uids.items()} == {0: {UID}, 1: {UID + 1}}, sampler.uids
    else:  # each run in a user namespace of its own, all of them our uid on the host
        assert sampler.uids == {0: {os.getuid()}, 1: {os.getuid()}}, sampler.uids


def test_a_lane_that_dies_loses_its_own_run_only(root: Path) -> None:
    client = _client(root, lanes=2)
    try:
        sandbox = client.proc.pid if client.proc else 0
        victim = client.hello["lanes"][0]  # an idle sandbox hands the next run to lane 0
        threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
        first, second = _many(client, [{**LONG, "limits": {"wall_seconds": 2}}, LONG])
        assert isinstance(first, SandboxError) and "lane" in str(first), first
        assert isinstance(second, dict) and second["killed"] == "wall_time", second
        assert client.proc is not None and client.proc.pid == sandbox  # the sandbox process itself lives on
        reply = client.call({"kind": "script", "source": "result = 6 * 7", "params": {}})
        assert reply["ok"] and reply["result"] == 42
        assert victim not in client.call({"kind": "ping"})["lanes"]
    finally:
        client.close()
    assert not kit.leftovers()


def test_many_threads_share_one_client_and_each_gets_its_own_answer(root: Path) -> None:
    client = _client(root, lanes=4)
    script = "result = {'n': params['n'], 'double': params['n'] * 2}"
    try:
        requests = [{"kind": "script", "source": script, "params": {"n": n}} for n in range(40)]
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(client.call, requests))
    finally:
        client.close()
    assert [r["result"] for r in replies] == [{"n": n, "double": 2 * n} for n in range(40)]
    assert client.starts == 1


# ---- a run that broke every Python-level check (the threat model allows it) ---------------------------------------

# The sandbox started with script.run_script replaced: a source starting with "#RAW" runs as plain Python in the jail
# (after every OS layer, as an escape from RestrictedPython would), and the dict it leaves in `reply` is what the
# run writes on its result pipe.
_COMPROMISED_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1))\n"
    "import sandbox.script as s\n"
    "real = s.run_script\n"
    "def fake(source, params, **kw):\n"
    "    if source.startswith('#RAW'):\n"
    "        g = {'params': params}; exec(source, g); return g['reply']\n"
    "    return real(source, params, **kw)\n"
    "s.run_script = fake\n"
    "import runpy; runpy.run_module('sandbox', run_name='__main__')"
)


@pytest.mark.parametrize("forged", [1, 1.0, True, [1], None, "1"])
def test_a_run_cannot_address_its_answer_to_another_call(
    root: Path, monkeypatch: pytest.MonkeyPatch, forged: Any
) -> None:
    """A run's result may not set the reply's id (nor say it was lost): the victim gets its own answer, the
    attacker its own call's, and nothing else in flight fails. (Found by a review: once, a run's "id" replaced the
    real one, and a malformed one killed every call in flight.)"""
    monkeypatch.setattr(client_module, "_BOOT", _COMPROMISED_BOOT)
    client = _client(root, lanes=2)
    try:
        pid = client.proc.pid if client.proc else 0
        attack = {"kind": "script", "params": {"forged": forged},
                  "source": "#RAW\nreply = {'id': params['forged'], 'lost': True, 'ok': True, 'result': 'FORGED'}"}  # fmt: skip
        with ThreadPoolExecutor(2) as pool:
            victim = pool.submit(client.call, LONG)
            time.sleep(0.5)  # the victim (id 1) is running in lane 0
            mine = client.call(attack)
            theirs = victim.result(10)
        assert mine["ok"] and mine["result"] == "FORGED" and "lost" not in mine, mine
        assert theirs["killed"] == "wall_time" and "result" not in theirs, theirs
        assert client.proc is not None and client.proc.pid == pid and client.starts == 1
    finally:
        client.close()


def test_one_bot_cannot_hold_every_lane(root: Path) -> None:
    """Two lanes: a bot's second slow run waits in line, and another bot's call runs meanwhile."""
    client = _client(root, lanes=2)
    slow = {**LONG, "scope": "bot-a"}
    quick = {"kind": "script", "source": "result = 1", "params": {}, "scope": "bot-b"}
    done: dict[str, float] = {}

    def timed(name: str, request: dict[str, Any]) -> None:
        client.call(request)
        done[name] = time.monotonic()

    try:
        with ThreadPoolExecutor(3) as pool:
            pool.submit(timed, "a1", slow)
            time.sleep(0.2)
            pool.submit(timed, "a2", slow)
            time.sleep(0.2)
            pool.submit(timed, "b", quick)
    finally:
        client.close()
    assert done["b"] < done["a1"] < done["a2"], done  # b did not wait for a lane that bot a held twice


def test_a_request_at_the_frame_limit_is_refused_without_harm(root: Path) -> None:
    client = _client(root, lanes=2)
    try:
        pid = client.proc.pid if client.proc else 0
        base = {"kind": "script", "source": "result = 1", "params": {"pad": ""}}
        size = len(json.dumps({**base, "id": 1}, separators=(",", ":")))
        # Fits without its id, not with it.
        request = {**base, "params": {"pad": "x" * (policy.MAX_FRAME_BYTES - size)}}
        with pytest.raises(SandboxError, match="cannot be sent"):
            client.call(request)
        assert client.call({"kind": "script", "source": "result = 2", "params": {}})["result"] == 2
        assert client.proc is not None and client.proc.pid == pid
    finally:
        client.close()


def test_a_sandbox_started_by_a_thread_that_ends_lives_on(root: Path) -> None:
    """Any worker thread may (re)start the sandbox; the sandbox must not die with that thread."""
    client = SandboxClient(root, UID, GID, lanes=2)
    try:
        starter = threading.Thread(target=client.start)
        starter.start()
        starter.join(30)
        time.sleep(0.3)
        assert client.proc is not None and client.proc.poll() is None
        assert client.call({"kind": "script", "source": "result = 3", "params": {}})["result"] == 3
        assert client.starts == 1
    finally:
        client.close()


def test_stale_run_directories_do_not_cost_a_lane_its_first_request(root: Path) -> None:
    """A weak sandbox killed mid-run leaves ROOT/runs/<pid>-...; the sweep at start-up removes it in a child process
    of the sandbox, which its lanes must not try to reap."""
    (root / "runs").mkdir(mode=0o711)
    (root / "runs" / "999999999-stale").mkdir()
    client = _client(root, lanes=2)
    try:
        replies = _many(client, [{"kind": "script", "source": "result = 4", "params": {}}] * 2)
        assert [r["result"] for r in replies] == [4, 4], replies
        assert client.starts == 1
    finally:
        client.close()


def test_a_closed_sandbox_leaves_no_run_cgroup(root: Path) -> None:
    client = _client(root, lanes=2)
    _many(client, [LONG] * 2)
    pid = client.proc.pid if client.proc else 0
    client.close()
    groups = [line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()]
    groups += [os.path.dirname(g) for g in groups]  # (v2: we may have been moved into a "service" leaf)
    mounts = ("/sys/fs/cgroup", *(f"/sys/fs/cgroup/{c}" for c in ("memory", "pids", "cpu", "cpu,cpuacct")))
    left = [f"{m}{g}/sandbox-{pid}" for m in mounts for g in groups if os.path.isdir(f"{m}{g}/sandbox-{pid}")]
    assert not left, left
