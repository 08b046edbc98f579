"""Logs: text or JSON lines (LOG_FORMAT), every line written while a message is in hand carrying its id (and its
bot's), and syslog priorities when stderr is the journal (JOURNAL_STREAM), from real processes; and the process
titles ps shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from botworker.queue import RESPONSES

from conftest import ROOT, Bot, Fleet, advisory_lock, events, push, wait_for


def _answer(r: redis.Redis, bot: Bot, fleet: Fleet) -> str:
    message = bot.message("hello, logs")
    push(r, message)
    wait_for(lambda: [e for e in events(r, RESPONSES) if e.get("messageId") == message["messageId"]], 20, "a reply")
    wait_for(lambda: "processed successfully" in fleet.log(), 10, "the success line")
    return message["messageId"]


def test_json_lines_carry_the_message_and_bot_ids_and_the_answers_duration(
    r: redis.Redis, bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    fleet = start_fleet(1, LOG_FORMAT="json")
    message_id = _answer(r, bot, fleet)
    lines = [json.loads(line) for line in fleet.log().splitlines() if line.strip()]
    assert {"time", "level", "pid", "role", "logger", "message"} <= set(lines[0])
    about = [line for line in lines if line.get("messageId") == message_id]
    assert any("Processing message" in line["message"] for line in about), about
    [done] = [line for line in about if "processed successfully" in line["message"]]
    assert done["botId"] == bot.bot_id and done["stage"] == "answered" and done["role"].startswith("w0")
    assert isinstance(done["durationMs"], int) and done["durationMs"] >= 0, done


def test_text_lines_about_a_message_carry_its_id(r: redis.Redis, bot: Bot, start_fleet: Callable[..., Fleet]) -> None:
    fleet = start_fleet(1)
    message_id = _answer(r, bot, fleet)
    processing = [line for line in fleet.log().splitlines() if "Processing message for bot" in line]
    assert processing and all(f" {message_id}] " in line for line in processing), processing


def test_under_the_journal_each_line_starts_with_its_priority(tmp_path: Path) -> None:
    out = tmp_path / "journal"
    out.touch()
    found = os.stat(out)
    code = (
        "import logging; from botworker.logs import setup_logging; setup_logging('INFO');"
        "log = logging.getLogger('x'); log.info('fine'); log.warning('hmm'); log.error('bad\\nsecond line')"
    )
    with out.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, check=True, cwd=ROOT, timeout=30,
                       env={**os.environ, "JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"})  # fmt: skip
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>", "<3>"], lines
    plain = tmp_path / "plain"
    with plain.open("w") as stderr:  # JOURNAL_STREAM naming another file: not the journal, no prefixes
        subprocess.run([sys.executable, "-c", code], stderr=stderr, check=True, cwd=ROOT, timeout=30,
                       env={**os.environ, "JOURNAL_STREAM": f"{found.st_dev}:{found.st_ino}"})  # fmt: skip
    assert not any(line.startswith("<") for line in plain.read_text().splitlines())


def test_process_titles_show_each_process_role_and_the_message_in_hand(
    r: redis.Redis, db: Any, bot: Bot, start_fleet: Callable[..., Fleet]
) -> None:
    fleet = start_fleet(1, args=("--threads", "1"), WORKER_BATCH="1")
    [worker] = fleet.wait_workers(1)

    def title(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    message = bot.message("hello, titles")
    with advisory_lock(db, message["messageId"]):  # the worker holds the message at its save
        push(r, message)
        wait_for(lambda: title(worker) == f"botworker: worker 0 busy {message['messageId']}", 20, "the busy title")
        assert title(fleet.proc.pid).startswith("botworker: supervisor "), title(fleet.proc.pid)
    wait_for(lambda: title(worker) == "botworker: worker 0 idle (1 handled)", 20, "the idle title")
