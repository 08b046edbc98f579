"""Robustness of the sandbox process itself: malformed frames on its pipes, and a client whose sandbox dies or hangs.

Raw tests start the sandbox exactly as ``client.py`` does and talk to it byte by byte; every read is bounded by a
deadline. Every malformed frame carries (or is cut from) a valid file-write request: if the sandbox ever ran it, a
marker file would appear under ``ROOT/files/victim``. The last two tests hold a run's processes with ptrace to
reproduce, deterministically, a scheduling race that otherwise shows up once in a few hundred tiny-timeout runs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from sandbox import client as client_module
from sandbox import policy
from sandbox.client import MARGIN, SandboxClient, SandboxError
from sandbox.protocol import ProtocolError, read_frame

import kit

CAP = policy.MAX_FRAME_BYTES
VICTIM = {"kind": "file", "op": "write", "path": "ran.txt", "content": "it ran", "scope": "victim"}

UID, GID = kit.JAIL_UID + 1, kit.JAIL_GID + 1


def _payload(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _frame(payload: bytes, length: int | None = None) -> bytes:
    return struct.pack(">I", len(payload) if length is None else length) + payload


def _leftovers() -> list[int]:
    return kit.run_processes()


def _wait_until(predicate: Callable[[], Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


def _kill_forked_from(root: Path) -> None:
    """Kill every process still running our sandbox's command line (orphaned runs): their namespaces go with them."""
    for proc in psutil.process_iter(["cmdline"]):
        if str(root) in " ".join(proc.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                proc.kill()


@pytest.fixture
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sandbox-protocol-"))
    path.chmod(0o755)
    yield path
    left = _leftovers() if not _wait_until(lambda: not _leftovers(), 3.0) else []
    _kill_forked_from(path)
    shutil.rmtree(path, ignore_errors=True)
    assert not left, f"processes of a run outlived the test: {left}"


class Raw:
    """A sandbox process started like client.py starts it, driven byte by byte."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stderr = (root / "sandbox.stderr").open("w+b")
        argv = [sys.executable, "-I", "-c", client_module._BOOT, client_module._PACKAGE_PARENT, "--root", str(root),
                "--uid", str(UID), "--gid", str(GID), "--parent-pid", str(os.getpid())]  # fmt: skip
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.hello = read_frame(self.proc.stdout.fileno(), time.monotonic() + client_module.START_TIMEOUT)
        assert self.hello["ok"], self.hello

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it stopped reading: fine, as long as it answers or exits below

    def send_in_background(self, data: bytes) -> threading.Thread:
        thread = threading.Thread(target=self.send, args=(data,), daemon=True)
        thread.start()
        return thread

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()

    def reply(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next frame, or None when the sandbox closed its stdout. Never blocks past the timeout."""
        assert self.proc.stdout is not None
        try:
            return read_frame(self.proc.stdout.fileno(), time.monotonic() + timeout)
        except ProtocolError as exc:
            assert "deadline" not in str(exc), "the sandbox neither answered nor exited"
            return None

    def exit_code(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("the sandbox process hung instead of exiting")

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    def ran_nothing(self) -> bool:
        return not (self.root / "files" / "victim").exists() and not any((self.root / "runs").iterdir())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(BrokenPipeError):
                pipe.close()  # type: ignore[union-attr]
        self.stderr.close()


@pytest.fixture
def raw(root: Path) -> Iterator[Raw]:
    sandbox = Raw(root)
    yield sandbox
    sandbox.close()


# ---- malformed frames: the sandbox closes the pipe and exits 0, having run nothing ---------------------------

VALID = _payload(VICTIM)
MALFORMED = {
    "garbage": _frame(b"\x00garbage\xff\xfe not json at all"),
    "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + VALID,
    "header_4_gib": b"\xff\xff\xff\xff" + VALID,
    "header_only": struct.pack(">I", len(VALID)),
    "truncated_payload": _frame(VALID)[: 4 + len(VALID) // 2],
    "short_header": b"\x00\x00",
    "empty_payload": _frame(b""),
    "not_utf8": _frame(VALID.replace(b'"ran.txt"', b'"\xff\xfe.txt"')),
    "json_list": _frame(_payload([VICTIM])),
    "json_string": _frame(_payload(json.dumps(VICTIM))),
    "json_null": _frame(b"null"),
    "json_number": _frame(b"42"),
    "two_objects": _frame(VALID + VALID),
    "trailing_garbage": _frame(VALID + b"}"),
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_frame_makes_the_sandbox_exit_without_running_anything(raw: Raw, data: bytes) -> None:
    raw.send(data)
    raw.close_stdin()  # a frame that ends early only ends when the pipe does
    assert raw.reply() is None
    assert raw.exit_code() == 0, raw.log()
    assert raw.ran_nothing() and "Traceback" not in raw.log()


def test_a_frame_one_byte_over_the_cap_is_refused_unread(raw: Raw) -> None:
    payload = _payload({**VICTIM, "pad": ""})
    payload = _payload({**VICTIM, "pad": "x" * (CAP + 1 - len(payload))})
    assert len(payload) == CAP + 1
    writer = raw.send_in_background(_frame(payload))  # it stops reading after the header: do not block on it
    assert raw.reply() is None
    assert raw.exit_code() == 0 and raw.ran_nothing() and "exceeds" in raw.log(), raw.log()
    writer.join(10)


def test_a_frame_of_exactly_the_cap_is_served(raw: Raw) -> None:
    payload = _payload({**VICTIM, "id": 7, "pad": ""})
    payload = _payload({**VICTIM, "id": 7, "pad": "x" * (CAP - len(payload))})
    assert len(payload) == CAP
    writer = raw.send_in_background(_frame(payload))
    reply = raw.reply(30)
    writer.join(10)
    assert reply is not None and reply["id"] == 7 and reply["ok"] and reply["written"] == 6, reply
    assert (raw.root / "files" / "victim" / "ran.txt").read_text() == "it ran"


@pytest.mark.parametrize(
    "request_",
    [{"kind": "exec", "command": "id"}, {"kind": None}, {"kind": 3}, {}, {"kind": "file", "op": 1}],
    ids=["unknown_kind", "null_kind", "number_kind", "no_kind", "file_without_scope"],
)
def test_an_unknown_request_is_answered_with_an_error_and_the_sandbox_stays(raw: Raw, request_: dict[str, Any]) -> None:
    raw.send(_frame(_payload({"id": "x", **request_})))
    reply = raw.reply()
    assert reply is not None and reply["id"] == "x" and reply["ok"] is False and reply["error"], reply
    raw.send(_frame(_payload({"id": 2, "kind": "ping"})))
    pong = raw.reply()
    assert pong is not None and pong["id"] == 2 and pong["ok"] and pong["type"] == "hello"
    assert raw.ran_nothing()


# Odd but well-formed requests: only the (trusted) worker can send these, but the protocol promises an error frame.
ODD_REQUESTS = {
    "nested_200k": (b'{"id":1,"kind":"ping","x":' + b"[" * 200_000 + b"]" * 200_000 + b"}", "RecursionError escapes "
                    "protocol.decode_payload (it catches only UnicodeDecodeError/ValueError) and kills main()"),
    "list_kind": (b'{"id":1,"kind":["script"]}', "Server.handle looks the kind up in a dict (since db5a8bb): an "
                  "unhashable kind raises TypeError outside handle()'s except clause"),
    "nan_wall": (b'{"id":1,"kind":"script","source":"result=1","params":{},"limits":{"wall_seconds":NaN}}',
                 "json.loads accepts NaN; the limits check let it through (NaN <= 0 is False) and jail._collect "
                 "crashes in poll()"),
    "nan_output": (b'{"id":1,"kind":"script","source":"result=1","params":{},"limits":{"output_bytes":NaN}}',
                   "int(NaN) in Server._script raises ValueError outside handle()'s except clause"),
    "params_string": (b'{"id":1,"kind":"shell","command":"echo {{a}}","params":"a"}',
                      "shell._fill indexes a str params with a str key: TypeError outside handle()'s except clause"),
    "secret_env_list": (b'{"id":1,"kind":"shell","command":"echo","params":{},"secret_env":["A"]}',
                        "shell.build_env calls .items() on a list: AttributeError outside handle()'s except clause"),
}  # fmt: skip


@pytest.mark.parametrize(
    "payload",
    [payload for payload, _ in ODD_REQUESTS.values()],
    ids=list(ODD_REQUESTS),
)
def test_an_odd_well_formed_request_gets_an_error_frame(raw: Raw, payload: bytes) -> None:
    raw.send(_frame(payload))
    reply = raw.reply()
    if reply is None:  # it may also close the pipe, but cleanly (not a traceback and exit 1)
        assert raw.exit_code() == 0 and "Traceback" not in raw.log(), raw.log()[-600:]
    else:
        assert reply["ok"] is False and reply["error"], reply


def test_infinite_limits_are_clamped_not_fatal(raw: Raw) -> None:
    raw.send(_frame(b'{"id":1,"kind":"script","source":"result=1","params":{},"limits":{"wall_seconds":Infinity,'
                    b'"cpu_seconds":1e999,"memory_bytes":1e308,"output_bytes":' + str(10**40).encode() + b"}}"))  # fmt: skip
    reply = raw.reply()
    assert reply is not None and reply["ok"] and reply["result"] == 1, reply


# ---- the client: a sandbox that dies or hangs ----------------------------------------------------------------


@pytest.fixture
def client(root: Path) -> Iterator[SandboxClient]:
    sandbox = SandboxClient(root, UID, GID)
    assert sandbox.start()["ok"]
    yield sandbox
    sandbox.close()


SPIN = {"kind": "script", "source": "while True:\n    pass", "params": {}}


def test_a_sandbox_killed_mid_request_fails_that_call_promptly_and_comes_back(client: SandboxClient) -> None:
    assert client.proc is not None
    pid = client.proc.pid
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(SandboxError, match="failed during the request"):
        client.call({**SPIN, "limits": {"wall_seconds": 20, "cpu_seconds": 30}})
    assert time.monotonic() - started < 20 + MARGIN
    assert _wait_until(lambda: not _leftovers(), 3.0), "the run outlived its sandbox"
    reply = client.call({"kind": "script", "source": "result = 1", "params": {}})
    assert reply["ok"] and reply["result"] == 1 and client.proc is not None and client.proc.pid != pid


def test_a_sandbox_killed_between_requests_is_restarted_transparently(client: SandboxClient) -> None:
    assert client.proc is not None
    pid = client.proc.pid
    os.kill(pid, signal.SIGKILL)
    client.proc.wait()
    reply = client.call({"kind": "ping"})
    assert reply["ok"] and client.proc is not None and client.proc.pid != pid and client.starts == 2


@pytest.mark.parametrize("when", ["before_the_request", "mid_run"])
def test_a_hung_sandbox_fails_the_request_at_its_deadline_and_is_replaced(client: SandboxClient, when: str) -> None:
    assert client.proc is not None
    pid = client.proc.pid
    if when == "before_the_request":
        os.kill(pid, signal.SIGSTOP)
        request: dict[str, Any] = {
            "kind": "script",
            "source": "result = 1",
            "params": {},
            "limits": {"wall_seconds": 1},
        }
    else:  # stopped while its run spins: only the client's deadline is left, and the run must die with the sandbox
        threading.Timer(0.3, os.kill, (pid, signal.SIGSTOP)).start()
        request = {**SPIN, "limits": {"wall_seconds": 1, "cpu_seconds": 30}}
    started = time.monotonic()
    with pytest.raises(SandboxError, match="deadline"):
        client.call(request)
    elapsed = time.monotonic() - started
    assert 1 + MARGIN - 0.5 < elapsed < 1 + MARGIN + 2, elapsed
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _wait_until(lambda: not _leftovers(), 3.0), "the run outlived its hung sandbox"
    reply = client.call({"kind": "script", "source": "result = 2", "params": {}})
    assert reply["ok"] and reply["result"] == 2 and client.proc is not None and client.proc.pid != pid


# ---- races at a run's start, made deterministic with ptrace ----------------------------------------------------
#
# A lane clones the run's process, whose first acts are to arm PR_SET_PDEATHSIG and check that the lane still
# holds the alive pipe. Two unlucky instants: the lane dies before the run has run a single instruction (the
# parent-death signal would never come: without the check, the run would go on as an orphan with no deadline), and
# the deadline falls while the run has not started yet (the lane must kill it by the pid clone returned, not by
# anything the run reports). Here ptrace holds the new process at exactly that instant. (The later instant, a
# uid change that clears the parent-death signal, is covered by the sandbox killed mid-request above.)

_PTRACE_CONT, _PTRACE_DETACH, _PTRACE_GETEVENTMSG, _PTRACE_SEIZE = 7, 17, 0x4201, 0x4206
_O_TRACEFORK, _EVENT_FORK, _WALL = 2, 1, 0x40000000
_ROOT_ONLY = pytest.mark.skipif(
    not kit.ROOT_MODE, reason="tracing the non-dumpable sandbox process takes CAP_SYS_PTRACE (root's pass runs it)"
)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def _ptrace(request: int, pid: int, data: int = 0) -> None:
    if _libc.ptrace(request, pid, None, ctypes.c_void_p(data)) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request}, {pid}): {os.strerror(err)}")


def _forked_child(pid: int) -> int:
    msg = ctypes.c_ulong()
    if _libc.ptrace(_PTRACE_GETEVENTMSG, pid, None, ctypes.byref(msg)) == -1:
        raise OSError(ctypes.get_errno(), "PTRACE_GETEVENTMSG")
    return msg.value


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    return stat[stat.rfind(")") + 2]


def _waitpid(pid: int, deadline: float) -> tuple[int, int]:
    """waitpid(pid, __WALL) without ever blocking past the deadline."""
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, _WALL | os.WNOHANG)
        if got:
            return got, status
        time.sleep(0.001)
    raise TimeoutError("no ptrace event before the deadline")


def _hold_run(lane: int, who_dies: str, seen: dict[str, Any], seized: threading.Event) -> None:
    """Tracer thread of ``lane``, the process that clones runs. Hold the run's fresh process at its first stop;
    who_dies="lane": kill the lane before the run has run an instruction, then release the run, which arms its
    parent-death signal too late. who_dies="run": hold it until the lane's deadline kill has landed on it."""
    deadline = time.monotonic() + 15
    try:
        _ptrace(_PTRACE_SEIZE, lane, _O_TRACEFORK)
        seized.set()
        run = None
        first_stops: set[int] = set()
        while run is None or run not in first_stops:
            pid, status = _waitpid(-1, deadline)
            if not os.WIFSTOPPED(status):
                seen.setdefault("exits", []).append((pid, status))
                continue
            sig, event = os.WSTOPSIG(status), status >> 16
            if pid == lane:
                if event == _EVENT_FORK:
                    run = _forked_child(lane)  # (clone with SIGCHLD as its exit signal reports as a fork)
                    if who_dies == "lane":
                        os.kill(lane, signal.SIGKILL)  # ...before the run has run a single instruction
                        continue
                _ptrace(_PTRACE_CONT, lane, 0 if event else sig)
            else:
                first_stops.add(pid)
        seen["run"] = run
        if who_dies == "lane":
            _wait_until(lambda: _state(lane) in ("Z", "gone"), 5)
            with contextlib.suppress(ProcessLookupError):
                _ptrace(_PTRACE_DETACH, run)  # runs on: its PR_SET_PDEATHSIG comes after the lane died
            return
        # Held at its first instruction; the lane's deadline kill (SIGKILL reaches a stopped tracee) ends it
        _, status = _waitpid(run, deadline)
        seen["run_killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    except Exception as exc:  # reported by the test; ending this thread detaches every tracee anyway
        seen["error"] = repr(exc)
    finally:
        seized.set()


@_ROOT_ONLY
def test_a_run_held_before_its_first_instruction_is_killed_at_the_deadline(client: SandboxClient, root: Path) -> None:
    seen: dict[str, Any] = {}
    seized = threading.Event()
    # Runs are cloned by a lane of the sandbox process (lanes.py); an idle sandbox hands the next run to lane 0.
    tracer = threading.Thread(target=_hold_run, args=(client.hello["lanes"][0], "run", seen, seized))
    tracer.start()
    seized.wait(10)  # the request goes only once the lane is traced: its next clone is the run
    try:
        reply = client.call(
            {"kind": "shell", "command": "tail -c 1 /dev/zero", "params": {}, "limits": {"wall_seconds": 1}}
        )
        assert reply["killed"] == "wall_time", reply
        tracer.join(20)
        assert "error" not in seen and seen.get("run_killed"), seen
        assert not _wait_until(_leftovers, 1.0), f"the run outlived its deadline: {seen}"
        reply = client.call({"kind": "script", "source": "result = 2", "params": {}})  # the lane goes on
        assert reply["ok"] and reply["result"] == 2, reply
    finally:
        tracer.join(20)
        _kill_forked_from(root)


@_ROOT_ONLY
def test_a_run_whose_sandbox_dies_before_it_is_armed_leaves_nothing(client: SandboxClient, root: Path) -> None:
    seen: dict[str, Any] = {}
    seized = threading.Event()
    tracer = threading.Thread(target=_hold_run, args=(client.hello["lanes"][0], "lane", seen, seized))
    tracer.start()
    seized.wait(10)  # the request goes only once the lane is traced: its next clone is the run
    try:
        with pytest.raises(SandboxError):
            client.call(
                {"kind": "shell", "command": "tail -c 1 /dev/zero", "params": {}, "limits": {"wall_seconds": 0.5}}
            )
        tracer.join(20)
        assert "error" not in seen and seen.get("run"), seen
        # The released run exits at its first check (its lane is gone), before its job could start.
        commands: set[str] = set()

        def settled() -> bool:
            live = _leftovers()
            for pid in live:
                with contextlib.suppress(OSError):
                    commands.add(Path(f"/proc/{pid}/comm").read_text().strip())
            return not live

        assert _wait_until(settled, 3.0), f"the run lives on after its sandbox was killed: {seen}"
        time.sleep(0.5)
        assert settled() and "tail" not in commands, (commands, seen)
    finally:
        tracer.join(20)
        _kill_forked_from(root)  # an orphaned run
