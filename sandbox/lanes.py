"""Concurrent runs: the sandbox process hands each request to a lane and relays the answers by request id.

    worker ══ frames ══▶ sandbox process (``Dispatcher``: one poll loop, no threads; it runs nothing itself)
                           ├── ping: answered here
                           ├─ pipes ─▶ lane 0: one request at a time, each run cloned by jail.py
                           ├─ pipes ─▶ lane 1
                           └─ ...      up to --lanes (at most policy.MAX_LANES); further requests wait in line here

A lane is a fork of the sandbox process, made after its start-up and probe, so it is confined the same way
(non-dumpable, no-new-privs, no core file, no worker secret) and dies with it (parent-death signal). It answers
requests with the same ``Server.handle`` a single sandbox used: whatever one run may do, it does in a lane exactly
as before. What keeps concurrent runs apart:

- each lane lives in a run cgroup of its own (``RunGroups.move_home``): a run's memory, process and CPU limits, its
  CPU accounting and the kill at its budget hold that run's tree alone;
- as root, each lane's runs have a uid of their own (``--uid`` + lane number): RLIMIT_NPROC counts per uid, so a
  run forking up to its limit cannot make a concurrent run's fork fail, and no run can signal another's
  processes (unprivileged, each lane has a user namespace of its own);
- each lane has a network namespace of its own, which its runs share one after another (``jail.share_namespaces``:
  a run's processes are all gone before the next run starts); the mount, PID and UTS namespaces are per run,
  and Landlock scopes signals and abstract sockets to the run.

Lanes start as requests need them, the first one at start-up. A lane that dies (a bug of ours: runs never execute
in the lane itself) loses its request, answered ``{"ok": false, "lost": true}`` (the client raises
``SandboxError``), and a new lane takes its place at the next request.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import jail
from .linux import JailError
from .protocol import ProtocolError, decode_payload, read_frame, read_payload, write_frame, write_payload

if TYPE_CHECKING:
    from .__main__ import Server

_PR_SET_PDEATHSIG = 1
FRAME_WAIT = 30.0  # a frame that has begun must be whole within this (the peers write frames in one go)


@dataclass
class Lane:
    """One lane as the dispatcher sees it: its pid, its pipes, and the request it holds (None: idle)."""

    number: int
    pid: int
    to_lane: int
    from_lane: int
    holding: Any = None


class Dispatcher:
    """Reads requests from the worker (fd 0), hands each to an idle lane, writes their answers back (fd 1)."""

    def __init__(self, server: Server, lanes: int) -> None:
        self.server = server
        self.cap = lanes
        self.lanes: dict[int, Lane] = {}  # by the fd its answers come on
        self.waiting: deque[tuple[Any, bytes]] = deque()  # (id, the request frame as received)
        self.poller = select.poll()
        self.poller.register(0, select.POLLIN)

    def start(self) -> None:
        """The first lane, before the hello: a worker's first run does not pay for a fork."""
        self._spawn()

    def pids(self) -> list[int]:
        return [lane.pid for lane in sorted(self.lanes.values(), key=lambda lane: lane.number)]

    def run(self) -> None:
        """Serve until the worker closes its pipe (or sends garbage); then stop every lane."""
        try:
            while True:
                for fd, _ in self.poller.poll():
                    if fd == 0:
                        if not self._request():
                            return
                    elif (lane := self.lanes.get(fd)) is not None:  # (None: dropped earlier in this round)
                        self._answer(lane)
                self._assign()
        finally:
            self.stop()

    def stop(self) -> None:
        for lane in list(self.lanes.values()):
            self._drop(lane, kill=True)

    # ---- requests and answers ------------------------------------------------------------------------------

    def _request(self) -> bool:
        try:
            payload = read_payload(0, time.monotonic() + FRAME_WAIT)
            frame = decode_payload(payload)
        except ProtocolError as exc:
            if "before a frame" not in str(exc):
                print(f"sandbox: bad request frame, closing: {exc}", file=sys.stderr)
            return False
        if frame.get("kind") == "ping":  # no run: answered here, with the lanes' pids
            self._reply({**self.server.handle(frame), "lanes": self.pids()})
        else:  # relayed as received: the lane reads it exactly as a single sandbox would have
            self.waiting.append((frame.get("id"), payload))
        return True

    def _assign(self) -> None:
        while self.waiting:
            lane = next((x for x in sorted(self.lanes.values(), key=lambda x: x.number) if x.holding is None), None)
            if lane is None and len(self.lanes) < self.cap:
                lane = self._spawn()
            if lane is None:
                return  # every lane is busy: the request waits in line
            lane.holding, payload = self.waiting.popleft()
            try:
                write_payload(lane.to_lane, payload, time.monotonic() + FRAME_WAIT)
            except ProtocolError as exc:
                self._lost(lane, f"a sandbox lane failed: {exc}")

    def _answer(self, lane: Lane) -> None:
        try:
            payload = read_payload(lane.from_lane, time.monotonic() + FRAME_WAIT)
        except ProtocolError as exc:
            self._lost(lane, f"a sandbox lane failed during the request: {exc}")
            return
        try:
            rid = decode_payload(payload).get("id")
        except ProtocolError as exc:
            self._lost(lane, f"a sandbox lane answered garbage: {exc}")
            return
        if type(rid) is not type(lane.holding) or rid != lane.holding:
            self._lost(lane, f"a sandbox lane answered request {rid!r} while holding {lane.holding!r}")
            return
        lane.holding = None
        write_payload(1, payload)  # (the lane made it a frame: under the size limit)

    def _reply(self, reply: dict[str, Any]) -> None:
        try:
            write_frame(1, reply)
        except ProtocolError as exc:  # a reply over the frame limit: say so instead of dying
            write_frame(1, {"id": reply.get("id"), "ok": False, "error": f"sandbox reply too large: {exc}"})

    def _lost(self, lane: Lane, why: str) -> None:
        held = lane.holding
        self._drop(lane, kill=True)
        print(f"sandbox: lane {lane.number} (pid {lane.pid}) lost: {why}", file=sys.stderr)
        if held is not None:
            self._reply({"id": held, "ok": False, "lost": True, "error": why})

    # ---- lanes -------------------------------------------------------------------------------------------

    def _spawn(self) -> Lane:
        number = min(set(range(self.cap)) - {lane.number for lane in self.lanes.values()})
        to_r, to_w = os.pipe2(os.O_CLOEXEC)
        from_r, from_w = os.pipe2(os.O_CLOEXEC)
        ours = [fd for lane in self.lanes.values() for fd in (lane.to_lane, lane.from_lane)] + [to_w, from_r]
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the lane
            code = 1
            try:
                code = _lane(self.server, number, me, to_r, from_w, ours)
            finally:
                os._exit(code)
        os.close(to_r)
        os.close(from_w)
        lane = Lane(number, pid, to_w, from_r)
        self.lanes[from_r] = lane
        self.poller.register(from_r, select.POLLIN)
        return lane

    def _drop(self, lane: Lane, kill: bool) -> None:
        self.lanes.pop(lane.from_lane, None)
        with contextlib.suppress(KeyError, ValueError):
            self.poller.unregister(lane.from_lane)
        for fd in (lane.to_lane, lane.from_lane):
            with contextlib.suppress(OSError):
                os.close(fd)
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.kill(lane.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(lane.pid, 0)


def _lane(server: Server, number: int, parent: int, requests: int, answers: int, foreign: list[int]) -> int:
    """The lane's life: die with the sandbox process, keep only its own pipes (as fds 0 and 1), move into its own
    run group, take its uid, then answer requests one at a time until its pipe closes."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 1  # the sandbox died before we could ask to die with it
    for fd in foreign:
        os.close(fd)
    os.dup2(requests, 0)  # (also closes the worker's pipes, which only the sandbox process reads and writes)
    os.dup2(answers, 1)
    os.close(requests)
    os.close(answers)
    server.uid += number
    server._cleaners = []  # the sandbox process's, not our children
    if server.groups is not None:
        try:
            server.groups.move_home(f"lane-{number}")
        except OSError as exc:
            server.unavailable = f"cannot create the run cgroup of lane {number}: {exc}"
    if not server.weak:
        try:
            jail.share_namespaces()
        except (OSError, JailError) as exc:  # the runs then create their own, as the probe's did
            print(f"sandbox: lane {number} keeps a network namespace per run: {exc}", file=sys.stderr)
    serve(server)
    return 0


def serve(server: Server) -> None:
    """Answer request frames one at a time until the pipe closes (or carries garbage)."""
    while True:
        try:
            frame = read_frame(0)
        except ProtocolError as exc:
            if "before a frame" not in str(exc):
                print(f"sandbox: bad request frame, closing: {exc}", file=sys.stderr)
            return
        reply = server.handle(frame)
        try:
            write_frame(1, reply)
        except ProtocolError as exc:  # a reply over the frame limit: say so instead of dying
            write_frame(1, {"id": reply.get("id"), "ok": False, "error": f"sandbox reply too large: {exc}"})
