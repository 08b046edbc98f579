"""The store and the database tools through PgBouncer in transaction mode with its default settings: Debian's
``pgbouncer``, started by the test in front of the suite's PostgreSQL, with one server connection that every
client shares (so one client's session state would show in another's)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from botworker.devservers import start_pgbouncer
from botworker.errors import TransientError
from botworker.queue import DEAD, ERRORS, RESPONSES
from botworker.worker import Worker

from conftest import Bot, Servers, connect, events, push, query
from toolkit import add_tool, ask, calls_of

pytest_plugins = ["attack_kit"]  # make_worker


@pytest.fixture(scope="module")
def bouncer(servers: Servers) -> Iterator[str]:
    if not shutil.which("pgbouncer", path="/usr/sbin:/usr/bin:/sbin:/bin"):
        pytest.skip("PgBouncer is not installed (./dev test installs Debian's pgbouncer when it runs as root)")
    workdir = Path(tempfile.mkdtemp(prefix="botworker-pgbouncer-"))
    workdir.chmod(0o755)
    server = start_pgbouncer(workdir, servers.database_url, pool_size=1)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def rows_for(db, message_id: str) -> list[dict]:
    return query(db, "SELECT role FROM chat_messages WHERE metadata->>'messageId' = %s ORDER BY role::text", message_id)


def test_messages_and_tools_work_through_pgbouncer(
    make_worker: Callable[..., Worker], r: redis.Redis, db, bot: Bot, bouncer: str
) -> None:
    worker = make_worker(DATABASE_URL=bouncer, DB_PREPARE="false")
    add_tool(db, bot, "model_count", "database_query", {"query": "select count(*) as n from models"})
    first = bot.message("list my models")
    push(r, first)
    assert worker.run_once()
    [event] = events(r, RESPONSES)
    instance = event["botResponse"]["botInstanceId"]
    assert "churn, sentiment, vision" in event["botResponse"]["content"]
    reply, errs = ask(r, worker, bot, "run model count")  # a tool on the tool connection (DISCARD ALL after it)
    assert errs == [] and [c["ok"] for c in calls_of(reply)] == [True]
    r.delete(RESPONSES)
    follow = bot.message("who am i", instanceId=instance)
    push(r, follow)
    assert worker.run_once()
    [event] = events(r, RESPONSES)
    assert "Ada Lovelace" in event["botResponse"]["content"] and event["botResponse"]["botInstanceId"] == instance
    assert rows_for(db, first["messageId"]) == rows_for(db, follow["messageId"]) == [{"role": "bot"}, {"role": "user"}]


def test_timeouts_and_utc_hold_per_transaction_and_stay_there(
    make_worker: Callable[..., Worker], bot: Bot, bouncer: str
) -> None:
    """No ``options`` startup parameter (PgBouncer refuses it) and no session SET (it would reach whichever client
    gets the server connection next): each transaction carries its own settings."""
    worker = make_worker(DATABASE_URL=bouncer, DB_PREPARE="false", DB_STATEMENT_TIMEOUT="0.3")
    [row] = worker.store.fetch("SELECT current_setting('statement_timeout') AS t, current_setting('TimeZone') AS z")
    assert row == {"t": "300ms", "z": "UTC"}
    with pytest.raises(TransientError, match="statement timeout"):
        worker.store.fetch("SELECT pg_sleep(2)")
    with connect(bouncer) as other:  # the next client of the same (only) server connection
        assert query(other, "SELECT current_setting('statement_timeout') AS t") == [{"t": "0"}]
    assert worker.store._per_transaction or worker.store._connection_class.without_options  # it saw the pooler


def test_a_direct_connection_keeps_its_settings_in_the_session(make_worker: Callable[..., Worker]) -> None:
    """Without a pooler the settings ride in the startup packet, checked once per connection: no SET LOCAL frame
    in every transaction (at the default timeout too: PostgreSQL shows 30000 ms as "30s")."""
    worker = make_worker()
    assert worker.store.fetch("SELECT current_setting('statement_timeout') AS t") == [{"t": "30s"}]
    assert not worker.store._per_transaction


def test_prepared_statements_behind_pgbouncer_fall_back_instead_of_crashing(
    make_worker: Callable[..., Worker], r: redis.Redis, bot: Bot, bouncer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """DB_PREPARE left on behind PgBouncer 1.18: two workers' statements meet on one server connection (a duplicate
    name, or a name that is not there). The worker says what is wrong, stops preparing, and loses nothing."""
    workers = [make_worker(DATABASE_URL=bouncer) for _ in range(2)]
    sent = [bot.message(text) for _ in range(4) for text in ("list my models", "who am i")]
    with caplog.at_level(logging.ERROR, logger="botworker.store"):
        for i, payload in enumerate(sent):
            push(r, payload)
            assert workers[i % 2].run_once()
    assert len(events(r, RESPONSES)) == len(sent) and events(r, ERRORS) == [] and r.llen(DEAD) == 0
    assert "stops preparing statements; set DB_PREPARE=false" in caplog.text


def test_a_batch_goes_through_pgbouncer_in_one_transaction_each_way(
    make_worker: Callable[..., Worker], r: redis.Redis, db, bot: Bot, bouncer: str
) -> None:
    """A backlog taken at once (WORKER_BATCH): its load and its save are each one multi-statement transaction,
    which PgBouncer in transaction mode hands to one server connection whole."""
    worker = make_worker(DATABASE_URL=bouncer, DB_PREPARE="false", WORKER_BATCH="8")
    msgs = [bot.message("list my models" if i % 2 else f"hello {i}") for i in range(6)]
    for msg in msgs:
        push(r, msg)
    assert worker.run_once()
    assert sorted(e["messageId"] for e in events(r, RESPONSES)) == sorted(m["messageId"] for m in msgs)
    assert events(r, ERRORS) == []
    assert all(rows_for(db, m["messageId"]) == [{"role": "bot"}, {"role": "user"}] for m in msgs)
