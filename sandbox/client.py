"""Used by the worker: start the sandbox process, send it requests from any thread, restart it when it dies.

The sandbox process is started with ``python -I`` (no environment-driven imports, no user site), an environment
built from scratch (nothing of the worker's, so none of its secrets) and no inherited descriptors beyond its two
pipes; it stops when its input closes (the worker closed it, or died). ``call`` bounds every request by its
wall-clock limit plus a margin; a sandbox that dies, hangs or answers garbage is killed, the requests in flight
fail with ``SandboxError``, and the next call starts a fresh one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .policy import DEFAULT_LIMITS, MAX_LIMITS
from .protocol import ProtocolError, encode_frame, read_frame, write_frame

_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import runpy; runpy.run_module('sandbox', run_name='__main__')"
)
START_TIMEOUT = 30.0  # the first start probes every layer with a real confined run
MARGIN = 3.0  # seconds on top of a request's wall limit for setup, teardown and the pipes
FRAME_WAIT = 30.0  # an answer that has begun must be whole within this
CLOSE_WAIT = 1.0  # seconds a closed sandbox gets to stop its lanes and remove its groups before it is killed
_LARGEST_ID = 2**63  # what a request's size is checked with: the id it will carry is never longer


class SandboxError(Exception):
    """The sandbox could not answer this request (it died, hung, or is unavailable on this machine)."""


class _Waiter:
    """One request waiting for its answer (set by the reader thread)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: dict[str, Any] | None = None
        self.error = ""


class SandboxClient:
    """One sandbox process per worker process, shared by the worker's threads: up to ``lanes`` requests run at
    once (each in a lane of the sandbox, lanes.py), at most ``lanes - 1`` of them for one bot (the request's
    ``scope``); further calls wait in line here, each bounded by its own budget (then the run gets its own).

    Requests go out whole under a lock; one reader thread per sandbox process reads the answers and hands each to
    the call waiting for its id. A sandbox that dies or answers garbage fails every call in flight
    (``SandboxError``); one that misses a call's deadline is killed (it is hung: its lanes enforce the runs' wall
    limits themselves), which fails the others in flight too. The next call starts a fresh sandbox."""

    def __init__(
        self, root: str | os.PathLike[str], uid: int, gid: int, allow_weak: bool = False, lanes: int = 1
    ) -> None:
        self.root, self.uid, self.gid, self.allow_weak = Path(root), uid, gid, allow_weak
        self.lanes = lanes
        self.proc: subprocess.Popen[bytes] | None = None
        self.hello: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self.starts = 0
        self._lock = threading.Lock()  # the process's life cycle, and writing a request
        self.per_owner = max(1, lanes - 1)  # one bot's calls at once
        self._line = threading.Condition()  # calls beyond the lanes (or beyond their bot's share) wait here
        self._running = 0
        self._owners: dict[str, int] = {}
        self._pending: dict[int, _Waiter] = {}
        self._pending_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._failed: subprocess.Popen[bytes] | None = None  # the last process whose reader gave up

    def start(self) -> dict[str, Any]:
        """Start (or restart) the sandbox process; returns its hello frame (layers, weak, ok, error, lanes)."""
        with self._lock:
            return self._start()

    def _start(self) -> dict[str, Any]:
        self._close()
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-I", "-c", _BOOT, _PACKAGE_PARENT, "--root", str(self.root),
                "--uid", str(self.uid), "--gid", str(self.gid), "--parent-pid", str(os.getpid())]  # fmt: skip
        if self.lanes != 1:  # (its default: a sandbox from before lanes still starts, for bench --compare)
            argv += ["--lanes", str(self.lanes)]
        if self.allow_weak:
            argv.append("--allow-weak")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            close_fds=True,
            cwd="/",
        )
        self.starts += 1
        try:
            assert self.proc.stdout is not None
            self.hello = read_frame(self.proc.stdout.fileno(), time.monotonic() + START_TIMEOUT)
        except ProtocolError as exc:
            self._close()
            raise SandboxError(f"sandbox process failed to start: {exc}") from None
        self._reader = threading.Thread(target=self._read, args=(self.proc,), name="sandbox-reader", daemon=True)
        self._reader.start()
        return self.hello

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer: bounded by its wall limit + MARGIN, once it has a lane (the
        wait in line is bounded the same way)."""
        try:  # a request that cannot be sent is the caller's problem, not the sandbox's (sized with its id)
            encode_frame({**request, "id": _LARGEST_ID})
        except ProtocolError as exc:
            raise SandboxError(f"request cannot be sent: {exc}") from None
        wall = (request.get("limits") or {}).get("wall_seconds", DEFAULT_LIMITS["wall_seconds"])
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall):
            wall = DEFAULT_LIMITS["wall_seconds"]  # the sandbox refuses it; only our own wait needs a bound
        budget = min(float(wall), float(MAX_LIMITS["wall_seconds"])) + MARGIN
        owner = request.get("scope") if isinstance(request.get("scope"), str) else None
        self._enter(owner, budget)
        try:
            return self._call(request, time.monotonic() + budget)
        finally:
            self._leave(owner)

    def _enter(self, owner: str | None, timeout: float) -> None:
        """Wait in line for a lane: at most ``lanes`` calls at once, and at most ``per_owner`` of one bot's (the
        request's scope), so that one bot's slow tools cannot hold every lane while other bots' calls time out."""

        def free() -> bool:
            return self._running < self.lanes and (owner is None or self._owners.get(owner, 0) < self.per_owner)

        with self._line:
            if not self._line.wait_for(free, timeout):
                mine = self._owners.get(owner, 0) if owner else 0
                raise SandboxError(
                    f"the sandbox's {self.lanes} lanes stayed busy for {timeout:g}s"
                    + (f" ({mine} with this bot's runs, at most {self.per_owner})" if mine else "")
                )
            self._running += 1
            if owner is not None:
                self._owners[owner] = self._owners.get(owner, 0) + 1

    def _leave(self, owner: str | None) -> None:
        with self._line:
            self._running -= 1
            if owner is not None:
                self._owners[owner] -= 1
                if not self._owners[owner]:
                    del self._owners[owner]
            self._line.notify_all()

    def _call(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        waiter = _Waiter()
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise SandboxError("the sandbox was being restarted past the request's deadline")
        try:
            proc = self._current()
            rid = next(self._ids)
            while True:  # registered only on a process whose reader has not given up on it (it fails no more)
                with self._pending_lock:
                    if self._failed is not proc:
                        self._pending[rid] = waiter
                        break
                proc = self._current(restart=True)  # (outside the pending lock: a start takes seconds)
            assert proc.stdin is not None
            try:
                write_frame(proc.stdin.fileno(), {**request, "id": rid}, deadline)
            except ProtocolError as exc:
                self._close()
                raise SandboxError(f"sandbox process failed during the request ({exc}); it will be restarted") from None
        finally:
            self._lock.release()
        try:
            if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    if self.proc is proc:
                        self._close()  # hung: its lanes would have answered at the run's own deadline
                raise SandboxError("sandbox process missed the request's deadline; it will be restarted")
        finally:
            with self._pending_lock:
                self._pending.pop(rid, None)
        if waiter.reply is None:
            raise SandboxError(waiter.error)
        if waiter.reply.get("lost"):
            raise SandboxError(str(waiter.reply.get("error")))
        return waiter.reply

    def _current(self, restart: bool = False) -> subprocess.Popen[bytes]:
        """The running sandbox process (started if there is none, or ``restart``); raises if it is unavailable.
        Called with ``_lock`` held."""
        if restart or self.proc is None or self.proc.poll() is not None:
            self._start()
        if not self.hello.get("ok"):
            raise SandboxError(f"sandbox unavailable: {self.hello.get('error')}")
        assert self.proc is not None
        return self.proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        """The reader thread of one sandbox process: each answer to the call waiting for its id. It alone closes
        the process's stdout, when it ends (a descriptor closed under a blocked read could be reused by the next
        sandbox's pipe, and its answers read here)."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        why = "the pipe closed"
        try:
            while self.proc is proc:
                if not poller.poll(250):
                    continue  # (checks now and then that this process is still the current one)
                reply = read_frame(fd, time.monotonic() + FRAME_WAIT)
                rid = reply.get("id")
                with self._pending_lock:
                    waiter = self._pending.pop(rid, None) if type(rid) is int else None
                if waiter is None:
                    why = f"it answered a request nobody asked ({rid!r})"
                    break
                waiter.reply = reply
                waiter.done.set()
        except Exception as exc:  # whatever it was, the calls in flight must hear of it
            why = str(exc) or type(exc).__name__
        finally:
            if proc.poll() is None:
                proc.kill()  # gone wrong: this process cannot be trusted with another request
            proc.stdout.close()
        with self._pending_lock:
            self._failed = proc  # (a call about to register on it restarts instead)
            for waiter in self._pending.values():
                if not waiter.done.is_set():
                    waiter.error = f"sandbox process failed during the request ({why}); it will be restarted"
                    waiter.done.set()

    def close(self) -> None:
        """Stop the sandbox process: the end of its input asks it to stop its lanes and remove its run cgroups
        (up to CLOSE_WAIT), then it is killed (its lanes and runs die with it: they carry parent-death signals)."""
        with self._lock:
            if self.proc is not None and self.proc.stdin is not None:
                self.proc.stdin.close()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(CLOSE_WAIT)
            self._close()

    def _close(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not threading.current_thread():
            reader.join(1.0)  # it sees the end of the pipe, or that the process is not current any more
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        if reader is None and proc.stdout is not None:  # (no reader: the start failed)
            proc.stdout.close()
