"""What a database tool's one statement can reach besides its own answer: a select tool writes nothing and leaves
nothing behind (no locks, notifications, large objects or settings past the call, no way out of its timeout); with
DB_TOOL_URL set, no platform table, neither through the tool login's grants, nor by shedding its role with set_config,
nor through a DSN naming the platform's server; and nothing of another user's session or running queries.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from botworker.queue import ERRORS, RESPONSES
from botworker.worker import Worker

from attack_kit import DENIED, FAILED, INVALID, LOCAL, SECRET, call_of, failed, refused, rows_of
from conftest import Bot, events, push, query
from toolkit import add_secret, add_tool, ask

pytest_plugins = ["attack_kit"]


def test_cant_write_or_leave_state_from_a_select_tool(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    add_tool(
        db,
        bot,
        "cte_delete",
        "database_query",
        {"query": f"with d as (delete from {table} returning *) select * from d"},
    )
    add_tool(
        db, bot, "rw_switch", "database_query", {"query": "select set_config('transaction_read_only', 'off', false)"}
    )
    add_tool(db, bot, "sel_into", "database_query", {"query": f"select * into {table}_copy from {table}"})
    add_tool(db, bot, "nextval_write", "database_query", {"query": f"select nextval('{table}_id_seq')"})
    for tool in ("cte_delete", "rw_switch", "sel_into", "nextval_write"):
        reply, errs = ask(r, worker, bot, f"run {tool.replace('_', ' ')}")
        refused(reply, errs, tool, DENIED, FAILED)
    assert rows_of(db, table) == before
    assert query(db, "SELECT to_regclass(%s) AS t", f"{table}_copy") == [{"t": None}]
    # Comments cannot hide a second statement: this one is a single harmless SELECT, and nothing changes.
    add_tool(
        db, bot, "hidden", "database_query", {"query": f"select 1 as one /* ; delete from {table}; /* nested */ */"}
    )
    reply, errs = ask(r, worker, bot, "run hidden")
    assert errs == [] and call_of(reply, "hidden")["result"]["rows"] == [{"one": 1}]
    # A session lock taken by a tool does not outlive the call (checked from another connection).
    key = 0x5EC0 + uuid.uuid4().int % 100000
    add_tool(db, bot, "locker", "database_query", {"query": f"select pg_advisory_lock({key}) is null as locked"})
    add_tool(db, bot, "session_gucs", "database_query", {"query": "select set_config('attack.note', 'left', false)"})
    reply, errs = ask(r, worker, bot, "run locker and session gucs")
    assert errs == [] and call_of(reply, "locker")["ok"] and call_of(reply, "session_gucs")["ok"]
    assert query(db, "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND objid = %s", key) == [{"n": 0}]
    assert query(db, "SELECT pg_try_advisory_lock(%s) AS got", key) == [{"got": True}]
    query(db, "SELECT pg_advisory_unlock(%s)", key)
    add_tool(db, bot, "reader", "database_query", {"query": "select current_setting('attack.note', true) as note"})
    reply, errs = ask(r, worker, bot, "run reader")
    assert errs == [] and call_of(reply, "reader")["result"]["rows"][0]["note"] in (None, "")  # rolled back


def test_cant_lock_notify_or_outlast_the_timeout_from_a_select_tool(make_worker, r, db, bot, table) -> None:
    worker = make_worker(DB_TOOL_TIMEOUT="0.5")
    before = rows_of(db, table)
    objects = query(db, "SELECT count(*) AS n FROM pg_largeobject_metadata")
    listener = psycopg.connect(db.info.dsn)
    listener.autocommit = True
    try:
        query(listener, "LISTEN attack2")
        tools = {
            "for_update": (f"select * from {table} for update", (DENIED, FAILED)),
            "for_share": (f"select * from {table} for key share", (DENIED, FAILED)),
            "notifier": ("select pg_notify('attack2', 'hello')", (DENIED, FAILED, None)),
            "large_obj": ("select lo_creat(-1)", (DENIED, FAILED, None)),  # runs, and is rolled back
            "lo_from": ("select lo_from_bytea(0, 'x'::bytea)", (DENIED, FAILED, None)),
            "untimed": ("select set_config('statement_timeout', '0', true), pg_sleep(3)", (FAILED,)),
            "spinner": ("select count(*) from generate_series(1, 2000000000)", (FAILED,)),
            "escape_wrap": (f"select 1 as a) x; delete from {table}; select * from (select 1", (INVALID,)),
            "escape_union": (f"select 1 as a) x union all (select id from {table}", (INVALID,)),
            "escape_comment": (f"select 1 as a /* ) x; delete from {table}; -- */", (None,)),
        }
        for name, (sql, _) in tools.items():
            add_tool(db, bot, name, "database_query", {"query": sql, "retry": False})
        for name, (_, codes) in tools.items():
            started = time.monotonic()
            reply, errs = ask(r, worker, bot, f"run {name.replace('_', ' ')}")
            made = call_of(reply, name)
            assert [e["code"] for e in errs] == ([made["code"]] if not made["ok"] else [])
            assert time.monotonic() - started < 2.5, (name, made)
            if None in codes and made["ok"]:
                continue
            failed(made, *[c for c in codes if c])
        query(db, "NOTIFY attack2, 'control'")  # a committed notification does arrive: the listener listens
        # The first notification to arrive is the control one: the tool's was rolled back, never sent.
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["control"]
    finally:
        listener.close()
    assert rows_of(db, table) == before
    assert query(db, "SELECT count(*) AS n FROM pg_largeobject_metadata") == objects


def test_cant_read_platform_tables_past_db_tool_url(make_worker, r, db, bot, tool_url) -> None:
    worker = make_worker(DB_TOOL_URL=tool_url)
    add_tool(db, bot, "peek_secrets", "database_query", {"query": 'select "encryptedValue" from secrets'})
    add_tool(db, bot, "peek_users", "database_query", {"query": "select email, password from users"})
    add_tool(db, bot, "peek_file", "database_query", {"query": "select pg_read_file('/etc/hostname') as f"})
    for tool in ("peek_secrets", "peek_users", "peek_file"):
        reply, errs = ask(r, worker, bot, f"run {tool.replace('_', ' ')}")
        call = refused(reply, errs, tool, DENIED)
        assert "permission denied" in call["error"]


def test_cant_shed_db_tool_url_with_set_config(make_worker, r, db, bot, other, tool_url) -> None:
    worker = make_worker(DB_TOOL_URL=tool_url)
    victim = add_secret(db, other.user_id, "someone else's token")
    inner = f"select current_user as who, \"encryptedValue\" as v from secrets where id = ''{victim}''"
    sql = f"select set_config('role', 'none', true) as r, query_to_xml('{inner}', false, false, '') as x"
    add_tool(db, bot, "role_shed", "database_query", {"query": sql})
    reply, errs = ask(r, worker, bot, "run role shed")
    call = call_of(reply, "role_shed")
    stolen = query(db, 'SELECT "encryptedValue" AS v FROM secrets WHERE id = %s', victim)[0]["v"]
    assert stolen not in json.dumps(call), f"another user's encrypted secret came back: {call.get('result')}"
    refused(reply, errs, "role_shed", DENIED)


def test_cant_reach_the_platform_database_past_db_tool_url_with_a_dsn(
    make_worker, r, db, bot, other, servers, tool_url
) -> None:
    parts = urlsplit(servers.database_url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the test database is not on this host")
    dbname, user = parts.path.lstrip("/"), parts.username or "postgres"
    dsn = f"host=127.0.0.1 port={parts.port or 5432} dbname={dbname} user={user}"  # no password at all
    try:
        psycopg.connect(dsn, passfile="/dev/null", connect_timeout=3).close()
    except psycopg.OperationalError:
        pytest.skip("the test database wants a password: a DSN without one cannot log in")
    victim = add_secret(db, other.user_id, "another user's " + SECRET)
    stolen = query(db, 'SELECT "encryptedValue" AS v FROM secrets WHERE id = %s', victim)[0]["v"]
    dsn_id = add_secret(db, bot.user_id, dsn, key="DSN")
    sql = f"select \"encryptedValue\" as v from secrets where id = '{victim}'"
    add_tool(db, bot, "side_door", "database_query", {"query": sql, "secretId": dsn_id})
    add_tool(db, bot, "front_door", "database_query", {"query": sql})
    # The operator restricted tools to a login without grants, and opened 127.0.0.1 for an internal HTTP API.
    worker = make_worker(DB_TOOL_URL=tool_url, HTTP_ALLOWED_HOSTS=LOCAL)
    reply, errs = ask(r, worker, bot, "run front door")
    refused(reply, errs, "front_door", DENIED)  # the platform's tables are out of reach...
    reply, errs = ask(r, worker, bot, "run side door")  # ...unless the tool's own DSN names the same server
    call = call_of(reply, "side_door")
    assert stolen not in json.dumps(call), f"a tool DSN read another user's secret: {call.get('result')}"
    refused(reply, errs, "side_door", DENIED, FAILED)


def test_cant_leave_session_state_for_another_user(make_worker, r, db, bot, other, table) -> None:
    worker = make_worker()
    config = {
        "query": f"update {table} set note = note where set_config('attack.note', {{{{note}}}}, false) is not null",
        "type": "update",
    }
    add_tool(db, bot, "stasher", "database_query", config)
    add_tool(db, other, "peeker", "database_query", {"query": "select current_setting('attack.note', true) as note"})
    reply, errs = ask(r, worker, bot, 'run stasher note="private note of user A"')
    assert errs == [] and call_of(reply, "stasher")["ok"]
    reply, errs = ask(r, worker, other, "run peeker")
    assert errs == []
    assert call_of(reply, "peeker")["result"]["rows"][0]["note"] in (None, "")


def _wait_active(db: psycopg.Connection[Any], marker: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        # Not this query itself (it holds the same words), and the words in either order (the worker wraps selects).
        rows = query(
            db,
            """SELECT count(*) AS n FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND state = 'active'
               AND query LIKE %s AND query LIKE '%%pg_sleep%%'""",
            f"%{marker}%",
        )
        if rows[0]["n"]:
            return
        time.sleep(0.02)
    raise AssertionError("the victim's query never started")


def while_busy(
    r: redis.Redis,
    db: psycopg.Connection[Any],
    victim: tuple[Worker, Bot, str, str],
    attacker: tuple[Worker, Bot, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """User B's message runs a slow tool on one worker; meanwhile user A's message runs on another worker.
    Returns (A's reply, B's reply)."""
    victim_worker, victim_bot, victim_text, marker = victim
    attacker_worker, attacker_bot, attacker_text = attacker
    r.delete(RESPONSES, ERRORS)
    push(r, victim_bot.message(victim_text))
    thread = threading.Thread(target=victim_worker.run_once, daemon=True)
    thread.start()
    try:
        _wait_active(db, marker)
        push(r, attacker_bot.message(attacker_text))
        assert attacker_worker.run_once()
    finally:
        thread.join(10)
    replies = {e["userId"]: e["botResponse"] for e in events(r, RESPONSES)}
    return replies[attacker_bot.user_id], replies[victim_bot.user_id]


def test_cant_read_another_users_running_tool_query(make_worker, r, db, bot, other, tool_url) -> None:
    attacker_worker, victim_worker = make_worker(DB_TOOL_URL=tool_url), make_worker(DB_TOOL_URL=tool_url)
    private = "victim-private-" + uuid.uuid4().hex[:8]
    add_tool(db, other, "lookup", "database_query", {"query": "select {{who}}::text as who, pg_sleep(1.5) as s"})
    add_tool(
        db,
        bot,
        "snoop",
        "database_query",
        {"query": "select query from pg_stat_activity where pid <> pg_backend_pid() and query like '%%pg_sleep%%'"},
    )
    reply, _ = while_busy(
        r, db, (victim_worker, other, f'run lookup who="{private}"', "who"), (attacker_worker, bot, "run snoop")
    )
    assert call_of(reply, "snoop")["ok"]
    seen = json.dumps(call_of(reply, "snoop")["result"])
    assert private not in seen, f"user A's select tool read user B's in-flight parameters: {seen[:300]}"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "DEPLOYMENT: all tool connections log in as the one DB_TOOL_URL role, and PostgreSQL lets a role cancel its "
        "own sessions unless EXECUTE on pg_cancel_backend is revoked (docs/tools.md; the worker warns at connect)"
    ),
)
def test_cant_cancel_another_users_tool_query(make_worker, r, db, bot, other, tool_url) -> None:
    attacker_worker, victim_worker = make_worker(DB_TOOL_URL=tool_url), make_worker(DB_TOOL_URL=tool_url)
    add_tool(db, other, "report", "database_query", {"query": "select pg_sleep(1.5) as s, 'report' as what"})
    add_tool(
        db,
        bot,
        "killer",
        "database_query",
        {
            "query": "select pg_cancel_backend(pid) as cancelled from pg_stat_activity "
            "where pid <> pg_backend_pid() and query like '%%pg_sleep%%'"
        },
    )
    reply, victim = while_busy(
        r, db, (victim_worker, other, "run report", "report"), (attacker_worker, bot, "run killer")
    )
    assert call_of(reply, "killer")["ok"]
    report = call_of(victim, "report")
    assert report["ok"], f"user A's select tool cancelled user B's query: {report.get('error')}"
