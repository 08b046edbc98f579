"""Attacks, second round: through real messages and through the model's own function calls.

A compromised or prompt-injected model is an attacker too: here the local Gemini stub (``gemini_server``) answers
with whatever functionCall names and arguments a test likes, and the worker must treat them exactly like text from
an untrusted user. Each test sends ordinary bot messages to a real in-process worker (test Redis and PostgreSQL,
local HTTP servers, the real sandbox) and checks that the attack failed in a readable way (a failed tool call with
a code, or an llm_*/tool_* ``bot_errors`` event) and that nothing happened: no row changed, no request reached the
target, no secret anywhere (events, rows, logs and the request bodies sent to Gemini).

This sweep found thirteen holes; eleven are closed (each test here was a strict xfail until then). The two still
marked ``xfail(strict=True)`` are a documented limitation and a deployment requirement, said in their reasons.
``tests/test_tool_attacks.py`` holds the first sweep (not repeated here).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis

from botworker import errors
from botworker.queue import ERRORS, RESPONSES
from botworker.tools.outbound import OutboundPolicy
from botworker.worker import Worker

from attack_kit import (
    DENIED,
    FAILED,
    INVALID,
    LOCAL,
    assert_nowhere,
    call_of,
    failed,
    refused,
    rows_of,
    send,
)
from conftest import Bot, events, push, query
from gemini_server import GeminiServer, call, text
from toolkit import QuietHandler, add_secret, add_tool, ask, calls_of

pytest_plugins = ["attack_kit", "gemini_server"]

UNSUPPORTED = errors.TOOL_UNSUPPORTED
SECRET = 'r2/s3cr\u00e9t"+ =-0f4a2b9c7d1e'  # needs escaping in JSON, URLs, HTML; has a '/' and a '"'
NEUTRAL = "hello there"  # a message that makes detection run no tool: the model's calls are the only ones


# ---- fixtures and helpers -----------------------------------------------------------------------------------


@pytest.fixture
def table(db: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table with three rows; dropped afterwards."""
    name = "attack2_" + uuid.uuid4().hex[:10]
    query(db, f"CREATE TABLE {name} (id serial PRIMARY KEY, name text NOT NULL, note text)")
    query(db, f"INSERT INTO {name} (name, note) VALUES ('alice', 'a'), ('bob', 'b'), ('carol', 'c')")
    yield name
    query(db, f"DROP TABLE IF EXISTS {name}")


def gemini_saw(gemini: GeminiServer) -> str:
    """Everything the worker sent to Gemini, as one text (the recorded request bodies, re-serialised both ways)."""
    bodies = gemini.bodies()
    return json.dumps(bodies) + json.dumps(bodies, ensure_ascii=False)


def function_responses(gemini: GeminiServer, request: int) -> list[dict[str, Any]]:
    """The functionResponse parts of one recorded request (its last turn)."""
    parts = gemini.requests[request].body["contents"][-1]["parts"]
    return [p["functionResponse"] for p in parts if "functionResponse" in p]


def _peak_rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size
    except OSError:
        pytest.skip("cannot reset the peak RSS here")


class Hostile:
    """A hostile HTTP server on 127.0.0.1, answering from raw bytes where a well-behaved one would not.

    /hdrdrip?n=&every=   the status line at once, then a header value one byte at a time (headers never end soon)
    /chunkdrip?n=&every= headers at once, then a chunked body whose chunk-size line arrives one byte at a time
    /reflect?style=&status=   the Authorization header back, escaped the way common server stacks escape
    /last                the Authorization header the server saw on an earlier request (a request inspector)
    /list?n=             a JSON list of n small objects (an ordinary paged API answer)
    /bigheader?kb=       a response header of that many KB
    /bomb2               a doubly gzip-compressed body ("Content-Encoding: gzip, gzip") of 256 MB of zeros
    /to?code=&loc=       a redirect with that status and Location
    /loop                a redirect to itself
    /login?who=          sets a session cookie;   /whoami   answers with the Cookie header it got
    """

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.last_auth = ""
        self._bomb: bytes | None = None
        state = self

        class Handler(QuietHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                q = {k: v[0] for k, v in parse_qs(parts.query).items()}
                state.seen.append((self.command, parts.path, dict(self.headers.items()), body))
                auth = self.headers.get("Authorization", "")
                route = parts.path
                if route == "/hdrdrip":
                    self._drip(int(q.get("n", "40")), float(q.get("every", "0.1")))
                elif route == "/chunkdrip":
                    self._chunk_drip(int(q.get("n", "40")), float(q.get("every", "0.1")))
                elif route == "/reflect":
                    self._reflect(auth, q.get("style", "plain"), int(q.get("status", "200")))
                elif route == "/last":
                    self._raw(200, json.dumps({"lastAuthorization": state.last_auth}).encode(), "application/json")
                elif route == "/list":
                    items = [
                        {"id": i, "name": f"item {i}", "owner": f"u{i}@example.com", "status": "active"}
                        for i in range(int(q.get("n", "10")))
                    ]
                    self._raw(200, json.dumps({"items": items}).encode(), "application/json")
                elif route == "/bigheader":
                    self._raw(200, b"{}", "application/json", {"X-Big": "h" * (int(q["kb"]) * 1024)})
                elif route == "/bomb2":
                    self._raw(200, state.bomb(), "text/plain", {"Content-Encoding": "gzip, gzip"})
                elif route == "/login":  # a session cookie for whoever logs in (e.g. with a bearer token)
                    cookie = f"session={q.get('who', 'anyone')}-{uuid.uuid4().hex[:8]}; Path=/"
                    self._raw(200, b'{"ok": true}', "application/json", {"Set-Cookie": cookie})
                elif route == "/whoami":  # who the session cookie says you are
                    body = json.dumps({"cookie": self.headers.get("Cookie", "")}).encode()
                    self._raw(200, body, "application/json")
                elif route == "/loop":
                    self._raw(302, b"", "text/plain", {"Location": "/loop"})
                elif route == "/to":
                    self._raw(int(q["code"]), b"", "text/plain", {"Location": q["loc"]})
                else:
                    self._raw(404, b"no", "text/plain")
                if auth:
                    state.last_auth = auth

            def _drip(self, n: int, every: float) -> None:
                try:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Slow: ")
                    self.wfile.flush()
                    for _ in range(n):
                        time.sleep(every)
                        self.wfile.write(b"z")
                        self.wfile.flush()
                    self.wfile.write(b"\r\nContent-Length: 2\r\n\r\nok")
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

            def _chunk_drip(self, n: int, every: float) -> None:
                try:  # a chunked body whose first chunk-size line ("000...01") arrives one digit at a time
                    self.wfile.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                    )
                    self.wfile.flush()
                    for _ in range(n):
                        time.sleep(every)
                        self.wfile.write(b"0")
                        self.wfile.flush()
                    self.wfile.write(b"1\r\nx\r\n0\r\n\r\n")
                    self.wfile.flush()
                except OSError:
                    pass
                self.close_connection = True

            def _reflect(self, auth: str, style: str, status: int) -> None:
                token = auth.removeprefix("Bearer ")
                if style == "php":  # PHP's json_encode(): "\/" for every slash, \uXXXX for non-ASCII
                    body = json.dumps({"error": "invalid token", "token": token}).replace("/", "\\/").encode()
                    self._raw(status, body, "application/json")
                elif style == "jinja":  # markupsafe (Flask/Jinja2): &#34; and &#39; for quotes
                    escaped = html.escape(token, quote=False).replace('"', "&#34;").replace("'", "&#39;")
                    self._raw(status, f"<p>Invalid token: {escaped}</p>".encode(), "text/html; charset=utf-8")
                elif style == "number":  # a numeric credential (a PIN, an account key) echoed as a JSON number
                    self._raw(status, json.dumps({"accepted": int(token)}).encode(), "application/json")
                else:
                    self._raw(status, token.encode(), "text/plain; charset=utf-8")

            do_GET = do_POST = do_PUT = do_HEAD = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bomb(self) -> bytes:
        if self._bomb is None:
            inner = gzip.compress(b"\0" * (256 << 20), compresslevel=6)
            self._bomb = gzip.compress(inner, compresslevel=9)
        return self._bomb

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def paths(self) -> list[str]:
        return [path for _, path, _, _ in self.seen]


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.server.shutdown()
    server.server.server_close()


# ---- holes: the model's function calls ---------------------------------------------------------------------


def test_cant_outlast_llm_deadline_with_many_function_calls(make_worker, r, db, bot, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL, LLM_DEADLINE="1.5")
    add_tool(db, bot, "slowpoke", "http_request", {"url": web.url + "/slow?s=0.5", "timeout": 2})
    gemini.script(call("slowpoke", {}, *[("slowpoke", {})] * 7), text("done"))  # 8 calls in one response
    started = time.monotonic()
    _, errs = ask(r, worker, bot, NEUTRAL)
    elapsed = time.monotonic() - started
    assert [e["code"] for e in errs] == [errors.LLM_TIMEOUT]
    assert elapsed < 3, f"LLM_DEADLINE=1.5s, but the reply took {elapsed:.1f}s ({len(web.seen)} tool requests)"
    assert len(web.seen) <= 4


def test_cant_store_megabytes_of_function_arguments(make_worker, r, db, bot, gemini) -> None:
    worker = make_worker(gemini, TOOL_RESULT_BUDGET="4000")
    config = {"query": "select {{q}}::text as q", "parameters": {"q": {"type": "string", "maxLength": 100}}}
    add_tool(db, bot, "echo_db", "database_query", config)
    huge = "A" * (2 << 20)  # 2 MB: a declared parameter refuses it, an undeclared one takes it
    gemini.script(
        call("echo_db", {"q": huge}, ("platform", {"operation": "list_models", "junk": huge})),
        text("done"),
    )
    reply, errs = ask(r, worker, bot, NEUTRAL)
    failed(call_of(reply, "echo_db"), INVALID)
    assert [e["code"] for e in errs] == [INVALID]
    stored = query(db, "SELECT octet_length(metadata::text) AS n FROM chat_messages WHERE id = %s", reply["id"])
    assert stored[0]["n"] < 64 << 10, f"the reply row's metadata is {stored[0]['n']} bytes"


# ---- holes: HTTP ---------------------------------------------------------------------------------------------


def test_cant_ride_another_users_cookies(make_worker, r, db, bot, other, hostile) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, other, "login", "http_request", {"url": hostile.url + "/login?who=victim"})
    add_tool(db, bot, "whoami", "http_request", {"url": hostile.url + "/whoami"})
    reply, errs = ask(r, worker, other, "use login")  # user B logs in to a service through their tool
    assert errs == [] and call_of(reply, "login")["ok"]
    reply, errs = ask(r, worker, bot, "use whoami")  # later, user A's tool calls the same service
    assert errs == []
    got = call_of(reply, "whoami")["result"]["json"]["cookie"]
    assert "victim" not in got, f"user A's request carried user B's session cookie: {got!r}"


def test_cant_hold_the_worker_with_a_response_that_trickles_in(make_worker, r, db, bot, hostile) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    for route in ("hdrdrip", "chunkdrip"):
        config = {"url": f"{hostile.url}/{route}?n=40&every=0.1", "timeout": 0.5, "retry": False}
        add_tool(db, bot, route, "http_request", config)
    for route in ("chunkdrip", "hdrdrip"):
        started = time.monotonic()
        reply, errs = ask(r, worker, bot, f"use {route}")
        elapsed = time.monotonic() - started
        assert elapsed < 2, f"a 0.5 s tool held the worker {elapsed:.1f}s while {route} trickled in"
        refused(reply, errs, route, FAILED)


def test_cant_freeze_the_worker_by_redacting_a_long_token(make_worker, r, db, bot, hostile) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    token = base64.urlsafe_b64encode(os.urandom(1100)).decode()  # 1.5 KB: an ordinary JWT bearer token
    secret_id = add_secret(db, bot.user_id, token)
    add_tool(db, bot, "lister", "http_request", {"url": hostile.url + "/list?n=200", "secretId": secret_id})
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "use lister")
    elapsed = time.monotonic() - started
    assert errs == [] and call_of(reply, "lister")["ok"]
    assert elapsed < 1.5, f"a 200-item answer (30 KB) took {elapsed:.1f}s with a 1.5 KB token to redact"


def test_cant_see_a_secret_reflected_by_common_server_stacks(make_worker, r, db, bot, hostile, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    secret_id = add_secret(db, bot.user_id, SECRET)
    for style in ("php", "jinja"):
        url = f"{hostile.url}/reflect?style={style}&status=401"
        add_tool(db, bot, f"refl_{style}", "http_request", {"url": url, "secretId": secret_id})
    gemini.script(call("refl_php", {}, ("refl_jinja", {})), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert [e["code"] for e in errs] == [FAILED]
    for style in ("php", "jinja"):
        failed(call_of(reply, f"refl_{style}"), FAILED)
    pieces = [piece for piece in SECRET.replace('"', "/").split("/") if len(piece) >= 6]  # what is left readable
    for piece in pieces:
        assert piece not in json.dumps(calls_of(reply), ensure_ascii=False), piece
        assert piece not in gemini_saw(gemini), piece


def test_cant_see_a_numeric_secret_echoed_as_a_number(make_worker, r, db, bot, hostile, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    pin = "73910582647301"
    secret_id = add_secret(db, bot.user_id, pin)
    add_tool(db, bot, "pinned", "http_request", {"url": hostile.url + "/reflect?style=number", "secretId": secret_id})
    gemini.script(call("pinned", {}), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert errs == [] and call_of(reply, "pinned")["ok"]
    assert pin not in json.dumps(reply), call_of(reply, "pinned")["result"]
    assert pin not in gemini_saw(gemini)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=(
        "LIMITATION (kept on purpose): secrets are decrypted only for the call that needs them (issue 4), so a "
        "result of an earlier call, from a server that already saw the token, is not redacted"
    ),
)
def test_cant_see_a_secret_echoed_before_its_tool_ran(make_worker, r, db, bot, hostile, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    secret_id = add_secret(db, bot.user_id, SECRET)
    add_tool(db, bot, "authed_api", "http_request", {"url": hostile.url + "/list?n=1", "secretId": secret_id})
    add_tool(db, bot, "inspector", "http_request", {"url": hostile.url + "/last"})
    gemini.script(call("authed_api", {}), text("first"))
    ask(r, worker, bot, NEUTRAL)  # the server now knows the token, as any server it is sent to does
    # Next message: the model reads the inspector first, then calls the authenticated API.
    gemini.script(call("inspector", {}), call("authed_api", {}), text("second"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert errs == [] and call_of(reply, "inspector")["ok"]
    assert_nowhere(SECRET, reply, gemini.bodies())


# ---- holes: SQL ----------------------------------------------------------------------------------------------


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


def test_cant_exhaust_memory_through_a_write_tools_returning(make_worker, r, db, bot, table) -> None:
    _reset_peak_rss()
    worker = make_worker(DB_TOOL_MAX_ROWS="7", TOOL_RESULT_BUDGET="65536")
    config = {
        "query": f"insert into {table} (name) select 'n' || g from generate_series(1, {{{{n}}}}) g "
        "returning repeat('x', 1500) as pad",
        "type": "insert",
        "parameters": {"n": {"type": "integer", "minimum": 1}},
    }
    add_tool(db, bot, "bulk_add", "database_query", config)
    Path("/proc/self/clear_refs").write_text("5")
    base = _peak_rss_mb()
    reply, errs = ask(r, worker, bot, "run bulk add n=100000")
    grown = _peak_rss_mb() - base
    assert errs == [] and len(call_of(reply, "bulk_add")["result"]["rows"]) == 7
    assert grown < 60, f"the worker's peak memory grew by {grown} MB for 7 rows"


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


# ---- holes: access -------------------------------------------------------------------------------------------


def test_cant_widen_a_tool_through_a_restriction_written_another_way(make_worker, r, db, bot, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    query(db, """UPDATE users SET "isActive" = false WHERE id = %s""", bot.user_id)  # a deactivated account
    add_tool(db, bot, "auth_text", "http_request", {"url": web.url + "/json", "requiresAuth": "true"})
    add_tool(db, bot, "auth_one", "http_request", {"url": web.url + "/json", "requiresAuth": 1})
    add_tool(db, bot, "models_only", "mcp_tool", {"operations": "list_models"})
    add_tool(db, bot, "no_ops", "mcp_tool", {"operations": []})
    gemini.script(
        call(
            "auth_text",
            {},
            ("auth_one", {}),
            ("models_only", {"operation": "get_user_info"}),
            ("no_ops", {"operation": "get_user_info"}),
        ),
        text("done"),
    )
    reply, _ = ask(r, worker, bot, NEUTRAL)
    outcomes = {name: call_of(reply, name)["ok"] for name in ("auth_text", "auth_one", "models_only", "no_ops")}
    assert outcomes == dict.fromkeys(outcomes, False), f"restrictions ignored: {outcomes}"
    assert web.seen == []


# ---- the model's function calls: what holds ------------------------------------------------------------------


def test_cant_call_another_bots_tool_or_a_mangled_name(make_worker, r, db, bot, other, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    theirs = add_tool(db, other, "their_hook", "http_request", {"url": web.url + "/json?who=theirs"})
    add_tool(db, bot, "dup tool", "http_request", {"url": web.url + "/json?which=spaced"})
    add_tool(db, bot, "dup_tool", "http_request", {"url": web.url + "/json?which=underscored"})
    add_tool(db, bot, "dup_tool_2", "http_request", {"url": web.url + "/json?which=suffixed"})
    names = [
        "their_hook",
        "../their_hook",
        "PLATFORM",
        "platform\n",
        " platform",
        "platform\u200b",
        "plat form",
        theirs,
        "x" * 5000,
    ]
    calls = [(n, {"operation": "list_models", "botId": other.bot_id, "toolId": theirs}) for n in names]
    gemini.script(call(*calls[0], *calls[1:]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert len(calls_of(reply)) == len(names)
    for made in calls_of(reply):
        failed(made, DENIED)
        assert "no tool named" in made["error"]
    assert [e["code"] for e in errs] == [DENIED]
    assert web.seen == []  # the other bot's tool never ran
    # Names that collide after sanitising get distinct function names, each running its own tool, once.
    declared = [d["name"] for d in gemini.requests[0].body["tools"][0]["functionDeclarations"]]
    assert len(declared) == len(set(declared))
    dups = [n for n in declared if n.startswith("dup_tool")]
    assert len(dups) == 3
    gemini.script(call(dups[0], {}, *[(n, {}) for n in dups[1:]]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert errs == [] and sorted(s.query["which"][0] for s in web.seen) == ["spaced", "suffixed", "underscored"]


def test_cant_widen_a_platform_tool_through_function_arguments(make_worker, r, db, bot, other, gemini) -> None:
    worker = make_worker(gemini)
    private = "other-model-" + uuid.uuid4().hex[:8]
    query(
        db,
        """INSERT INTO models (id, name, "displayName", description, schema, "userId")
           VALUES (%s, %s, %s, 'not yours', '{}', %s)""",
        str(uuid.uuid4()),
        private,
        private,
        other.user_id,
    )
    add_tool(db, bot, "models_tool", "mcp_tool", {"operations": ["list_models"]})
    steal = {"userId": other.user_id, "user_id": other.user_id, "botId": other.bot_id, "owner": other.user_id}
    gemini.script(
        call(
            "models_tool",
            {"operation": "get_user_info", **steal},
            ("models_tool", {"operation": ["list_models", "get_user_info"]}),
            ("models_tool", {"operation": {"name": "list_models"}}),
            ("models_tool", {"operation": "list_models; get_user_info"}),
            ("models_tool", {"operation": "list_models", **steal}),
            ("platform", {"operation": "search_platform", "query": private, **steal}),
            ("platform", {"operation": "search_platform", "query": "%"}),
            ("platform", {"operation": "list_models", "query": {"userId": other.user_id}}),
        ),
        text("done"),
    )
    reply, errs = ask(r, worker, bot, NEUTRAL)
    assert [e["code"] for e in errs] == [FAILED]
    made = calls_of(reply)
    for refused_call in made[:4]:
        failed(refused_call, FAILED, INVALID, DENIED)
        assert "not allowed" in refused_call["error"]
    listed, searched, wildcard, own = made[4:]
    assert {m["name"] for m in listed["result"]["items"]} == {"sentiment", "churn", "vision"}
    assert searched["result"]["count"] == 0 and wildcard["result"]["count"] == 0
    assert {m["name"] for m in own["result"]["items"]} == {"sentiment", "churn", "vision"}
    # The other user's model is in no result, nor in what Gemini was sent back (a search echoes its query only).
    responses = [f["response"].get("result") or {} for f in function_responses(gemini, 1)]
    found = [c["result"].get("items") for c in made if c["ok"]] + [x.get("items") for x in responses]
    assert private not in json.dumps(found)


def test_cant_inject_through_function_argument_types(make_worker, r, db, bot, web, table, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL, LLM_MAX_TOOL_CALLS="20")
    before = rows_of(db, table)
    add_tool(db, bot, "tracer", "http_request", {"url": web.url + "/echo", "headers": {"X-Trace": "{{t}}"}})
    add_tool(db, bot, "fetcher", "http_request", {"url": "{{url}}", "timeout": 2})
    add_tool(db, bot, "finder", "database_query", {"query": f"select id, name from {table} where name = {{{{who}}}}"})
    evil_header = "a\r\nX-Evil: 1"
    port = web.server.server_address[1]
    args: list[tuple[str, dict[str, Any]]] = [
        ("tracer", {"t": evil_header}),  # refused: a line break in a header
        ("tracer", {"t": {"x": evil_header}}),  # an object is sent as its JSON text: the \r\n stays escaped
        ("tracer", {"t": [evil_header]}),
        ("fetcher", {"url": {"href": f"{web.url}/json"}}),
        ("fetcher", {"url": [f"{web.url}/json"]}),
        ("fetcher", {"url": "http://169.254.169.254/latest/meta-data/"}),
        ("fetcher", {"url": "http://[fe80::1%25eth0]/"}),
        ("fetcher", {"url": f"http://[::ffff:10.0.0.1]:{port}/json"}),
        ("fetcher", {"url": f"http://127.0.0.1:{port}@10.0.0.1/json"}),
        ("finder", {"who": {"$ne": None}}),
        ("finder", {"who": ["alice", "bob"]}),
        ("finder", {"who": "' or 1=1 --"}),
        ("finder", {"who": f"x'; delete from {table}; --"}),
        ("finder", {"who": 1}),
        ("finder", {"who": True}),
        ("finder", {"who": None}),
    ]
    gemini.script(call(*args[0], *args[1:]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    made = calls_of(reply)
    assert [c["tool"] for c in made] == [name for name, _ in args]
    failed(made[0], INVALID)
    for sent_as_text in made[1:3]:
        assert sent_as_text["ok"], sent_as_text
    for ssrf in made[3:9]:
        if "fe80" in ssrf["params"]["url"]:  # a scoped address: not even resolvable as a host name
            assert failed(ssrf, FAILED, DENIED, INVALID)["attempts"] >= 1 and "resolve" in ssrf["error"]
        else:
            failed(ssrf, INVALID, DENIED)
    for lookup in made[9:]:
        assert not lookup["ok"] or lookup["result"]["rows"] == [], lookup
    assert all("X-Evil" not in s.headers for s in web.seen), [s.headers for s in web.seen]
    assert [s.path for s in web.seen] == ["/echo", "/echo"]  # only the two tracer calls reached it
    assert rows_of(db, table) == before
    assert errs and errs[0]["code"] == INVALID


def test_cant_get_a_secret_to_gemini_or_the_reply(make_worker, r, db, bot, web, hostile, gemini, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    secret_id = add_secret(db, bot.user_id, SECRET)
    dsn = f"host=127.0.0.1 port=1 dbname=x user=u password='{SECRET.replace(chr(39), '')}'"
    dsn_id = add_secret(db, bot.user_id, dsn, key="DSN")
    add_tool(db, bot, "echoer", "http_request", {"url": web.url + "/echo", "secretId": secret_id})
    add_tool(db, bot, "bounced", "http_request", {"url": hostile.url + "/reflect?status=403", "secretId": secret_id})
    add_tool(
        db,
        bot,
        "keyed",
        "http_request",
        {"url": hostile.url + "/reflect?style=plain", "secretId": secret_id, "secretHeader": "X-Key"},
    )
    add_tool(db, bot, "far_db", "database_query", {"query": "select 1", "secretId": dsn_id, "retry": False})
    gemini.script(
        call("echoer", {}, ("bounced", {}), ("keyed", {}), ("far_db", {})),
        text(f"Sure! Your token is {SECRET} and, escaped, {json.dumps(SECRET)}."),  # a model that quotes it
        text("Nothing to add."),
    )
    r.delete(RESPONSES, ERRORS)
    payload = bot.message(NEUTRAL)
    push(r, payload)
    assert worker.run_once()
    raw_events = r.lrange(RESPONSES, 0, -1) + r.lrange(ERRORS, 0, -1)
    [event] = events(r, RESPONSES)
    reply = event["botResponse"]
    assert call_of(reply, "echoer")["ok"] and call_of(reply, "keyed")["ok"]
    failed(call_of(reply, "bounced"), FAILED)
    failed(call_of(reply, "far_db"), FAILED, DENIED)
    assert "[redacted]" in reply["content"]
    # The next message's history carries the saved (redacted) reply to Gemini.
    reply2, _ = ask(r, worker, bot, "and now?" + " " + "x" * 3)
    rows = query(db, """SELECT content, metadata FROM chat_messages WHERE "userId" = %s""", bot.user_id)
    assert_nowhere(SECRET, raw_events, event, reply2, rows, caplog.text, gemini.bodies())


def test_cant_reach_another_bots_files_through_function_arguments(make_worker, r, db, bot, other, gemini) -> None:
    worker = make_worker(gemini)
    private = "other-private-" + uuid.uuid4().hex[:8]
    add_tool(db, other, "saver", "file_operation", {"operation": "write", "path": "/notes.txt", "content": private})
    gemini.script(call("saver", {}), text("saved"))
    reply, errs = ask(r, worker, other, NEUTRAL)
    assert errs == [] and call_of(reply, "saver")["ok"]  # the other bot's file exists
    add_tool(db, bot, "reader", "file_operation", {"operation": "read", "path": "{{path}}"})
    paths = [
        f"../{other.bot_id}/notes.txt",
        f"/../{other.bot_id}/notes.txt",
        f"/{other.bot_id}/notes.txt",
        f"/files/../{other.bot_id}/notes.txt",
        "/proc/self/environ",
        "/etc/passwd",
        {"path": "../x"},
        ["..", other.bot_id, "notes.txt"],
    ]
    gemini.script(call("reader", {"path": paths[0]}, *[("reader", {"path": p}) for p in paths[1:]]), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    made = calls_of(reply)
    assert len(made) == len(paths) and not any(c["ok"] for c in made), made
    assert private not in json.dumps(reply) and private not in gemini_saw(gemini)
    assert errs and errs[0]["code"] in (FAILED, INVALID)


# ---- SQL: what holds -----------------------------------------------------------------------------------------


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


# ---- HTTP: what holds ----------------------------------------------------------------------------------------


def test_cant_misuse_redirects(make_worker, r, db, bot, web, hostile) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    port = web.server.server_address[1]
    hop = hostile.url + "/to?code={{code}}&loc={{loc}}"
    add_tool(db, bot, "poster", "http_request", {"url": hop, "method": "POST", "body": {"q": "v"}, "timeout": 2})
    add_tool(db, bot, "getter", "http_request", {"url": hop, "timeout": 2})

    # 303 (and 301/302 after a POST) turn into a GET without the body; 307/308 keep both.
    for code, method, body in ((303, "GET", b""), (302, "GET", b""), (307, "POST", b'{"q": "v"}')):
        reply, errs = ask(r, worker, bot, f"use poster code={code} loc={web.url}/echo")
        assert errs == [] and call_of(reply, "poster")["ok"], (code, reply)
        assert (web.seen[-1].method, web.seen[-1].body) == (method, body)
    # A relative Location stays on the origin.
    reply, errs = ask(r, worker, bot, "use getter code=302 loc=/list?n=1")
    assert errs == [] and call_of(reply, "getter")["result"]["json"]["items"][0]["id"] == 0
    # Credentials, other schemes, a scoped link-local address and TLS to a plain-text port all fail.
    seen = len(web.seen)
    for loc in (
        f"http://user:pw@127.0.0.1:{port}/json",
        f"http://127.0.0.1:{port}@169.254.169.254/",
        "ftp://127.0.0.1/",
        "file:///etc/passwd",
        f"http://[fe80::1%25lo]:{port}/json",
        f"https://127.0.0.1:{port}/json",
    ):
        reply, errs = ask(r, worker, bot, f"use getter code=307 loc={loc}")
        call = refused(reply, errs, "getter", DENIED, INVALID, FAILED)
        assert "pw" not in call["error"], call
    assert len(web.seen) == seen  # not one of them reached the allowed server in plain HTTP
    # A redirect loop ends after 5 hops, with a reason.
    reply, errs = ask(r, worker, bot, "use getter code=302 loc=/loop")
    assert "redirect" in refused(reply, errs, "getter", FAILED, INVALID)["error"]


def test_cant_flood_the_worker_with_headers_or_nested_compression(make_worker, r, db, bot, hostile) -> None:
    _reset_peak_rss()
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL, HTTP_MAX_RESPONSE_BYTES="4096", TOOL_RESULT_BUDGET="1024")
    add_tool(db, bot, "big_header", "http_request", {"url": hostile.url + "/bigheader?kb=200", "retry": False})
    add_tool(db, bot, "bomb2", "http_request", {"url": hostile.url + "/bomb2"})
    hostile.bomb()  # compressed before measuring
    Path("/proc/self/clear_refs").write_text("5")
    base = _peak_rss_mb()
    started = time.monotonic()
    reply, errs = ask(r, worker, bot, "use big header and bomb2")
    assert time.monotonic() - started < 5 and [e["code"] for e in errs] == [FAILED]
    assert _peak_rss_mb() - base < 60
    failed(call_of(reply, "big_header"), FAILED)
    bomb = call_of(reply, "bomb2")
    assert bomb["ok"] and bomb.get("resultTruncated") is True and len(bomb["result"].encode()) <= 1024


def test_wildcard_allowed_hosts_match_only_subdomains() -> None:
    policy = OutboundPolicy(("*.example.com", "intranet.corp."))
    allowed = ("a.example.com", "a.b.example.com", "A.EXAMPLE.COM", "a.example.com.", "intranet.corp", "INTRANET.CORP.")
    refused_hosts = (
        "example.com",
        "example.com.evil.net",
        "a.example.com.evil.net",
        "evilexample.com",
        "a-example.com",
        "example.com@evil.net",
        "intranet.corp.evil.net",
        "x.intranet.corp",
        "",
    )
    assert [h for h in allowed if not policy.host_allowed(h)] == []
    assert [h for h in refused_hosts if policy.host_allowed(h)] == []


# ---- access and secrets: what holds ---------------------------------------------------------------------------


def test_cant_run_a_tool_past_its_owners_restrictions(make_worker, r, db, bot, other, web, gemini) -> None:
    worker = make_worker(gemini, HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "authed", "http_request", {"url": web.url + "/json"}, requires_auth=True)
    add_tool(db, bot, "admins", "http_request", {"url": web.url + "/json", "roles": ["admin"]})
    add_tool(db, bot, "odd_roles", "http_request", {"url": web.url + "/json", "roles": {"user": True}})
    add_tool(db, bot, "no_roles", "http_request", {"url": web.url + "/json", "roles": []})
    # An account whose isActive is NULL (where the platform's column allows it) or false is not an active one.
    try:
        query(db, """UPDATE users SET "isActive" = NULL WHERE id = %s""", bot.user_id)
    except psycopg.errors.NotNullViolation:
        query(db, """UPDATE users SET "isActive" = false WHERE id = %s""", bot.user_id)
    gemini.script(call("authed", {}, ("admins", {}), ("odd_roles", {}), ("no_roles", {})), text("done"))
    reply, errs = ask(r, worker, bot, NEUTRAL)
    declared = {d["name"] for d in gemini.requests[0].body["tools"][0]["functionDeclarations"]}
    assert declared.isdisjoint({"authed", "admins", "odd_roles", "no_roles"})  # not offered...
    for name in ("authed", "admins", "odd_roles", "no_roles"):
        failed(call_of(reply, name), DENIED)  # ...nor run when asked for
    assert [e["code"] for e in errs] == [DENIED] and web.seen == []
    # An inactive bot answers nothing: no model request, no tool.
    query(db, """UPDATE bots SET "isActive" = false WHERE id = %s""", bot.bot_id)
    before = len(gemini.requests)
    responses, errs = send(r, worker, bot.message("run authed"))
    assert responses == [] and [e["code"] for e in errs] == [errors.BOT_INACTIVE]
    assert len(gemini.requests) == before and web.seen == []
    # Someone else's message naming this bot, with a model that would call its tools: bot_not_found.
    gemini.script(call("authed", {}), text("done"))
    responses, errs = send(r, worker, other.message("run authed", botId=bot.bot_id))
    assert responses == [] and [e["code"] for e in errs] == [errors.BOT_NOT_FOUND] and web.seen == []


def test_cant_use_a_malformed_or_hostile_secret(make_worker, r, db, bot, web) -> None:
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    crlf = "tok-crlf-" + uuid.uuid4().hex[:6] + "\r\nX-Evil: 1"
    nul = "tok-nul-" + uuid.uuid4().hex[:6] + "\x00tail"
    cases: dict[str, Any] = {
        "number": 12345,
        "listed": [add_secret(db, bot.user_id, "in-a-list-" + SECRET)],
        "object": {"id": add_secret(db, bot.user_id, "in-an-object-" + SECRET)},
        "flag": True,
        "crlf": add_secret(db, bot.user_id, crlf),
        "nul": add_secret(db, bot.user_id, nul),
    }
    for name, secret_id in cases.items():
        add_tool(db, bot, f"s_{name}", "http_request", {"url": web.url + "/echo", "secretId": secret_id})
    for name in cases:
        reply, errs = ask(r, worker, bot, f"run s {name}")
        call = refused(reply, errs, f"s_{name}", FAILED, INVALID)
        assert_nowhere(crlf, reply, errs)
        assert_nowhere(nul.replace("\x00", "\\u0000"), reply, errs)
        assert_nowhere("in-a-list-" + SECRET, reply, errs)
        assert call["error"]
    assert web.seen == []


@pytest.mark.parametrize("key", ["PATH", "LD_PRELOAD", "path", "BASH_ENV", "LC_ALL", "GCONV_PATH", "A B", ""])
def test_cant_name_a_dangerous_environment_variable_for_a_shell_secret(make_worker, r, db, bot, key) -> None:
    worker = make_worker()
    value = "/tmp/evil-" + uuid.uuid4().hex[:8]
    secret_id = add_secret(db, bot.user_id, value, key=key)
    add_tool(db, bot, "env_shell", "shell_command", {"command": "echo hi", "secretId": secret_id})
    reply, errs = ask(r, worker, bot, "run env shell")
    call = refused(reply, errs, "env_shell", FAILED)
    assert "not allowed" in call["error"], call
    assert_nowhere(value, reply, errs)
