"""Batches (WORKER_BATCH): when a backlog has built, a thread takes several messages at once and handles them with
one begin, one load, one save and one finish round trip, while each keeps its own attempt count, exactly-once save
and events. In-process, on real Redis and PostgreSQL."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from botworker import errors
from botworker.config import Config
from botworker.errors import TransientError
from botworker.message import Message
from botworker.pipeline import utcnow
from botworker.queue import ATTEMPTS, ERRORS, MESSAGES, RESPONSES, STATS, requeue_list
from botworker.worker import Heartbeat, Worker

from conftest import Bot, events, push, query


@pytest.fixture
def worker(make_cfg: Callable[..., Config]) -> Iterator[Worker]:
    w = Worker(make_cfg(WORKER_BATCH="8"), 0, "batch-node", Heartbeat())
    w.init_process()
    yield w
    w.sandbox.close()
    w.store.close()
    w.redis.close()


def rows_for(db: psycopg.Connection[Any], mid: str) -> list[dict[str, Any]]:
    return query(db, "SELECT id FROM chat_messages WHERE metadata->>'messageId' = %s", mid)


def count_round_trips(monkeypatch: pytest.MonkeyPatch, worker: Worker) -> list[int]:
    """How many steps each PostgreSQL round trip of the worker's store carried."""
    trips: list[int] = []
    real = worker.store._run_all

    def counted(steps: Any) -> Any:
        trips.append(len(steps))
        return real(steps)

    monkeypatch.setattr(worker.store, "_run_all", counted)
    return trips


def test_a_backlog_is_handled_in_one_load_and_one_save_and_each_message_settles_on_its_own(
    worker: Worker, r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = [bot.message(f"hello {i}") for i in range(3)]
    tool = bot.message("list my models")
    twice = bot.message("sent twice")
    unknown = {**bot.message("nobody's bot"), "botId": "00000000-0000-4000-8000-000000000000"}
    for payload in [*plain, tool, twice, twice, unknown]:
        push(r, payload)
    push(r, "{not json")
    trips = count_round_trips(monkeypatch, worker)

    assert worker.run_once()  # one call: the first message and the 7 behind it
    answered = [e["messageId"] for e in events(r, RESPONSES)]
    assert Counter(answered) == Counter(m["messageId"] for m in [*plain, tool, twice])
    codes = sorted(e["code"] for e in events(r, ERRORS))
    assert codes == sorted([errors.BOT_NOT_FOUND, errors.INVALID_JSON])
    for payload in [*plain, tool, twice]:
        assert len(rows_for(db, payload["messageId"])) == 2
    assert r.hget(STATS, "duplicates") == "1" and r.hget(STATS, "processed") == "5"
    assert r.llen(MESSAGES) == 0 and r.llen(worker.queue.processing) == 0 and r.hlen(ATTEMPTS) == 0
    # One load of the 6 plain messages, one save of the 5 answered (lock + save each) and platform tool's own
    # query; the second copy of "sent twice" went on its own after the batch, and found it answered.
    assert sorted(trips) == sorted([6, 10, 1]), trips
    tool_reply = next(e for e in events(r, RESPONSES) if e["messageId"] == tool["messageId"])
    assert "churn, sentiment, vision" in tool_reply["botResponse"]["content"]


def test_a_batch_whose_save_fails_saves_each_message_on_its_own(
    worker: Worker, r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    msgs = [bot.message(f"hello {i}") for i in range(4)]
    for payload in msgs:
        push(r, payload)
    real = worker.store.save_exchanges

    def fails_for_several(exchanges: Any) -> Any:
        if len(exchanges) > 1:
            raise TransientError(errors.DATABASE_UNAVAILABLE, "PostgreSQL failed: injected")
        return real(exchanges)

    monkeypatch.setattr(worker.store, "save_exchanges", fails_for_several)
    assert worker.run_once()
    assert Counter(e["messageId"] for e in events(r, RESPONSES)) == Counter(m["messageId"] for m in msgs)
    assert all(len(rows_for(db, m["messageId"])) == 2 for m in msgs) and events(r, ERRORS) == []


def test_a_batch_whose_load_fails_goes_back_in_line_after_one_wait_and_is_answered_next_time(
    worker: Worker, r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    msgs = [bot.message(f"hello {i}") for i in range(3)]
    for payload in msgs:
        push(r, payload)
    real = worker.store.load_contexts
    calls: list[int] = []

    def down_once(batch: list[Message]) -> Any:
        calls.append(len(batch))
        if len(calls) == 1:
            raise TransientError(errors.DATABASE_UNAVAILABLE, "cannot connect to PostgreSQL: injected")
        return real(batch)

    monkeypatch.setattr(worker.store, "load_contexts", down_once)
    waits: list[float] = []
    monkeypatch.setattr(worker.consumers[0], "_wait_for_database", waits.append)
    assert worker.run_once()
    assert len(waits) == 1 and events(r, RESPONSES) == []  # one wait for the three, not three
    assert [json.loads(x)["messageId"] for x in r.lrange(MESSAGES, 0, -1)] == [m["messageId"] for m in msgs]
    assert {k: int(v) for k, v in r.hgetall(ATTEMPTS).items()} == {m["messageId"]: 1 for m in msgs}
    assert worker.run_once()
    assert Counter(e["messageId"] for e in events(r, RESPONSES)) == Counter(m["messageId"] for m in msgs)
    assert r.hlen(ATTEMPTS) == 0 and r.llen(worker.queue.processing) == 0


def test_a_worker_killed_mid_batch_has_the_whole_batch_requeued_and_answered_once(
    worker: Worker, make_cfg: Callable[..., Config], r: redis.Redis, db: psycopg.Connection[Any], bot: Bot
) -> None:
    msgs = [bot.message(f"hello {i}") for i in range(3)]
    for payload in msgs:
        push(r, payload)
    raw = worker.queue.pop(1)
    assert raw is not None and len(worker.queue.take(7)) == 2  # the batch is in the worker's list...
    first = json.loads(raw)
    saved = worker.pipeline.handle(
        Message(bot.bot_id, bot.user_id, first["message"], first["messageId"], None, utcnow())
    )  # ...one of it saved...
    requeue_list(r, worker.queue.processing)  # ...and the worker "died": the supervisor requeues the batch
    other = Worker(make_cfg(WORKER_BATCH="8"), 1, "batch-node", Heartbeat())
    other.init_process()
    try:
        assert other.run_once()
    finally:
        other.sandbox.close()
        other.store.close()
        other.redis.close()
    responses = events(r, RESPONSES)
    assert Counter(e["messageId"] for e in responses) == Counter(m["messageId"] for m in msgs)
    replayed = next(e for e in responses if e["messageId"] == first["messageId"])
    assert replayed["botResponse"]["id"] == saved.bot_row["id"]
    assert all(len(rows_for(db, m["messageId"])) == 2 for m in msgs)


def test_a_batch_with_nothing_left_to_save_or_load_makes_no_round_trip_for_it(
    worker: Worker, r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every message of the batch fails before saving (unknown bots) or cannot be read: nothing to save; and a batch
    of duplicates only: nothing to load."""
    nobody = "00000000-0000-4000-8000-000000000000"
    for i in range(3):
        push(r, {**bot.message(f"hello {i}"), "botId": nobody})
    push(r, "{not json")
    trips = count_round_trips(monkeypatch, worker)
    assert worker.run_once()
    assert trips == [3]  # the load; no save
    assert sorted(e["code"] for e in events(r, ERRORS)) == sorted([errors.BOT_NOT_FOUND] * 3 + [errors.INVALID_JSON])
    r.delete(ERRORS)
    answered = bot.message("hello")
    push(r, answered)
    assert worker.run_once()
    for _ in range(3):
        push(r, answered)  # copies of an answered message
    trips.clear()
    assert worker.run_once()
    assert trips == []  # all duplicates: nothing loaded, nothing saved
    assert len(events(r, RESPONSES)) == 1 and r.hget(STATS, "duplicates") == "3"
    assert r.llen(MESSAGES) == 0 and r.llen(worker.queue.processing) == 0
