"""Shell, script and file tools end to end: a real message, a real worker, its real sandbox process."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from botworker import errors
from botworker.config import Config
from botworker.worker import Heartbeat, Worker

from toolkit import add_tool, ask

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these tests run the sandbox as root (CI does)")


@pytest.fixture
def worker(make_cfg: Callable[..., Config], r: redis.Redis) -> Iterator[Worker]:
    w = Worker(make_cfg(), 0, "test-node", Heartbeat())
    w.init_process()
    yield w
    w.sandbox.close()
    w.store.close()
    w.redis.close()


def tool_call(reply: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in reply["metadata"]["toolCalls"] if c["tool"] == name)


def test_custom_script_runs_with_params_and_print(r, db, bot, worker) -> None:
    add_tool(
        db,
        bot,
        "token_count",
        "custom_script",
        {
            "script": "import math\nprint('hi')\nresult = {'n': len(params['param1'].split()), 'pi': math.floor(math.pi)}"
        },
    )
    reply, errs = ask(r, worker, bot, 'run token count on "a b c"')
    call = tool_call(reply, "token_count")
    assert errs == [] and call["ok"], call
    assert call["result"] == {"result": {"n": 3, "pi": 3}, "stdout": "hi\n"}


def test_failing_script_reports_its_line(r, db, bot, worker) -> None:
    add_tool(db, bot, "divider", "custom_script", {"script": "x = 1\ny = x / 0\n"})
    reply, errs = ask(r, worker, bot, "use the divider")
    call = tool_call(reply, "divider")
    assert not call["ok"] and "ZeroDivisionError" in call["error"] and "line 2" in call["error"]
    assert [e["code"] for e in errs] == [errors.TOOL_FAILED]


def test_cant_escape_through_a_script_tool(r, db, bot, worker) -> None:
    source = "result = ().__class__.__bases__[0].__subclasses__()"
    add_tool(db, bot, "escaper", "custom_script", {"script": source})
    reply, errs = ask(r, worker, bot, "run escaper")
    call = tool_call(reply, "escaper")
    assert not call["ok"] and "compile_error" in call["error"] and errs


def test_shell_command_fills_params_as_single_arguments(r, db, bot, worker) -> None:
    add_tool(db, bot, "hello_sayer", "shell_command", {"command": "echo Hello {{param1}}", "timeout": 5})
    reply, errs = ask(r, worker, bot, 'ask hello sayer to greet "Ada; cat /etc/shadow"')
    call = tool_call(reply, "hello_sayer")
    assert errs == [] and call["result"]["stdout"] == "Hello Ada; cat /etc/shadow\n" and call["result"]["exitCode"] == 0


def test_cant_run_a_program_off_the_allowlist(r, db, bot, worker) -> None:
    add_tool(db, bot, "sneaky", "shell_command", {"command": "sh -c id"})
    reply, _ = ask(r, worker, bot, "run sneaky")
    call = tool_call(reply, "sneaky")
    assert not call["ok"] and "not allowed" in call["error"]


def test_file_tools_write_then_read_in_the_bots_directory(r, db, bot, worker) -> None:
    add_tool(
        db,
        bot,
        "save_note",
        "file_operation",
        {"operation": "write", "path": "notes/today.txt", "content": "{{param1}}"},
    )
    add_tool(db, bot, "read_note", "file_operation", {"operation": "read", "path": "notes/today.txt"})
    reply, errs = ask(r, worker, bot, 'save note "buy milk"')
    assert errs == [] and tool_call(reply, "save_note")["result"]["written"] == 8
    reply, errs = ask(r, worker, bot, "read note")
    assert errs == [] and tool_call(reply, "read_note")["result"]["content"] == "buy milk"


def test_cant_leave_the_files_directory(r, db, bot, worker) -> None:
    add_tool(db, bot, "reader", "file_operation", {"operation": "read", "path": "{{path}}"})
    for path in ("/etc/passwd", "../../etc/passwd", "/../x"):
        reply, _ = ask(r, worker, bot, f"use the reader on {path}")
        call = tool_call(reply, "reader")
        assert not call["ok"], (path, call)


def test_sandbox_killed_mid_request_fails_that_call_and_comes_back(r, db, bot, worker) -> None:
    add_tool(db, bot, "sleeper", "custom_script", {"script": "x = 0\nwhile True:\n    x += 1", "timeout": 20})
    add_tool(db, bot, "quick", "custom_script", {"script": "result = 42"})
    worker.sandbox.start()
    pid = worker.sandbox.proc.pid

    def kill_soon() -> None:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_soon).start()
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run the sleeper")
    call = tool_call(reply, "sleeper")
    assert not call["ok"] and "sandbox process failed" in call["error"] and time.monotonic() - started < 10
    assert errs and errs[0]["code"] == errors.TOOL_FAILED
    reply, errs = ask(r, worker, bot, "run quick")
    assert tool_call(reply, "quick")["result"]["result"] == 42 and worker.sandbox.proc.pid != pid


def test_no_process_of_a_run_survives(r, db, bot, worker) -> None:
    import psutil

    add_tool(db, bot, "spinner", "custom_script", {"script": "while True:\n    pass", "timeout": 1})
    reply, _ = ask(r, worker, bot, "run spinner")
    assert not tool_call(reply, "spinner")["ok"]
    uid = worker.cfg.sandbox_uid + worker.wid
    # (A zombie runs nothing: a run orphaned when an earlier test killed its sandbox is reaped by the host's init,
    # which here, unlike systemd, reaps nobody.)
    left = [
        p
        for p in psutil.process_iter(["uids", "cmdline", "ppid", "status"])
        if p.info["uids"].real == uid and p.info["status"] != psutil.STATUS_ZOMBIE
    ]
    assert left == [], [(p.pid, p.info) for p in left]


def test_results_are_json_in_the_reply_metadata(r, db, bot, worker) -> None:
    add_tool(db, bot, "lister", "file_operation", {"operation": "list", "path": "/"})
    reply, errs = ask(r, worker, bot, "use lister")
    assert errs == [] and isinstance(tool_call(reply, "lister")["result"]["entries"], list)
    json.dumps(reply)  # everything in the event is JSON already
    assert uuid.UUID(reply["id"])
