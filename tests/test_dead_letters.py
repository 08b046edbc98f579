"""Dead letters: `botworker dead list|show|requeue|purge` against real Redis, and their retention (DEAD_LETTER_MAX
when a letter is added, DEAD_LETTER_DAYS trimmed by the supervisors). A requeued message is answered."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from botworker.config import Config
from botworker.queue import ATTEMPTS, DEAD, ERRORS, MESSAGES, RESPONSES, ReliableQueue, trim_dead_letters
from botworker.worker import Heartbeat, Worker

from conftest import ROOT, Bot, Servers, events, process_env, wait_for


def _dead_letter(client: redis.Redis, bot: Bot, text: str, failed_at: datetime | None = None, keep: int = 100) -> str:
    """Dead-letter one message the way a worker does (the queue's own script, from a processing list)."""
    message = bot.message(text)
    raw = json.dumps(message)
    queue = ReliableQueue(client, "bot_messages:processing:deadtest:0:1:0", dead_max=keep)
    client.lpush(queue.processing, raw)
    client.hset(ATTEMPTS, message["messageId"], 3)
    when = (failed_at or datetime.now(UTC)).isoformat()
    entry = {"message": raw, "messageId": message["messageId"], "code": "DATABASE_UNAVAILABLE",
             "error": "gave up after 3 attempt(s): test", "attempts": 3, "failedAt": when, "node": "deadtest"}  # fmt: skip
    assert queue.dead_letter(raw, message["messageId"], entry, {"messageId": message["messageId"], "error": "x"})
    return message["messageId"]


def _cli(servers: Servers, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "botworker", "dead", *args, "--env-file", ""],
        env=process_env(servers), capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip


def _ids(client: redis.Redis) -> list[str]:
    return [json.loads(raw)["messageId"] for raw in client.lrange(DEAD, 0, -1)]


def test_list_and_show_newest_first(r: redis.Redis, bot: Bot, servers: Servers) -> None:
    first, second = _dead_letter(r, bot, "one"), _dead_letter(r, bot, "two")
    listed = _cli(servers, "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith(second) and lines[1].startswith(first) and "DATABASE_UNAVAILABLE" in lines[0]
    assert lines[-1] == "(2 of 2 dead letter(s), newest first)"
    as_json = [json.loads(line) for line in _cli(servers, "list", "--json", "--limit", "1").stdout.splitlines()]
    assert [e["messageId"] for e in as_json] == [second]
    shown = _cli(servers, "show", first)
    assert shown.returncode == 0 and json.loads(shown.stdout)["messageId"] == first
    missing = _cli(servers, "show", "no-such-id")
    assert missing.returncode == 6 and "no dead letter no-such-id" in missing.stderr


def test_requeue_by_id_puts_the_message_back_with_a_fresh_attempt_count_and_it_is_answered(
    r: redis.Redis, bot: Bot, servers: Servers, make_cfg: Callable[..., Config]
) -> None:
    kept, requeued = _dead_letter(r, bot, "stay dead"), _dead_letter(r, bot, "hello again")
    r.hset(ATTEMPTS, requeued, 3)  # as if a count were left: requeueing starts it afresh
    done = _cli(servers, "requeue", requeued)
    assert done.returncode == 0 and "requeued 1 dead letter(s)" in done.stdout, done.stderr
    assert _ids(r) == [kept] and r.hget(ATTEMPTS, requeued) is None
    assert [json.loads(raw)["messageId"] for raw in r.lrange(MESSAGES, 0, -1)] == [requeued]
    again = _cli(servers, "requeue", requeued)  # already gone: said so, nothing moved twice
    assert again.returncode == 6 and r.llen(MESSAGES) == 1
    worker = Worker(make_cfg(WORKER_BATCH="1"), 0, "deadtest-node", Heartbeat())
    worker.init_process()
    try:
        r.delete(RESPONSES, ERRORS)
        assert worker.run_once()
        [reply] = events(r, RESPONSES)
        assert reply["messageId"] == requeued and events(r, ERRORS) == []
    finally:
        worker.sandbox.close()
        worker.store.close()
        worker.redis.close()


def test_requeue_all_and_purge_by_age_and_all(r: redis.Redis, bot: Bot, servers: Servers) -> None:
    old = _dead_letter(r, bot, "old", datetime.now(UTC) - timedelta(days=10))
    recent = _dead_letter(r, bot, "recent")
    purged = _cli(servers, "purge", "--older-than", "7d")
    assert purged.returncode == 0 and "purged 1 dead letter(s)" in purged.stdout and _ids(r) == [recent]
    assert _cli(servers, "purge").returncode == 2  # nothing named: refused
    assert _cli(servers, "purge", "--older-than", "soon").returncode == 2
    more = _dead_letter(r, bot, "more")
    assert "requeued 2" in _cli(servers, "requeue", "--all").stdout and _ids(r) == []
    assert sorted(json.loads(raw)["messageId"] for raw in r.lrange(MESSAGES, 0, -1)) == sorted([recent, more])
    _dead_letter(r, bot, "gone soon")
    assert "purged 1" in _cli(servers, "purge", "--all").stdout and r.llen(DEAD) == 0
    assert old not in _ids(r)


def test_retention_keeps_the_newest_and_drops_the_old(r: redis.Redis, bot: Bot) -> None:
    ids = [_dead_letter(r, bot, f"letter {i}", keep=3) for i in range(5)]
    assert _ids(r) == ids[:1:-1]  # DEAD_LETTER_MAX=3: the three newest, newest first
    r.delete(DEAD)
    now = datetime.now(UTC)
    aged = [_dead_letter(r, bot, f"aged {d}", now - timedelta(days=d)) for d in (40, 31, 2)]
    assert trim_dead_letters(r, (now - timedelta(days=30)).isoformat()) == 2
    assert _ids(r) == [aged[2]]


def test_the_supervisor_trims_dead_letters_past_dead_letter_days(
    r: redis.Redis, bot: Bot, start_fleet: Callable[..., Any]
) -> None:
    old = _dead_letter(r, bot, "ancient", datetime.now(UTC) - timedelta(days=3))
    fresh = _dead_letter(r, bot, "fresh")
    start_fleet(1, DEAD_LETTER_DAYS="1")
    wait_for(lambda: _ids(r) == [fresh], 20, "the old dead letter trimmed")
    assert old not in _ids(r)
