"""The whole message flow on real Redis and PostgreSQL, driven in-process one ``run_once()`` at a time."""

from __future__ import annotations

import itertools
import json
import threading
import uuid
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
from botworker.queue import ATTEMPTS, DEAD, ERRORS, MESSAGES, RESPONSES, STATS, requeue_list
from botworker.store import Store
from botworker.worker import Heartbeat, Worker

from conftest import Bot, connect, events, push, query, wait_for

ROW_COLUMNS = {
    "id", "botInstanceId", "userId", "role", "content", "metadata", "responseTime", "tokensUsed", "createdAt", "updatedAt",
}  # fmt: skip


@pytest.fixture
def make_worker(make_cfg: Callable[..., Config], r: redis.Redis) -> Iterator[Callable[..., Worker]]:
    made: list[Worker] = []

    def make(wid: int = 0, **env: str) -> Worker:
        worker = Worker(make_cfg(**env), wid, "test-node", Heartbeat())
        worker.init_process()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.store.close()
        worker.redis.close()


def rows_for(db: psycopg.Connection[Any], message_id: str) -> list[dict]:
    return query(db, "SELECT * FROM chat_messages WHERE metadata->>'messageId' = %s ORDER BY \"createdAt\"", message_id)


def test_reply_event_has_the_contract_shape(make_worker, r, db, bot: Bot) -> None:
    worker = make_worker()
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(RESPONSES)
    payload = bot.message("list my models")
    push(r, payload)
    assert worker.run_once()

    [event] = events(r, RESPONSES)
    assert set(event) == {"instanceId", "botId", "userId", "messageId", "userMessage", "botResponse"}
    assert (event["botId"], event["userId"], event["messageId"]) == (bot.bot_id, bot.user_id, payload["messageId"])
    user_row, bot_row = event["userMessage"], event["botResponse"]
    assert set(user_row) == ROW_COLUMNS and set(bot_row) == ROW_COLUMNS
    assert (user_row["role"], user_row["content"]) == ("user", "list my models")
    assert bot_row["role"] == "bot" and "churn, sentiment, vision" in bot_row["content"]
    assert user_row["createdAt"].endswith("Z") and user_row["createdAt"] < bot_row["createdAt"]
    assert isinstance(bot_row["tokensUsed"], int) and isinstance(bot_row["responseTime"], int)
    meta = bot_row["metadata"]
    assert meta["messageId"] == payload["messageId"] and meta["model"] == "offline"
    assert [(c["tool"], c["operation"], c["ok"]) for c in meta["toolCalls"]] == [("platform", "list_models", True)]
    assert user_row["metadata"] == {"messageId": payload["messageId"]}
    # Saved exactly as sent, and the same event went out on pub/sub.
    saved = rows_for(db, payload["messageId"])
    assert [str(x["id"]) for x in saved] == [user_row["id"], bot_row["id"]]
    published = wait_for(lambda: pubsub.get_message(timeout=0.1), 5, "the published event")
    assert json.loads(published["data"]) == event
    assert r.llen(worker.queue.processing) == 0 and r.hget(STATS, "processed") == "1"
    pubsub.close()


def test_conversation_continues_on_the_same_instance_with_history(make_worker, r, db, bot: Bot) -> None:
    worker = make_worker()
    push(r, bot.message("Hello!"))
    worker.run_once()
    instance = events(r, RESPONSES)[0]["instanceId"]
    assert query(db, 'SELECT status, "botId" FROM bot_instances WHERE id = %s', instance)[0]["status"] == "running"
    for i in range(6):
        push(r, bot.message(f"message {i}", instanceId=instance))
        worker.run_once()
    replies = events(r, RESPONSES)
    assert {e["instanceId"] for e in replies} == {instance} and len(replies) == 7
    msg = Message(bot.bot_id, bot.user_id, "next", "m-next", instance, utcnow())
    history = worker.store.load_context(msg).history
    assert len(history) == 10  # HISTORY_LIMIT, oldest first
    assert history[-2]["content"] == "message 5" and history[-1]["role"] == "bot"
    assert all(a["createdAt"] <= b["createdAt"] for a, b in itertools.pairwise(history))


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("other_user_bot", errors.BOT_NOT_FOUND),
        ("unknown_bot", errors.BOT_NOT_FOUND),
        ("inactive_bot", errors.BOT_INACTIVE),
        ("foreign_instance", errors.INSTANCE_NOT_FOUND),
        ("unknown_instance", errors.INSTANCE_NOT_FOUND),
    ],
)
def test_rejected_messages_end_in_one_error_event(make_worker, r, db, bot: Bot, change: str, code: str) -> None:
    from botworker.demo import seed

    worker = make_worker()
    payload = bot.message("list my models")
    dsn = worker.cfg.database_url
    if change == "other_user_bot":
        _, other_bot = seed(dsn, str(uuid.uuid4()), str(uuid.uuid4()))
        payload["botId"] = other_bot
    elif change == "unknown_bot":
        payload["botId"] = str(uuid.uuid4())
    elif change == "inactive_bot":
        query(db, 'UPDATE bots SET "isActive" = false WHERE id = %s', bot.bot_id)
    elif change == "foreign_instance":
        other_user, other_bot = seed(dsn, str(uuid.uuid4()), str(uuid.uuid4()))
        push(r, {"botId": other_bot, "userId": other_user, "message": "hi", "messageId": "x-" + payload["messageId"]})
        worker.run_once()
        payload["instanceId"] = events(r, RESPONSES)[0]["instanceId"]
        r.delete(RESPONSES)
    else:
        payload["instanceId"] = str(uuid.uuid4())
    push(r, payload)
    worker.run_once()

    [event] = events(r, ERRORS)
    assert set(event) == {"botId", "userId", "instanceId", "messageId", "error", "code"}
    assert event["code"] == code and event["messageId"] == payload["messageId"] and event["error"]
    assert events(r, RESPONSES) == [] and rows_for(db, payload["messageId"]) == []
    assert r.llen(worker.queue.processing) == 0 and r.llen(MESSAGES) == 0


def test_missing_message_id_is_assigned_and_carried_everywhere(make_worker, r, db, bot: Bot) -> None:
    worker = make_worker()
    payload = bot.message("who am i")
    del payload["messageId"]
    push(r, payload)
    worker.run_once()
    [event] = events(r, RESPONSES)
    assert uuid.UUID(event["messageId"])
    assert len(rows_for(db, event["messageId"])) == 2
    assert "Ada Lovelace" in event["botResponse"]["content"]


def test_crash_after_commit_before_ack_replays_without_doubling(make_worker, r, db, bot: Bot) -> None:
    """The first worker saves the rows and dies before acking; the next one answers from the saved rows."""
    first = make_worker(0)
    payload = bot.message("list my models")
    push(r, payload)
    raw = first.queue.pop(1)
    assert raw is not None
    msg = Message(bot.bot_id, bot.user_id, payload["message"], payload["messageId"], None, utcnow())
    saved = first.pipeline.handle(msg)  # rows committed ...
    requeue_list(r, first.queue.processing)  # ... then the worker "died": the supervisor requeues its message

    second = make_worker(1)
    assert second.run_once()
    [event] = events(r, RESPONSES)
    assert event["botResponse"]["id"] == saved.bot_row["id"] and event["userMessage"]["id"] == saved.user_row["id"]
    assert len(rows_for(db, payload["messageId"])) == 2
    assert r.llen(MESSAGES) == 0 and r.llen(second.queue.processing) == 0


def test_same_message_id_twice_is_answered_once(make_worker, r, db, bot: Bot) -> None:
    worker = make_worker()
    payload = bot.message("list my models")
    push(r, payload)
    push(r, payload)
    worker.run_once()
    worker.run_once()
    assert len(events(r, RESPONSES)) == 1 and events(r, ERRORS) == []
    assert len(rows_for(db, payload["messageId"])) == 2
    assert r.hget(STATS, "duplicates") == "1" and r.llen(MESSAGES) == 0


def test_failing_tool_gets_a_reply_and_an_error_event(make_worker, r, db, bot: Bot) -> None:
    query(
        db,
        """INSERT INTO bot_tools (name, "displayName", description, type, config, "botId")
           VALUES ('deploy', 'Deploy', 'Deploys', 'workflow_action', '{"workflowActionId": "wf-1"}', %s)""",
        bot.bot_id,
    )
    worker = make_worker()
    payload = bot.message("please run deploy now")
    push(r, payload)
    worker.run_once()
    [reply] = events(r, RESPONSES)
    [error] = events(r, ERRORS)
    assert error["code"] == errors.TOOL_UNSUPPORTED and "not supported" in error["error"]
    assert error["instanceId"] == reply["instanceId"] and error["messageId"] == payload["messageId"]
    assert "could not run deploy" in reply["botResponse"]["content"]
    [call] = reply["botResponse"]["metadata"]["toolCalls"]
    assert call["ok"] is False and "not supported" in call["error"]


def test_platform_tools_never_show_another_users_data(make_worker, r, db, bot: Bot) -> None:
    from botworker.demo import seed

    worker = make_worker()
    other_user, _ = seed(worker.cfg.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    query(
        db, """INSERT INTO models (name, "displayName", "userId") VALUES ('secret-model', 'Secret', %s)""", other_user
    )
    for text in ("list my models", "search for secret", "how many models do I have"):
        push(r, bot.message(text))
        worker.run_once()
    list_reply, search_reply, counts_reply = (e["botResponse"] for e in events(r, RESPONSES))
    assert "secret" not in list_reply["content"] and "(3)" in list_reply["content"]
    assert search_reply["content"] == 'Nothing matches "secret".'
    assert counts_reply["metadata"]["toolCalls"][0]["result"]["models"] == 3


def test_pooled_connections_the_server_closed_cost_no_attempt(make_worker, r, db, bot: Bot) -> None:
    """A PostgreSQL restart (here: every pooled backend terminated) is noticed before use, not by a failed attempt."""
    worker = make_worker()
    worker.store.ping()  # make sure the pool holds a connection, then kill it under the worker
    assert query(
        db, "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = 'botworker'"
    )
    payload = bot.message("list my models")
    push(r, payload)
    worker.run_once()
    assert len(events(r, RESPONSES)) == 1 and events(r, ERRORS) == []
    assert len(rows_for(db, payload["messageId"])) == 2 and r.hget(ATTEMPTS, payload["messageId"]) is None


def test_a_connection_lost_mid_statement_is_retried_on_a_new_one(make_worker, r, db, bot: Bot) -> None:
    """A backend that dies while the worker's statement runs: the statements run again on a new connection."""
    worker = make_worker()
    worker.store.ping()
    killer = threading.Timer(
        0.3,
        query,
        (
            db,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(1.5)%%' AND pid <> pg_backend_pid()",
        ),
    )
    killer.start()
    try:
        assert worker.store.fetch("SELECT 7 AS n FROM pg_sleep(1.5)") == [{"n": 7}]
    finally:
        killer.join()


def test_postgresql_down_is_a_retry_with_the_reason(make_cfg) -> None:
    cfg = make_cfg(DATABASE_URL="postgresql://postgres@127.0.0.1:1/nothing", DB_CONNECT_TIMEOUT="1")  # nothing listens
    store = Store(cfg)
    try:
        with pytest.raises(TransientError, match=r"cannot connect to PostgreSQL: .*(refused|failed)"):
            store.ping()
    finally:
        store.close()


def test_message_that_keeps_killing_workers_is_dead_lettered(make_worker, r, db, bot: Bot) -> None:
    worker = make_worker(MAX_ATTEMPTS="3")
    payload = bot.message("list my models")
    r.hset(ATTEMPTS, payload["messageId"], 3)  # three earlier attempts died with their worker
    push(r, payload)
    worker.run_once()
    [event] = events(r, ERRORS)
    assert event["code"] == errors.DEAD_LETTERED and "3 attempt" in event["error"]
    [entry] = [json.loads(x) for x in r.lrange(DEAD, 0, -1)]
    assert json.loads(entry["message"]) == payload and entry["attempts"] == 4
    assert rows_for(db, payload["messageId"]) == [] and r.llen(MESSAGES) == 0
    assert r.hget(ATTEMPTS, payload["messageId"]) is None


def test_transient_failures_past_max_attempts_are_dead_lettered(make_worker, r, db, bot: Bot) -> None:
    worker = make_worker(MAX_ATTEMPTS="2", DB_STATEMENT_TIMEOUT="0.3")
    payload = bot.message("list my models")
    push(r, payload)
    with connect(db.info.dsn) as blocker:  # the history cannot be read: every load runs into its timeout
        blocker.autocommit = False
        blocker.execute("LOCK TABLE chat_messages IN ACCESS EXCLUSIVE MODE")
        for _ in range(2):
            worker.run_once()
    [event] = events(r, ERRORS)
    assert event["code"] == errors.DEAD_LETTERED and errors.DATABASE_UNAVAILABLE not in event["error"]
    assert "PostgreSQL" in event["error"]
    [entry] = [json.loads(x) for x in r.lrange(DEAD, 0, -1)]
    assert entry["code"] == errors.DATABASE_UNAVAILABLE and entry["attempts"] == 2
    assert r.llen(MESSAGES) == 0 and events(r, RESPONSES) == []


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("{not json", errors.INVALID_JSON),
        ("[]", errors.INVALID_JSON),
        ('{"botId": "x", "userId": "y", "message": "hi", "messageId": "bad-1"}', errors.INVALID_MESSAGE),
    ],
)
def test_malformed_payloads(make_worker, r, raw: str, code: str) -> None:
    worker = make_worker()
    push(r, raw)
    worker.run_once()
    [event] = events(r, ERRORS)
    assert event["code"] == code and event["messageId"]
    assert r.llen(MESSAGES) == 0 and r.llen(worker.queue.processing) == 0


def test_without_prepared_statements_the_flow_is_the_same(make_worker, r, db, bot: Bot) -> None:
    """DB_PREPARE=false (PgBouncer before 1.21 in transaction mode) sends the same statements unprepared."""
    worker = make_worker(DB_PREPARE="false")
    payload = bot.message("list my models")
    push(r, payload)
    push(r, {**payload, "messageId": payload["messageId"] + "-2", "message": "who am i"})
    worker.run_once()
    worker.run_once()
    first, second = events(r, RESPONSES)
    assert "churn, sentiment, vision" in first["botResponse"]["content"]
    assert "Ada Lovelace" in second["botResponse"]["content"]
    assert len(rows_for(db, payload["messageId"])) == 2
    # Neither of the worker's own pooled connections prepared anything; a worker with DB_PREPARE on did.
    statements = "SELECT count(*) AS n FROM pg_prepared_statements"
    assert [worker.store.fetch(statements) for _ in range(2)] == [[{"n": 0}], [{"n": 0}]]
    prepared = make_worker(1)
    push(r, {**payload, "messageId": payload["messageId"] + "-3"})
    prepared.run_once()
    for _ in range(2):  # each pooled connection prepared the named statements when it was opened
        names = {row["name"] for row in prepared.store.fetch("SELECT name FROM pg_prepared_statements")}
        assert names == {"botworker_load", "botworker_lock", "botworker_save"}
