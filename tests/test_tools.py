"""HTTP, database and secret-using tools end to end: a real message through an in-process worker, real Redis and
PostgreSQL, a real local HTTP server. (Hostile input lives in tests/attacks/; pure parts in test_params.py,
test_access.py, test_budget.py, test_secrets.py, test_retry.py and test_dispatch.py.)"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from botworker import errors
from botworker.queue import ERRORS, RESPONSES
from botworker.worker import Worker

from conftest import Bot, Servers, events, push, query
from toolkit import PASSPHRASE, LocalHTTP, add_secret, add_tool, ask, calls_of, start_http, tcp_forwarder

pytest_plugins = ["attack_kit"]

ENV = {
    "ENCRYPTION_KEY": PASSPHRASE,
    "HTTP_ALLOWED_HOSTS": "127.0.0.1/32",
    "TOOL_RETRY_DELAY": "0.01",
    "TOOL_RETRY_AFTER_MAX": "3",
}


@pytest.fixture
def http() -> Iterator[LocalHTTP]:
    yield from start_http()


@pytest.fixture
def make_worker(make_worker: Callable[..., Worker]) -> Callable[..., Worker]:
    """attack_kit's in-process workers, with this file's settings as defaults."""
    return lambda **env: make_worker(**{**ENV, **env})


@pytest.fixture
def worker(make_worker: Callable[..., Worker]) -> Worker:
    return make_worker()


@pytest.fixture
def orders(db: psycopg.Connection[Any]) -> Iterator[str]:
    """A table of the test's own, with three rows."""
    table = "orders_" + uuid.uuid4().hex[:8]
    query(db, f"CREATE TABLE {table} (id serial PRIMARY KEY, item text, qty int, price numeric(8,2))")
    query(
        db, f"INSERT INTO {table} (item, qty, price) VALUES ('widget', 3, 9.50), ('gadget', 1, 120), ('widget', 2, 9.5)"
    )
    yield table
    query(db, f"DROP TABLE {table}")


# ---- http_request -----------------------------------------------------------------------------------------


def test_http_get_fills_parameters_url_encoded(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(
        db,
        bot,
        "weather_api",
        "http_request",
        {
            "url": http.url + "/json?city={{city}}&days={{days}}",
            "parameters": {"city": {"type": "string", "required": True}, "days": {"type": "integer", "default": 3}},
        },
    )
    reply, errs = ask(r, worker, bot, 'call the weather api city="São Paulo & Co/?#"')
    assert errs == []
    [call] = calls_of(reply)
    assert call["ok"] and call["attempts"] == 1
    assert call["params"]["city"] == "São Paulo & Co/?#" and call["params"]["days"] == 3
    [seen] = http.seen
    assert seen.path == "/json" and seen.query == {"city": ["São Paulo & Co/?#"], "days": ["3"]}
    assert call["result"]["status"] == 200 and call["result"]["json"]["ok"] is True
    assert "application/json" in call["result"]["headers"]["content-type"]


def test_http_post_json_body_is_built_not_spliced(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    config = {
        "url": http.url + "/echo",
        "method": "POST",
        "headers": {"X-Trace": "trace-{{tag}}"},
        "body": {"query": "{{q}}", "limit": "{{n}}", "note": "asked: {{q}}"},
        "parameters": {"q": {"type": "string"}, "n": {"type": "integer"}, "tag": {"type": "string"}},
    }
    add_tool(db, bot, "search_api", "http_request", config)
    _reply, errs = ask(r, worker, bot, "use the search api q='he said \"hi\" {x}' n=5 tag=abc")
    assert errs == [], errs
    [seen] = http.seen
    assert seen.method == "POST" and seen.headers["X-Trace"] == "trace-abc"
    assert seen.headers["Content-Type"] == "application/json"
    assert json.loads(seen.body) == {"query": 'he said "hi" {x}', "limit": 5, "note": 'asked: he said "hi" {x}'}


def test_http_secret_goes_in_the_header_and_nowhere_else(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    value = "tok_" + uuid.uuid4().hex
    secret = add_secret(db, bot.user_id, value)
    add_tool(db, bot, "echo_api", "http_request", {"url": http.url + "/echo", "secretId": secret})
    add_tool(
        db,
        bot,
        "keyed_api",
        "http_request",
        {"url": http.url + "/echo", "secretId": secret, "secretHeader": "X-Api-Key"},
    )
    reply, errs = ask(r, worker, bot, "call the echo api and the keyed api")
    assert errs == []
    assert [s.headers.get("Authorization") for s in http.seen] == [f"Bearer {value}", None]
    assert http.seen[1].headers["X-Api-Key"] == value
    echoed = [c["result"]["json"]["headers"] for c in calls_of(reply)]
    assert echoed[0]["Authorization"] == "Bearer [redacted]" and echoed[1]["X-Api-Key"] == "[redacted]"
    stored = query(db, 'SELECT content, metadata::text AS m FROM chat_messages WHERE "userId" = %s', bot.user_id)
    assert stored and all(value not in row["content"] + row["m"] for row in stored)


def test_idempotent_calls_are_retried_and_counted(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(db, bot, "flaky_api", "http_request", {"url": http.url + "/flaky/2/503"})
    reply, errs = ask(r, worker, bot, "call the flaky api")
    [call] = calls_of(reply)
    assert call["ok"] and call["attempts"] == 3 and call["result"]["json"]["try"] == 3
    assert errs == []


def test_post_is_not_retried_unless_the_tool_opts_in(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(db, bot, "order_api", "http_request", {"url": http.url + "/flaky/1/503", "method": "POST"})
    reply, errs = ask(r, worker, bot, "call the order api")
    [call] = calls_of(reply)
    assert not call["ok"] and call["attempts"] == 1 and "503" in call["error"]
    assert [e["code"] for e in errs] == [errors.TOOL_FAILED]
    add_tool(db, bot, "retry_api", "http_request", {"url": http.url + "/flaky/1/502", "method": "POST", "retry": True})
    reply, errs = ask(r, worker, bot, "call the retry api")
    [call] = calls_of(reply)
    assert call["ok"] and call["attempts"] == 2


def test_retry_after_is_honoured_and_capped(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(db, bot, "limited_api", "http_request", {"url": http.url + "/flaky/1/429?retry_after=1"})
    reply, _ = ask(r, worker, bot, "call the limited api")
    [call] = calls_of(reply)
    assert call["ok"] and call["attempts"] == 2 and call["durationMs"] >= 950
    add_tool(db, bot, "busy_api", "http_request", {"url": http.url + "/status/503?retry_after=3600"})
    reply, _ = ask(r, worker, bot, "call the busy api")
    [call] = calls_of(reply)
    assert not call["ok"] and call["attempts"] == 1 and "TOOL_RETRY_AFTER_MAX" in call["error"]


def test_exhausted_retries_and_timeouts_fail_clearly(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(db, bot, "down_api", "http_request", {"url": http.url + "/status/504"})
    add_tool(db, bot, "slow_api", "http_request", {"url": http.url + "/slow?s=2", "timeout": 0.3, "retry": False})
    reply, errs = ask(r, worker, bot, "call the down api, then the slow api")
    down, slow = calls_of(reply)
    assert not down["ok"] and down["attempts"] == 3 and "504" in down["error"]
    assert not slow["ok"] and slow["attempts"] == 1 and "timed out" in slow["error"]
    assert [e["code"] for e in errs] == [errors.TOOL_FAILED]
    assert "down_api" in errs[0]["error"] and "slow_api" in errs[0]["error"]


def test_large_responses_are_capped_and_budgeted(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, make_worker: Callable[..., Worker], http: LocalHTTP
) -> None:
    worker = make_worker(HTTP_MAX_RESPONSE_BYTES="4096", TOOL_RESULT_BUDGET="1000")
    add_tool(db, bot, "big_api", "http_request", {"url": http.url + "/big?bytes=100000"})
    reply, _ = ask(r, worker, bot, "call the big api")
    [call] = calls_of(reply)
    assert call["ok"] and call["resultTruncated"] is True
    assert isinstance(call["result"], str) and len(call["result"].encode()) <= 1000 and "truncated" in call["result"]


def test_redirects_are_followed_within_the_policy(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(db, bot, "moved_api", "http_request", {"url": http.url + "/redirect?to=/json%3Fmoved%3D1"})
    reply, _errs = ask(r, worker, bot, "call the moved api")
    [call] = calls_of(reply)
    assert call["ok"] and call["result"]["json"]["query"] == {"moved": ["1"]}
    assert [s.path for s in http.seen] == ["/redirect", "/json"]


def test_loopback_is_refused_without_an_allowlist(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, make_worker: Callable[..., Worker], http: LocalHTTP
) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS="")
    add_tool(db, bot, "local_api", "http_request", {"url": http.url + "/json"})
    reply, errs = ask(r, worker, bot, "call the local api")
    [call] = calls_of(reply)
    assert not call["ok"] and call["code"] == errors.TOOL_DENIED and "loopback" in call["error"]
    assert [e["code"] for e in errs] == [errors.TOOL_DENIED]
    assert http.seen == []


# ---- database_query ---------------------------------------------------------------------------------------


def test_select_binds_parameters_and_returns_rows(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, orders: str
) -> None:
    add_tool(
        db,
        bot,
        "orders_db",
        "database_query",
        {"query": f"SELECT item, qty, price FROM {orders} WHERE item = '{{{{item}}}}' ORDER BY id", "type": "select"},
        display="Orders DB",
    )
    reply, errs = ask(r, worker, bot, 'query the orders database item="widget"')
    assert errs == []
    [call] = calls_of(reply)
    assert call["result"] == {
        "columns": ["item", "qty", "price"],
        "rows": [{"item": "widget", "qty": 3, "price": 9.5}, {"item": "widget", "qty": 2, "price": 9.5}],
        "rowCount": 2,
        "truncated": False,
    }
    reply, _ = ask(r, worker, bot, "query the orders database item=\"widget' OR '1'='1\"")
    assert calls_of(reply)[0]["result"]["rows"] == []


def test_select_tools_are_read_only_and_capped(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, make_worker: Callable[..., Worker], orders: str
) -> None:
    worker = make_worker(DB_TOOL_MAX_ROWS="5", DB_TOOL_TIMEOUT="0.3")
    add_tool(
        db,
        bot,
        "purge",
        "database_query",
        {"query": f"WITH d AS (DELETE FROM {orders} RETURNING *) SELECT count(*) FROM d"},
    )
    add_tool(db, bot, "numbers", "database_query", {"query": "SELECT n FROM generate_series(1, 1000) n"})
    add_tool(db, bot, "sleepy", "database_query", {"query": "SELECT pg_sleep(5)"})
    add_tool(db, bot, "sneaky", "database_query", {"query": f"DELETE FROM {orders}", "type": "select"})
    reply, _errs = ask(r, worker, bot, "run purge, numbers, sleepy and sneaky")
    purge, numbers, sleepy, sneaky = calls_of(reply)
    assert not purge["ok"] and purge["code"] == errors.TOOL_DENIED and "may not modify data" in purge["error"]
    assert numbers["ok"] and numbers["result"]["truncated"] and len(numbers["result"]["rows"]) == 5
    assert not sleepy["ok"] and "cancelled" in sleepy["error"]
    assert not sneaky["ok"] and sneaky["code"] == errors.TOOL_INVALID_PARAMS and "DELETE" in sneaky["error"]
    assert query(db, f"SELECT count(*) AS n FROM {orders}") == [{"n": 3}]


def test_write_tools_run_when_their_config_says_so(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, orders: str
) -> None:
    add_tool(
        db,
        bot,
        "add_order",
        "database_query",
        {
            "query": f"INSERT INTO {orders} (item, qty) VALUES ({{{{item}}}}, {{{{qty}}}}) RETURNING id, item, qty",
            "type": "insert",
            "parameters": {"item": {"type": "string", "required": True}, "qty": {"type": "integer", "minimum": 1}},
        },
    )
    reply, errs = ask(r, worker, bot, 'use add order item="bolt; DROP TABLE x" qty=4')
    assert errs == []
    [call] = calls_of(reply)
    assert call["ok"] and call["attempts"] == 1 and call["result"]["rows"][0]["item"] == "bolt; DROP TABLE x"
    reply, errs = ask(r, worker, bot, 'use add order item="nut" qty=0')
    assert calls_of(reply)[0]["code"] == errors.TOOL_INVALID_PARAMS and "at least 1" in calls_of(reply)[0]["error"]
    assert [e["code"] for e in errs] == [errors.TOOL_INVALID_PARAMS]
    assert query(db, f"SELECT count(*) AS n FROM {orders}") == [{"n": 4}]


def test_database_from_a_secret_dsn(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, servers: Servers, orders: str
) -> None:
    parts = urlsplit(servers.database_url)
    # Another database server, as far as the worker can tell: a port of its own (forwarded to the test server).
    forwarder = tcp_forwarder(parts.hostname or "127.0.0.1", parts.port or 5432)
    port = next(forwarder)
    try:
        other = parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{port}").geturl()
        dsn = add_secret(db, bot.user_id, other, key="DSN")
        add_tool(
            db, bot, "warehouse", "database_query", {"query": f"SELECT count(*) AS n FROM {orders}", "secretId": dsn}
        )
        reply, errs = ask(r, worker, bot, "query the warehouse")
        assert errs == [] and calls_of(reply)[0]["result"]["rows"] == [{"n": 3}]
    finally:
        forwarder.close()
    # The platform's own server through a DSN would bypass DB_TOOL_URL: refused.
    direct = add_secret(db, bot.user_id, servers.database_url, key="DSN")
    add_tool(db, bot, "backdoor", "database_query", {"query": "SELECT 1 AS one", "secretId": direct})
    reply, _ = ask(r, worker, bot, "query the backdoor")
    [call] = calls_of(reply)
    assert call["code"] == errors.TOOL_DENIED and "platform database" in call["error"]


def test_the_tool_connection_serves_many_calls(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker
) -> None:
    """Ten calls on the worker's one tool connection: nothing a call leaves (or DISCARD ALL removes, such as
    prepared statements a driver made on its own) breaks the next."""
    add_tool(db, bot, "counter", "database_query", {"query": "SELECT {{n}}::int + 1 AS n"})
    for i in range(10):
        reply, errs = ask(r, worker, bot, f"run the counter n={i}")
        assert errs == [] and calls_of(reply)[0]["result"]["rows"] == [{"n": i + 1}], calls_of(reply)


def test_no_session_state_survives_a_tool(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker
) -> None:
    key = uuid.uuid4().int % 2**31
    add_tool(db, bot, "locker", "database_query", {"query": f"SELECT pg_advisory_lock({key})"})
    reply, _ = ask(r, worker, bot, "run the locker")
    assert calls_of(reply)[0]["ok"]
    assert query(db, "SELECT pg_try_advisory_lock(%s) AS got", key) == [{"got": True}]
    query(db, "SELECT pg_advisory_unlock(%s)", key)


# ---- secrets and access ------------------------------------------------------------------------------------


def test_secret_of_another_user_or_inactive_is_not_found(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP, servers: Servers
) -> None:
    from botworker.demo import seed

    other_user, _ = seed(servers.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    theirs = add_secret(db, other_user, "their-token-123")
    inactive = add_secret(db, bot.user_id, "old-token-456", active=False)
    add_tool(db, bot, "theirs_api", "http_request", {"url": http.url + "/echo", "secretId": theirs})
    add_tool(db, bot, "stale_api", "http_request", {"url": http.url + "/echo", "secretId": inactive})
    reply, errs = ask(r, worker, bot, "call theirs api and stale api")
    for call in calls_of(reply):
        assert not call["ok"] and "not found" in call["error"]
    assert http.seen == []
    assert "their-token-123" not in json.dumps(reply) and "old-token-456" not in json.dumps(errs)


def test_secrets_need_the_platform_key(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, make_worker: Callable[..., Worker], http: LocalHTTP
) -> None:
    secret = add_secret(db, bot.user_id, "tok-789")
    add_tool(db, bot, "keyed_api", "http_request", {"url": http.url + "/echo", "secretId": secret})
    reply, _ = ask(r, make_worker(ENCRYPTION_KEY="not-the-platform-key"), bot, "call the keyed api")
    assert "cannot be decrypted" in calls_of(reply)[0]["error"]
    reply, _ = ask(r, make_worker(ENCRYPTION_KEY=""), bot, "call the keyed api")
    assert "ENCRYPTION_KEY is not set" in calls_of(reply)[0]["error"]
    assert http.seen == []


def test_requires_auth_and_roles(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker, http: LocalHTTP
) -> None:
    add_tool(db, bot, "members_api", "http_request", {"url": http.url + "/json"}, requires_auth=True)
    add_tool(db, bot, "admin_api", "http_request", {"url": http.url + "/json", "roles": ["admin"]})
    reply, errs = ask(r, worker, bot, "call the members api and the admin api")
    members, admin = calls_of(reply)
    assert members["ok"] and not admin["ok"] and "admin" in admin["error"] and admin["code"] == errors.TOOL_DENIED
    assert [e["code"] for e in errs] == [errors.TOOL_DENIED]
    query(db, """UPDATE users SET "isActive" = false, role = 'admin' WHERE id = %s""", bot.user_id)
    reply, _ = ask(r, worker, bot, "call the members api and the admin api")
    members, admin = calls_of(reply)
    assert not members["ok"] and "active user" in members["error"] and admin["ok"]
    assert len(http.seen) == 2


def test_workflow_actions_are_answered_unsupported(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker
) -> None:
    add_tool(db, bot, "deploy", "workflow_action", {"workflowActionId": "wf-9"})
    r.delete(RESPONSES, ERRORS)
    push(r, bot.message("run the deploy workflow"))
    assert worker.run_once()
    [error] = events(r, ERRORS)
    assert error["code"] == errors.TOOL_UNSUPPORTED and "not supported by this worker" in error["error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the sandbox as root (CI does)")
def test_shell_secret_is_one_environment_variable(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, worker: Worker
) -> None:
    value = "sh-" + uuid.uuid4().hex
    good = add_secret(db, bot.user_id, value, key="API_TOKEN")
    evil = add_secret(db, bot.user_id, "/tmp/x.so", key="LD_PRELOAD")
    add_tool(db, bot, "greet", "shell_command", {"command": "echo {{who}}", "secretId": good})
    add_tool(db, bot, "preload", "shell_command", {"command": "echo hi", "secretId": evil})
    reply, errs = ask(r, worker, bot, f"run greet who={value} and then preload")
    greet, preload = calls_of(reply)
    assert greet["ok"] and greet["result"]["stdout"].strip() == "[redacted]"  # the secret, echoed back
    assert not preload["ok"] and "LD_PRELOAD" in preload["error"] and "not allowed" in preload["error"]
    assert greet["params"] == {"who": "[redacted]"}
    assert value not in json.dumps(reply) + json.dumps(errs)  # the reply row (the user's own message aside)
