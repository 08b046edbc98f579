"""Used by the worker: start the sandbox process, send it requests from any thread, restart it when it dies.

The sandbox process is started with ``python -I`` (no environment-driven imports, no user site), an environment
built from scratch (nothing of the worker's, so none of its secrets), no inherited descriptors beyond its two
pipes, and the parent-death signal. ``call`` bounds every request by its wall-clock limit plus a margin; a sandbox
that dies, hangs or answers garbage is killed, the requests in flight fail with ``SandboxError``, and the next
call starts a fresh one.
"""

from __future__ import annotations

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
    once (each in a lane of the sandbox, lanes.py); further calls wait in line here, bounded by their own deadline.

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
        self._line = threading.BoundedSemaphore(lanes)  # calls beyond the lanes wait here
        self._pending: dict[int, _Waiter] = {}
        self._pending_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> dict[str, Any]:
        """Start (or restart) the sandbox process; returns its hello frame (layers, weak, ok, error, lanes)."""
        with self._lock:
            return self._start()

    def _start(self) -> dict[str, Any]:
        self._close()
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-I", "-c", _BOOT, _PACKAGE_PARENT, "--root", str(self.root),
                "--uid", str(self.uid), "--gid", str(self.gid), "--parent-pid", str(os.getpid()),
                "--lanes", str(self.lanes)]  # fmt: skip
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
        try:
            encode_frame(request)  # a request that cannot be sent is the caller's problem, not the sandbox's
        except ProtocolError as exc:
            raise SandboxError(f"request cannot be sent: {exc}") from None
        wall = (request.get("limits") or {}).get("wall_seconds", DEFAULT_LIMITS["wall_seconds"])
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall):
            wall = DEFAULT_LIMITS["wall_seconds"]  # the sandbox refuses it; only our own wait needs a bound
        budget = min(float(wall), float(MAX_LIMITS["wall_seconds"])) + MARGIN
        if not self._line.acquire(timeout=budget):
            raise SandboxError(f"all {self.lanes} sandbox lanes stayed busy for {budget:g}s")
        try:
            return self._call(request, time.monotonic() + budget)
        finally:
            self._line.release()

    def _call(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        waiter = _Waiter()
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            if not self.hello.get("ok"):
                raise SandboxError(f"sandbox unavailable: {self.hello.get('error')}")
            proc = self.proc
            assert proc is not None and proc.stdin is not None
            rid = next(self._ids)
            with self._pending_lock:
                self._pending[rid] = waiter
            try:
                write_frame(proc.stdin.fileno(), {**request, "id": rid}, deadline)
            except ProtocolError as exc:
                self._close()
                raise SandboxError(f"sandbox process failed during the request ({exc}); it will be restarted") from None
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
                with self._pending_lock:
                    waiter = self._pending.pop(reply.get("id"), None)  # type: ignore[arg-type]
                if waiter is None:
                    why = "it answered a request nobody asked"
                    break
                waiter.reply = reply
                waiter.done.set()
        except (ProtocolError, OSError, ValueError) as exc:
            why = str(exc)
        finally:
            if proc.poll() is None:
                proc.kill()  # gone wrong: this process cannot be trusted with another request
            proc.stdout.close()
        with self._pending_lock:
            for waiter in self._pending.values():
                if not waiter.done.is_set():
                    waiter.error = f"sandbox process failed during the request ({why}); it will be restarted"
                    waiter.done.set()

    def close(self) -> None:
        """Stop the sandbox process (its lanes and runs die with it: they carry the parent-death signal)."""
        with self._lock:
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
        if proc.stdin is not None:
            proc.stdin.close()
        if reader is None and proc.stdout is not None:  # (no reader: the start failed)
            proc.stdout.close()
