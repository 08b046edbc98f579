"""Attacks on tools through real messages: a real worker, the test Redis and PostgreSQL, local HTTP servers.

Every test sends ordinary bot messages (the attacker controls the text, hence the tool parameters) to a worker
whose bot has tools configured the way a platform user would configure them, then checks two things: the attack
failed in a readable way (a failed tool call in the reply's ``toolCalls`` and/or a ``bot_errors`` event with a
tool_* code), and nothing happened (no row changed, no request reached the internal target, no secret anywhere).

The first sweep found ten holes (a lexer gap letting a select tool run three statements, DB_TOOL_ROLE undone by
set_config, session settings shared between users, a truncated secret, secrets in other encodings, the worker's
PGPASSWORD sent to a tool's server, a dripping server outliving the timeout, the row cap not bounding memory, form
body injection, URL credentials in errors); each test here was an xfail until its hole was closed.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import psycopg
import pytest

from botworker import errors
from botworker.queue import ERRORS, RESPONSES

from attack_kit import (
    DENIED,
    FAILED,
    INVALID,
    LOCAL,
    assert_nowhere,
    call_of,
    refused,
    rows_of,
    send,
)
from conftest import Servers, events, push, query
from toolkit import LocalHTTP, QuietHandler, add_secret, add_tool, ask, calls_of, start_http, tcp_forwarder

pytest_plugins = ["attack_kit"]

# A secret with characters that need escaping in JSON, URLs and headers; the ASCII tail makes prefixes long.
SECRET = 'p@ss/wörd"+ =-7c1d9e0f4a2b'
# ---- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture
def web2() -> Iterator[LocalHTTP]:
    yield from start_http()


WEIRD = "' OR '1'='1"  # a stored name that is itself an injection string: binding must find exactly this row


@pytest.fixture
def table(db: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table with three rows; dropped afterwards."""
    name = "attack_" + uuid.uuid4().hex[:10]
    query(db, f"CREATE TABLE {name} (id serial PRIMARY KEY, name text NOT NULL, note text)")
    query(db, f"INSERT INTO {name} (name, note) VALUES ('alice', 'a'), ('bob', 'b'), (%s, 'weird')", WEIRD)
    yield name
    query(db, f"DROP TABLE IF EXISTS {name}")


class Evil:
    """A hostile HTTP server on 127.0.0.1: drips, gzip bombs, reflects the Authorization header back."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.bomb = gzip.compress(b"\0" * (20 << 20), compresslevel=9)
        state = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(parts.query).items()}
                state.seen.append(parts.path)
                if parts.path == "/drip":  # a body that never stops arriving, one byte at a time
                    n, every = int(q["n"]), float(q["every"])
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    try:
                        for _ in range(n):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(every)
                    except OSError:
                        pass
                elif parts.path == "/bomb":
                    self._raw(200, state.bomb, "text/plain", {"Content-Encoding": "gzip"})
                elif parts.path == "/reflect":  # the header back, as a debug endpoint or an error page would
                    auth = self.headers.get("Authorization", "")
                    status = int(q.get("status", "200"))
                    if q.get("style") == "json":
                        body = json.dumps({"error": "bad token", "got": auth}, ensure_ascii=False).encode()
                        self._raw(status, body, "application/json")
                    else:
                        pad = int(q.get("pad", "0"))
                        self._raw(status, b"x" * pad + auth.encode() + b"y" * 3000, "text/plain")
                else:
                    self._raw(404, b"no", "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def evil() -> Iterator[Evil]:
    server = Evil()
    yield server
    server.server.shutdown()
    server.server.server_close()


# ---- SSRF ------------------------------------------------------------------------------------------------------

SSRF_TARGETS = (
    "http://127.0.0.1:{port}/json",
    "http://localhost:{port}/json",
    "http://[::1]:{port}/json",
    "http://0x7f000001:{port}/json",
    "http://2130706433:{port}/json",
    "http://017700000001:{port}/json",
    "http://127.1:{port}/json",
    "http://127.0.0.1.:{port}/json",
    "http://[::ffff:127.0.0.1]:{port}/json",
    "http://[0:0:0:0:0:ffff:7f00:1]:{port}/json",
    "http://0.0.0.0:{port}/json",
    "http://0:{port}/json",
    "HTTP://127.0.0.1:{port}/json",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11:{port}/json",  # full-width digits, NFKC -> 127.0.0.1
    "http://10.0.0.1/",
    "http://192.168.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.100.100.200/latest/meta-data/",
    "file:///etc/passwd",
    "gopher://127.0.0.1:{port}/_GET%20/json",
    "ftp://127.0.0.1:{port}/",
    "dict://127.0.0.1:{port}/info",
    "//127.0.0.1:{port}/json",
    "http://user:pass@example.com/",
    "http://example.com@127.0.0.1:{port}/json",
    "http://127.0.0.1:{port}\\@example.com/json",
)


def test_cant_reach_internal_addresses_through_a_url_parameter(make_worker, r, db, bot, web) -> None:
    worker = make_worker()  # HTTP_ALLOWED_HOSTS unset: nothing internal is reachable
    add_tool(db, bot, "fetcher", "http_request", {"url": "{{url}}", "timeout": 2})
    port = web.server.server_address[1]
    problems = []
    for target in SSRF_TARGETS:
        url = target.format(port=port)
        started = time.monotonic()
        reply, errs = ask(r, worker, bot, f"use fetcher url={url}")
        call = call_of(reply, "fetcher")
        if call.get("params", {}).get("url") != url:
            problems.append((url, "detection did not pass the URL", call.get("params")))
        elif call["ok"] or call["code"] not in (DENIED, INVALID, FAILED) or [e["code"] for e in errs] != [call["code"]]:
            problems.append((url, call, errs))
        elif time.monotonic() - started > 2 or "refused" in call["error"] or "timed out" in call["error"]:
            problems.append((url, "it tried to connect", time.monotonic() - started, call["error"]))
    assert problems == []
    assert web.seen == []  # not one request reached the local server


def test_cant_be_redirected_to_internal_addresses(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)  # the first hop is allowed, the next ones are not
    add_tool(db, bot, "bouncer", "http_request", {"url": web.url + "/redirect?to={{url}}", "timeout": 2})
    port = web.server.server_address[1]
    targets = (
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:a9fe:a9fe]/",
        f"http://[::1]:{port}/json",
        "//169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "gopher://127.0.0.1:6379/_FLUSHALL",
    )
    for to in targets:
        reply, errs = ask(r, worker, bot, f"use bouncer url={to}")
        call = refused(reply, errs, "bouncer", DENIED, INVALID)
        assert call["params"]["url"] == to
    assert web.hits == {"/redirect": len(targets)}  # every first hop, and nothing after it
    # Control: a redirect to an allowed place is followed, so the refusals above are the policy's.
    reply, errs = ask(r, worker, bot, f"use bouncer url={web.url}/json?x=1")
    assert errs == [] and call_of(reply, "bouncer")["result"]["json"]["ok"] is True


def test_cant_carry_a_secret_header_across_a_redirect(make_worker, r, db, bot, web, web2) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    secret_id = add_secret(db, bot.user_id, SECRET)
    config = {"url": web.url + "/redirect?to={{url}}", "secretId": secret_id, "timeout": 2}
    add_tool(db, bot, "hopper", "http_request", config)
    reply, errs = ask(r, worker, bot, f"use hopper {web2.url}/echo")  # another origin (port)
    assert errs == [] and call_of(reply, "hopper")["ok"]
    [sent] = web2.seen
    assert not any(k.lower() == "authorization" for k in sent.headers), sent.headers
    # Control: the same origin keeps it (so the header was really being sent).
    reply, errs = ask(r, worker, bot, f"use hopper {web.url}/echo")
    assert errs == [] and web.seen[-1].headers.get("Authorization") == f"Bearer {SECRET}"
    assert_nowhere(SECRET, reply)


def test_cant_steer_the_host_of_a_fixed_url(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)  # 127.0.0.1 would answer if a value got into the host
    add_tool(db, bot, "subdomain", "http_request", {"url": "http://{{host}}.example.com/", "timeout": 2})
    add_tool(db, bot, "suffixed", "http_request", {"url": "http://api.example.com{{tail}}", "timeout": 2})
    add_tool(db, bot, "prefixed", "http_request", {"url": "{{url}}/json", "timeout": 2})
    port = web.server.server_address[1]
    for host in ("127.0.0.1/x#", f"127.0.0.1:{port}/json?", f"x@127.0.0.1:{port}/json#", f"127.0.0.1:{port}\\"):
        reply, errs = ask(r, worker, bot, f'use subdomain host="{host}"')
        call = refused(reply, errs, "subdomain", FAILED, DENIED, INVALID)
        assert quote(host, safe="") + ".example.com" in call["error"], call  # the value stayed inside the name
    for tail in (f"@127.0.0.1:{port}/json", f":{port}@127.0.0.1/json", f"\\@127.0.0.1:{port}/json"):
        reply, errs = ask(r, worker, bot, f'use suffixed tail="{tail}"')
        refused(reply, errs, "suffixed", FAILED, DENIED, INVALID)
    reply, errs = ask(r, worker, bot, f"use prefixed {web.url}")
    call = refused(reply, errs, "prefixed", INVALID)
    assert call["params"]["url"] == web.url
    assert web.seen == []


# ---- header and body injection -----------------------------------------------------------------------------


def test_cant_inject_headers_through_a_parameter(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "tracer", "http_request", {"url": web.url + "/echo", "headers": {"X-Trace": "{{t}}"}})
    for value in ("abc\r\nX-Evil: 1", "abc\nX-Evil: 1", "abc\rX-Evil: 1", "abc\r\n\r\nGET /json HTTP/1.1"):
        reply, errs = ask(r, worker, bot, f'use tracer t="{value}"')
        call = refused(reply, errs, "tracer", INVALID)
        assert "header" in call["error"] and call["params"]["t"] == value
    assert web.seen == []
    # NUL never gets that far: the message itself is refused.
    responses, errs = send(r, worker, bot.message('use tracer t="abc\x00X-Evil: 1"'))
    assert responses == [] and [e["code"] for e in errs] == [errors.INVALID_MESSAGE]
    # Other control characters are not line breaks to HTTP: whatever happens, no second header appears.
    for value in ("abc\x85X-Evil: 1", "abc\x0bX-Evil: 1", "abc\x0cX-Evil: 1", "abc\u2028X-Evil: 1"):
        reply, errs = ask(r, worker, bot, f'use tracer t="{value}"')
        call = call_of(reply, "tracer")
        if call["ok"]:
            assert call["result"]["json"]["headers"]["X-Trace"] == value
    assert all("X-Evil" not in seen.headers for seen in web.seen), [s.headers for s in web.seen]


def test_cant_inject_json_into_a_request_body(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "poster", "http_request", {"url": web.url + "/echo", "method": "POST", "body": {"q": "{{q}}"}})
    add_tool(db, bot, "texter", "http_request", {"url": web.url + "/echo", "method": "POST", "body": '{"q": "{{q}}"}'})
    add_tool(
        db, bot, "mixer", "http_request", {"url": web.url + "/echo", "method": "POST", "body": {"q": "say: {{q}}"}}
    )
    value = '", "admin": true, "x": "'
    reply, errs = ask(r, worker, bot, f"use poster, texter and mixer q='{value}'")
    assert errs == [] and all(c["ok"] for c in calls_of(reply))
    bodies = [json.loads(seen.body) for seen in web.seen]
    assert bodies == [{"q": value}, {"q": value}, {"q": "say: " + value}]
    assert all(seen.headers["Content-Type"] == "application/json" for seen in web.seen)


def test_cant_inject_fields_into_a_form_body(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    config = {
        "url": web.url + "/echo",
        "method": "POST",
        "headers": {"Content-Type": "application/x-www-form-urlencoded"},
        "body": "q={{q}}&role=viewer",
    }
    add_tool(db, bot, "former", "http_request", config)
    reply, errs = ask(r, worker, bot, "use former q='x&role=admin'")
    assert errs == [] and call_of(reply, "former")["ok"]
    [seen] = web.seen
    assert parse_qs(seen.body.decode()) == {"q": ["x&role=admin"], "role": ["viewer"]}


# ---- SQL ---------------------------------------------------------------------------------------------------


def test_cant_inject_sql_through_parameters(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    add_tool(
        db, bot, "name_probe", "database_query", {"query": f"SELECT id, name FROM {table} WHERE name = {{{{who}}}}"}
    )
    add_tool(
        db, bot, "quoted_probe", "database_query", {"query": f"SELECT id, name FROM {table} WHERE name = '{{{{who}}}}'"}
    )
    add_tool(
        db,
        bot,
        "glued_probe",
        "database_query",
        {"query": f"SELECT id, name FROM {table} WHERE note = 'x{{{{who}}}}y'"},
    )
    values = (
        "' OR 1=1 --",
        f"'; DROP TABLE {table}; --",
        f"1; delete from {table}",
        f"x' ; delete from {table} ; select '",
        f"$$; delete from {table}; $$",
        f"\\'; delete from {table}; --",
        "\\",
        "\\\\' OR 1=1 --",
        "\u2019 OR \u20191\u2019=\u20191",
        "\u02bc OR 1=1 --",
        "') OR ('1'='1",
        "%(p1)s",
        "%s %% %(who)s",
        "{{other}}",
        f"\u00a0$x$; delete from {table}; --$x$",
        f"*/ delete from {table} /*",
    )
    for value in values:
        reply, errs = ask(r, worker, bot, f'run name probe, quoted probe and glued probe who="{value}"')
        assert errs == [], (value, errs)
        for name in ("name_probe", "quoted_probe", "glued_probe"):
            call = call_of(reply, name)
            assert call["params"]["who"] == value and call["ok"], (value, call)
            assert call["result"]["rows"] == [], (value, name, call["result"])
    # The stored injection string is found as itself: exactly one row, not all of them.
    reply, errs = ask(r, worker, bot, f'run name probe and quoted probe who="{WEIRD}"')
    assert errs == []
    for name in ("name_probe", "quoted_probe"):
        assert [row["name"] for row in call_of(reply, name)["result"]["rows"]] == [WEIRD]
    assert rows_of(db, table) == before


def test_cant_pass_sql_as_a_typed_parameter(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    config = {
        "query": f"SELECT id, name FROM {table} WHERE id = {{{{id}}}}",
        "parameters": {"id": {"type": "integer", "required": True}},
    }
    add_tool(db, bot, "by_id", "database_query", config)
    for value in ("1 OR 1=1", "1; delete from " + table, "1e400", "0x1", "1)--"):
        reply, errs = ask(r, worker, bot, f'run by id id="{value}"')
        call = refused(reply, errs, "by_id", INVALID)
        assert "'id'" in call["error"]
    reply, errs = ask(r, worker, bot, "run by id id=2")
    assert errs == [] and call_of(reply, "by_id")["result"]["rows"] == [{"id": 2, "name": "bob"}]


def test_cant_smuggle_statements_into_a_tool_query(make_worker, r, db, bot, table, tmp_path: Path) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    marker = tmp_path / "copied"
    bad = {
        "stacked": f"select 1; delete from {table}",
        "stacked_no_space": f"select 1;delete from {table};",
        "commit_trick": f"select 1; commit; delete from {table}",
        "rollback_trick": f"select 1; rollback; delete from {table}",
        "line_comment": f"select 1 -- harmless\n; delete from {table}",
        "block_comment": f"select 1 /* harmless */; delete from {table}",
        "after_dollar": f"select $$a;b$$; delete from {table}",
        "after_string": f"select 'a;b'; delete from {table}",
        "backslash": f"select 'a\\'; delete from {table}; --'",
        "insert_in_select": f"insert into {table} (name) values ('mallory')",
        "delete_in_select": f"delete from {table}",
        "copy_program": f"copy (select 1) to program 'touch {marker}'",
        "do_block": f"do $$ begin delete from {table}; end $$",
        "explain_analyze": f"explain analyze delete from {table}",
        "placeholder_in_comment": f"select 1 /* {{{{x}}}} */ from {table}",
        "unterminated": f"select 'a from {table}",
    }
    for name, sql in bad.items():
        add_tool(db, bot, f"bad_{name}", "database_query", {"query": sql, "type": "select"})
    add_tool(
        db, bot, "copy_kind", "database_query", {"query": f"copy {table} to program 'touch {marker}'", "type": "copy"}
    )
    for name in [*bad, "copy_kind"]:
        tool = name if name == "copy_kind" else f"bad_{name}"
        reply, errs = ask(r, worker, bot, f"run {tool.replace('_', ' ')} x=1")
        refused(reply, errs, tool, INVALID)
    assert rows_of(db, table) == before and not marker.exists()


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


def test_cant_read_platform_tables_past_db_tool_url(make_worker, r, db, bot, tool_url) -> None:
    worker = make_worker(DB_TOOL_URL=tool_url)
    add_tool(db, bot, "peek_secrets", "database_query", {"query": 'select "encryptedValue" from secrets'})
    add_tool(db, bot, "peek_users", "database_query", {"query": "select email, password from users"})
    add_tool(db, bot, "peek_file", "database_query", {"query": "select pg_read_file('/etc/hostname') as f"})
    for tool in ("peek_secrets", "peek_users", "peek_file"):
        reply, errs = ask(r, worker, bot, f"run {tool.replace('_', ' ')}")
        call = refused(reply, errs, tool, DENIED)
        assert "permission denied" in call["error"]


LEXER_GAP = "\u00a0"  # Python's \s (sql.py _SPACE) calls NO-BREAK SPACE blank; PostgreSQL reads it as a letter


def test_cant_hide_statements_behind_unicode_blanks(make_worker, r, db, bot, table) -> None:
    worker = make_worker()
    before = rows_of(db, table)
    sql = f"select 1 as {LEXER_GAP}$x$; commit; delete from {table}; --$x$"
    add_tool(db, bot, "blank_trick", "database_query", {"query": sql, "type": "select"})
    reply, errs = ask(r, worker, bot, "run blank trick")
    assert rows_of(db, table) == before, "the select tool deleted every row"
    refused(reply, errs, "blank_trick", INVALID)


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


# ---- secrets -----------------------------------------------------------------------------------------------


def test_cant_use_a_secret_that_is_not_yours_or_not_active(make_worker, r, db, bot, other, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    theirs = add_secret(db, other.user_id, "their-" + SECRET)
    inactive = add_secret(db, bot.user_id, "old-" + SECRET, active=False)
    cases = {
        "theirs": theirs,
        "inactive": inactive,
        "missing": str(uuid.uuid4()),
        "garbage": "1' OR '1'='1",
        "traversal": "../../secrets/" + theirs,
        "uppercase": theirs.upper(),  # the same uuid spelled differently is still not yours
    }
    for name, secret_id in cases.items():
        add_tool(db, bot, f"s_{name}", "http_request", {"url": web.url + "/echo", "secretId": secret_id})
    for name in cases:
        reply, errs = ask(r, worker, bot, f"run s {name}")
        call = refused(reply, errs, f"s_{name}", FAILED)
        assert "not found" in call["error"], call
        assert_nowhere("their-" + SECRET, reply, errs)
        assert_nowhere("old-" + SECRET, reply, errs)
    assert web.seen == []


def test_cant_see_a_secret_the_server_echoes(make_worker, r, db, bot, web, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    secret_id = add_secret(db, bot.user_id, SECRET)
    add_tool(db, bot, "echoer", "http_request", {"url": web.url + "/echo", "secretId": secret_id})
    add_tool(
        db,
        bot,
        "keyed",
        "http_request",
        {"url": web.url + "/echo?k={{k}}", "secretId": secret_id, "secretHeader": "X-Api-Key"},
    )
    r.delete(RESPONSES, ERRORS)
    payload = bot.message("use echoer and keyed k=1")
    push(r, payload)
    assert worker.run_once()
    raw_events = r.lrange(RESPONSES, 0, -1) + r.lrange(ERRORS, 0, -1)
    [event] = events(r, RESPONSES)
    reply = event["botResponse"]
    assert call_of(reply, "echoer")["ok"] and call_of(reply, "keyed")["ok"]
    # The server really got it (so there was something to leak)...
    assert [s.headers.get("Authorization") for s in web.seen] == [f"Bearer {SECRET}", None]
    assert web.seen[1].headers.get("X-Api-Key") == SECRET
    # ...and it is nowhere the worker wrote.
    rows = query(
        db,
        """SELECT content, metadata, metadata::text AS text FROM chat_messages WHERE "botInstanceId" = %s""",
        event["instanceId"],
    )
    assert len(rows) == 2
    assert_nowhere(SECRET, *raw_events, event, events(r, ERRORS), rows, caplog.text)
    assert "[redacted]" in json.dumps(call_of(reply, "echoer")["result"])


def test_cant_see_part_of_a_secret_cut_by_truncation(make_worker, r, db, bot, evil) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL, HTTP_MAX_RESPONSE_BYTES="1024")
    token = "tok_" + uuid.uuid4().hex  # an ordinary ASCII API token
    secret_id = add_secret(db, bot.user_id, token)
    pad = 1024 - len(f"Bearer {token}") + 4  # the cut falls 4 characters before the token's end
    add_tool(db, bot, "cutter", "http_request", {"url": evil.url + "/reflect?pad={{pad}}", "secretId": secret_id})
    reply, errs = ask(r, worker, bot, f"use cutter pad={pad}")
    call = call_of(reply, "cutter")
    assert errs == [] and call["ok"] and call["result"].get("truncated"), call
    assert token[:-4] not in call["result"]["text"], "all but 4 characters of the token are in the result"
    assert_nowhere(token[:-4], reply)


def test_cant_see_a_secret_echoed_in_another_encoding(make_worker, r, db, bot, evil) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    secret_id = add_secret(db, bot.user_id, SECRET)
    add_tool(
        db, bot, "refl", "http_request", {"url": evil.url + "/reflect?status=401&style=json", "secretId": secret_id}
    )
    add_tool(db, bot, "plain", "http_request", {"url": evil.url + "/reflect", "secretId": secret_id})
    reply, errs = ask(r, worker, bot, "use refl and plain")
    call = call_of(reply, "refl")
    assert call["code"] == FAILED and "401" in call["error"]
    assert call_of(reply, "plain")["ok"]
    escaped = json.dumps(SECRET, ensure_ascii=False)[1:-1]  # p@ss/wörd\"+ =...
    mojibake = SECRET.encode().decode("latin-1")  # p@ss/wÃ¶rd"+ =...
    assert escaped not in call["error"], call["error"]
    assert mojibake not in call_of(reply, "plain")["result"]["text"]
    assert_nowhere(SECRET, reply, errs)


@pytest.fixture
def other_pg_port(servers: Servers) -> Iterator[int]:
    """A port standing in for another PostgreSQL server (forwarded to the test one): the platform's own server
    is refused to DSN tools as such."""
    parts = urlsplit(servers.database_url)
    yield from tcp_forwarder(parts.hostname or "127.0.0.1", parts.port or 5432)


def test_cant_leak_a_dsn_password_or_reach_a_private_database(make_worker, r, db, bot, servers, other_pg_port) -> None:
    parts = urlsplit(servers.database_url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        pytest.skip("the test database is not on this host")
    password = unquote(parts.password) if parts.password else SECRET  # trust auth (devstack) ignores it
    quoted = password.replace("\\", "\\\\").replace("'", "\\'")
    dbname = parts.path.lstrip("/")
    dsn = f"host=127.0.0.1 port={other_pg_port} dbname={dbname} user={parts.username} password='{quoted}'"
    good = add_secret(db, bot.user_id, dsn, key="DSN")
    wrong_db = add_secret(db, bot.user_id, dsn.replace(f"dbname={dbname}", "dbname=no_such_db"), key="D2")
    add_tool(db, bot, "remote_db", "database_query", {"query": "select current_database() as db", "secretId": good})
    add_tool(db, bot, "wrong_db", "database_query", {"query": "select 1 as one", "secretId": wrong_db})
    for host in ("localhost", "/tmp", "[::1]", "0x7f000001", "127.0.0.1,10.0.0.1"):
        sid = add_secret(db, bot.user_id, dsn.replace("host=127.0.0.1", f"host={host}"), key="D-" + host)
        add_tool(db, bot, f"host_{uuid.uuid4().hex[:6]}", "database_query", {"query": "select 1", "secretId": sid})
    no_host = add_secret(db, bot.user_id, dsn.replace("host=127.0.0.1 ", ""), key="D-none")
    add_tool(db, bot, "no_host", "database_query", {"query": "select 1", "secretId": no_host})

    worker = make_worker()  # HTTP_ALLOWED_HOSTS unset: the private database host is refused before connecting
    reply, errs = ask(r, worker, bot, "run remote db")
    call = refused(reply, errs, "remote_db", DENIED)
    assert "127.0.0.1" in call["error"] and "not allowed" in call["error"]
    reply, errs = ask(r, worker, bot, "run no host")
    refused(reply, errs, "no_host", INVALID)
    tools = query(db, """SELECT name FROM bot_tools WHERE "botId" = %s AND name LIKE 'host_%%'""", bot.bot_id)
    for row in tools:
        reply, errs = ask(r, worker, bot, f"run {row['name'].replace('_', ' ')}")
        refused(reply, errs, row["name"], DENIED, INVALID, FAILED)
        assert_nowhere(password, reply, errs)

    opened = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)  # now it may connect: the error names no password
    reply, errs = ask(r, opened, bot, "run wrong db")
    call = refused(reply, errs, "wrong_db", FAILED)
    assert "no_such_db" in call["error"]
    assert_nowhere(password, reply, errs)
    reply, errs = ask(r, opened, bot, "run remote db")  # control: the same DSN works where it is allowed
    assert errs == [] and call_of(reply, "remote_db")["result"]["rows"] == [{"db": dbname}]


class FakePostgres:
    """A 'PostgreSQL server' on 127.0.0.1 that asks for a cleartext password and writes down what it gets."""

    def __init__(self) -> None:
        self.passwords: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ValueError):
                self._session(conn)

    def _session(self, conn: Any) -> None:
        conn.settimeout(5)
        while True:
            length, code = struct.unpack("!ii", _recv(conn, 8))
            if code in (80877103, 80877104):  # SSLRequest / GSSENCRequest: "no"
                conn.sendall(b"N")
                continue
            _recv(conn, length - 8)  # the startup packet
            break
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind, length = _recv(conn, 1), struct.unpack("!i", _recv(conn, 4))[0]
        if kind == b"p":
            self.passwords.append(_recv(conn, length - 4).rstrip(b"\0").decode())
        error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        conn.sendall(b"E" + struct.pack("!i", len(error) + 4) + error)

    def close(self) -> None:
        self.sock.close()


def _recv(conn: Any, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ValueError("closed")
        data += chunk
    return data


def test_cant_get_the_workers_own_db_password_through_a_tool_dsn(make_worker, r, db, bot, monkeypatch) -> None:
    ambient = "worker-ambient-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("PGPASSWORD", ambient)  # how many deployments hand libpq the platform database's password
    fake = FakePostgres()
    try:
        dsn = add_secret(db, bot.user_id, f"host=127.0.0.1 port={fake.port} dbname=x user=postgres", key="DSN")
        add_tool(db, bot, "phisher", "database_query", {"query": "select 1", "secretId": dsn, "retry": False})
        worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
        reply, errs = ask(r, worker, bot, "run phisher")
        refused(reply, errs, "phisher", FAILED)
        assert ambient not in fake.passwords, "the worker's own password was sent to the tool's server"
    finally:
        fake.close()


def test_cant_see_url_credentials_in_errors(make_worker, r, db, bot, caplog) -> None:
    worker = make_worker()
    add_tool(db, bot, "legacy", "http_request", {"url": "http://svc:hunter2-pw@api.example.com/v1"})
    reply, errs = ask(r, worker, bot, "run legacy")
    refused(reply, errs, "legacy", DENIED)
    assert_nowhere("hunter2-pw", reply, errs, caplog.text)


# ---- access ------------------------------------------------------------------------------------------------


def test_cant_run_a_tool_without_being_allowed(make_worker, r, db, bot, other, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "authed", "http_request", {"url": web.url + "/json"}, requires_auth=True)
    add_tool(db, bot, "cfg_authed", "http_request", {"url": web.url + "/json", "requiresAuth": True})
    add_tool(db, bot, "admins", "http_request", {"url": web.url + "/json", "roles": ["admin"]})
    add_tool(db, bot, "admin_str", "http_request", {"url": web.url + "/json", "roles": "admin"})
    add_tool(db, bot, "sleeping", "http_request", {"url": web.url + "/json"}, active=False)
    reply, errs = ask(r, worker, bot, "run admins and admin str")
    for name in ("admins", "admin_str"):
        call = call_of(reply, name)
        assert not call["ok"] and call["code"] == DENIED and "admin" in call["error"]
    assert [e["code"] for e in errs] == [DENIED]
    reply, errs = ask(r, worker, bot, "run sleeping")
    assert [c["tool"] for c in calls_of(reply)] == [] and errs == []  # an inactive tool is not even detected

    query(db, """UPDATE users SET "isActive" = false WHERE id = %s""", bot.user_id)
    reply, errs = ask(r, worker, bot, "run authed and cfg authed")
    for name in ("authed", "cfg_authed"):
        call = call_of(reply, name)
        assert not call["ok"] and call["code"] == DENIED and "active user" in call["error"]
    assert [e["code"] for e in errs] == [DENIED]

    # Someone else naming this bot: the bot is "not found" for them and no tool runs.
    responses, errs = send(r, worker, other.message("run admins, authed and sleeping", botId=bot.bot_id))
    assert responses == [] and [e["code"] for e in errs] == [errors.BOT_NOT_FOUND]
    assert web.seen == []


# ---- resources ---------------------------------------------------------------------------------------------


def test_cant_flood_the_worker_with_a_huge_response(make_worker, r, db, bot, web, evil) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL, HTTP_MAX_RESPONSE_BYTES="4096", TOOL_RESULT_BUDGET="1024")
    add_tool(db, bot, "big", "http_request", {"url": web.url + "/big?bytes=20000000"})
    add_tool(db, bot, "bomb", "http_request", {"url": evil.url + "/bomb"})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run big and bomb")
    assert time.monotonic() - started < 5 and errs == []
    for name in ("big", "bomb"):
        call = call_of(reply, name)
        assert call["ok"] and call.get("resultTruncated") is True, call
        assert isinstance(call["result"], str) and len(call["result"].encode()) <= 1024
    assert len(json.dumps(reply["metadata"]).encode()) < 10_000


def test_cant_hold_the_worker_with_a_slow_server(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "slowpoke", "http_request", {"url": web.url + "/slow?s=5", "timeout": 0.5})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run slowpoke")
    elapsed = time.monotonic() - started
    call = refused(reply, errs, "slowpoke", FAILED)
    assert "timed out" in call["error"] and elapsed < 3.5, (elapsed, call)


def test_cant_hold_the_worker_with_a_dripping_server(make_worker, r, db, bot, evil) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(
        db, bot, "dripper", "http_request", {"url": evil.url + "/drip?n=30&every=0.1", "timeout": 0.5, "retry": False}
    )
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run dripper")
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"a 0.5 s tool held the worker {elapsed:.1f}s"
    refused(reply, errs, "dripper", FAILED)


def test_cant_pull_unbounded_rows_or_time_from_the_database(make_worker, r, db, bot) -> None:
    worker = make_worker(DB_TOOL_MAX_ROWS="7", DB_TOOL_TIMEOUT="0.5")
    add_tool(db, bot, "series", "database_query", {"query": "select generate_series(1, 1000000) as n"})
    add_tool(db, bot, "sleeper", "database_query", {"query": "select pg_sleep(10)"})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run series")
    call = call_of(reply, "series")
    assert errs == [] and call["result"]["truncated"] is True and time.monotonic() - started < 5
    assert [row["n"] for row in call["result"]["rows"]] == [1, 2, 3, 4, 5, 6, 7]
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "run sleeper")
    elapsed = time.monotonic() - started
    call = refused(reply, errs, "sleeper", FAILED)
    assert "cancelled" in call["error"] and elapsed < 3, (elapsed, call)
    active = query(db, "SELECT count(*) AS n FROM pg_stat_activity WHERE query LIKE 'select pg_sleep(10)%%'")
    assert active == [{"n": 0}]


def _peak_rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def test_cant_exhaust_worker_memory_through_a_row_count_parameter(make_worker, r, db, bot) -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    worker = make_worker(DB_TOOL_MAX_ROWS="7", TOOL_RESULT_BUDGET="65536")
    config = {
        "query": "select repeat('x', 1000) as pad from generate_series(1, {{n}})",
        "parameters": {"n": {"type": "integer", "minimum": 1}},
    }
    add_tool(db, bot, "padder", "database_query", config)
    Path("/proc/self/clear_refs").write_text("5")
    base = _peak_rss_mb()
    reply, errs = ask(r, worker, bot, "run padder n=200000")
    grown = _peak_rss_mb() - base
    assert errs == [] and len(call_of(reply, "padder")["result"]["rows"]) == 7
    assert grown < 60, f"the worker's peak memory grew by {grown} MB for 7 rows"
