"""Concurrent runs in one sandbox process (lanes.py): how many at once, kept apart, and a lane that dies.

Overlap is observed, not timed: a sampler reads which lane group (``lane-<n>``) each run process is in while the
calls are in flight. Runs here are ``tail -c 1 /dev/zero``, which runs until the sandbox kills it at its wall limit.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

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
