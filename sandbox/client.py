"""Used by the worker: start the sandbox process, send it requests, restart it when it dies.

The sandbox process is started with ``python -I`` (no environment-driven imports, no user site), an environment
built from scratch (nothing of the worker's, so none of its secrets), no inherited descriptors beyond its two
pipes, and the parent-death signal. ``call`` bounds every request by its wall-clock limit plus a margin; a sandbox
that dies, hangs or answers garbage is killed, the request in flight fails with ``SandboxError``, and the next
call starts a fresh one.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
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


class SandboxError(Exception):
    """The sandbox could not answer this request (it died, hung, or is unavailable on this machine)."""


class SandboxClient:
    """One sandbox process per worker process; not thread-safe (a worker is single-threaded)."""

    def __init__(self, root: str | os.PathLike[str], uid: int, gid: int, allow_weak: bool = False) -> None:
        self.root, self.uid, self.gid, self.allow_weak = Path(root), uid, gid, allow_weak
        self.proc: subprocess.Popen[bytes] | None = None
        self.hello: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self.starts = 0

    def start(self) -> dict[str, Any]:
        """Start (or restart) the sandbox process; returns its hello frame (layers, weak, ok, error)."""
        self.close()
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-I", "-c", _BOOT, _PACKAGE_PARENT, "--root", str(self.root),
                "--uid", str(self.uid), "--gid", str(self.gid), "--parent-pid", str(os.getpid())]  # fmt: skip
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
            self.close()
            raise SandboxError(f"sandbox process failed to start: {exc}") from None
        return self.hello

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and wait for its answer (bounded by its wall limit + MARGIN)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if not self.hello.get("ok"):
            raise SandboxError(f"sandbox unavailable: {self.hello.get('error')}")
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        request = {**request, "id": next(self._ids)}
        try:
            encode_frame(request)  # a request that cannot be sent is the caller's problem, not the sandbox's
        except ProtocolError as exc:
            raise SandboxError(f"request cannot be sent: {exc}") from None
        wall = (request.get("limits") or {}).get("wall_seconds", DEFAULT_LIMITS["wall_seconds"])
        if isinstance(wall, bool) or not isinstance(wall, (int, float)) or not math.isfinite(wall):
            wall = DEFAULT_LIMITS["wall_seconds"]  # the sandbox refuses it; only our own wait needs a bound
        deadline = time.monotonic() + min(float(wall), float(MAX_LIMITS["wall_seconds"])) + MARGIN
        try:
            write_frame(self.proc.stdin.fileno(), request, deadline)
            reply = read_frame(self.proc.stdout.fileno(), deadline)
        except ProtocolError as exc:
            self.close()
            raise SandboxError(f"sandbox process failed during the request ({exc}); it will be restarted") from None
        if reply.get("id") != request["id"]:
            self.close()
            raise SandboxError("sandbox answered out of order; it will be restarted")
        return reply

    def close(self) -> None:
        """Stop the sandbox process (its runs die with it: they carry the parent-death signal)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
