"""What one user's tool call can leave, in the connections and client state the worker keeps between calls, for the next
user's call: no session cookie, no bytes left on a kept-alive HTTP connection (an answer longer than its Content-Length,
a body after HEAD, 204 or 304, a response sent late), no dead HTTP or database connection (cut at a deadline, terminated
mid-call or while idle) for the next call to fail on.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from attack_kit import LOCAL, call_of, http_answer
from conftest import Bot, query
from toolkit import add_tool, ask

pytest_plugins = ["attack_kit"]


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


SMUGGLED = b'{"owner": "user A", "card": "4111-1111-1111-1111"}'


def test_cant_feed_the_next_users_call_with_bytes_left_on_a_kept_alive_connection(
    make_worker, r, db, bot, other, raw_server
) -> None:
    """User A's server answers with more bytes than its Content-Length (a whole second response), or a body to a
    HEAD or after a 204/304: on a reused connection those bytes would be read as user B's answer."""
    smuggle = http_answer(SMUGGLED)
    server = raw_server(
        {
            "/extra": http_answer(b"hello", extra=smuggle),
            "/head": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 51\r\n\r\n" + smuggle,
            "/nocontent": b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n" + smuggle,
            "/notmodified": b"HTTP/1.1 304 Not Modified\r\n\r\n" + smuggle,
            "/b": http_answer(b'{"owner": "user B"}'),
        }
    )
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    for path, method in (("/extra", "GET"), ("/head", "HEAD"), ("/nocontent", "GET"), ("/notmodified", "GET")):
        name = "a" + path.strip("/")
        add_tool(db, bot, name, "http_request", {"url": server.url + path, "method": method, "timeout": 2})
    add_tool(db, other, "b_api", "http_request", {"url": server.url + "/b", "timeout": 2})
    for name in ("aextra", "ahead", "anocontent", "anotmodified"):
        reply, _ = ask(r, worker, bot, f"use {name}")
        assert SMUGGLED.decode() not in json.dumps(call_of(reply, name)), call_of(reply, name)
        time.sleep(0.05)  # the leftover bytes are in the socket before B's call takes the connection
        reply, errs = ask(r, worker, other, "use b_api")
        got = call_of(reply, "b_api")
        assert errs == [] and got["ok"] is True, (name, got)
        assert got["result"]["json"] == {"owner": "user B"}, (name, got)


def test_cant_feed_the_next_call_with_a_response_sent_late(make_worker, r, db, bot, other, raw_server) -> None:
    """The extra response arrives only after user A's call is over, just as user B's request goes out on the
    kept-alive connection: B must not take it for its answer."""
    smuggle = http_answer(SMUGGLED)

    def late() -> bytes:
        return http_answer(b"hello")

    server = raw_server({"/late": late, "/b": http_answer(b'{"owner": "user B"}')})
    original = server._serve

    def serve(conn: socket.socket, number: int) -> None:
        # The first request gets its answer, then (unasked) the smuggled one right before the next answer.
        def send_late() -> None:
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                conn.sendall(smuggle)

        threading.Thread(target=send_late, daemon=True).start()
        original(conn, number)

    server._serve = serve  # type: ignore[method-assign]
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "a_late", "http_request", {"url": server.url + "/late", "timeout": 2})
    add_tool(db, other, "b_api", "http_request", {"url": server.url + "/b", "timeout": 2})
    ask(r, worker, bot, "use a_late")
    results = []
    for _ in range(3):
        time.sleep(0.12)
        reply, _ = ask(r, worker, other, "use b_api")
        results.append(call_of(reply, "b_api"))
    for got in results:
        assert "user A" not in json.dumps(got), results


def test_cant_break_the_next_users_call_by_outlasting_the_deadline(make_worker, r, db, bot, other, raw_server) -> None:
    """User A's call is cut by its deadline mid-body; user B's call to the same server right after works and gets
    B's own answer (no dead connection reused, no leftover of A's body)."""

    def drip() -> bytes:
        time.sleep(1.5)
        return b"x" * 10

    server = raw_server(
        {
            "/drip": lambda: (
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n\r\nAAAAAAAAAA" + drip()
            ),
            "/b": http_answer(b'{"owner": "user B"}'),
        }
    )
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL, TOOL_MAX_ATTEMPTS="1")
    add_tool(db, bot, "a_drip", "http_request", {"url": server.url + "/drip", "timeout": 0.5})
    add_tool(db, other, "b_api", "http_request", {"url": server.url + "/b", "timeout": 2})
    reply, errs = ask(r, worker, bot, "use a_drip")
    assert call_of(reply, "a_drip")["ok"] is False and "timed out" in call_of(reply, "a_drip")["error"]
    reply, errs = ask(r, worker, other, "use b_api")
    got = call_of(reply, "b_api")
    assert errs == [] and got["ok"] is True and got["result"]["json"] == {"owner": "user B"}, got


def _tool_backends(db: psycopg.Connection[Any]) -> list[int]:
    rows = query(db, "SELECT pid FROM pg_stat_activity WHERE application_name = 'botworker-tool'")
    return [row["pid"] for row in rows]


def _kill_tool_backends(db: psycopg.Connection[Any]) -> int:
    pids = _tool_backends(db)
    for pid in pids:
        query(db, "SELECT pg_terminate_backend(%s)", pid)
    return len(pids)


@pytest.fixture
def notes(db: psycopg.Connection[Any]) -> Iterator[str]:
    name = "attack3_" + uuid.uuid4().hex[:10]
    query(db, f"CREATE TABLE {name} (id serial PRIMARY KEY, note text NOT NULL)")
    yield name
    query(db, f"DROP TABLE IF EXISTS {name}")


def _db_tools(db: psycopg.Connection[Any], bot: Bot, other: Bot, notes: str) -> None:
    add_tool(db, bot, "reader", "database_query", {"query": f"SELECT count(*) AS n FROM {notes}"})
    add_tool(db, bot, "suicide", "database_query", {"query": "SELECT pg_terminate_backend(pg_backend_pid()) AS x"})
    insert = {"query": f"INSERT INTO {notes} (note) VALUES ({{{{v}}}})", "type": "insert"}
    add_tool(db, other, "writer", "database_query", insert)


def test_cant_break_the_next_users_tool_by_killing_the_tool_connection_mid_call(
    make_worker, r, db, bot, other, notes
) -> None:
    """A user's own select terminates the tool connection it runs on (a login allowed pg_terminate_backend):
    that call fails; the next one, another user's write (not retried), works on a fresh connection."""
    worker = make_worker(TOOL_MAX_ATTEMPTS="1")
    _db_tools(db, bot, other, notes)
    reply, _ = ask(r, worker, bot, "use suicide")
    assert call_of(reply, "suicide")["ok"] is False
    reply, _ = ask(r, worker, other, 'use writer v="after own kill"')
    assert call_of(reply, "writer")["ok"] is True, call_of(reply, "writer")
    assert [row["note"] for row in query(db, f"SELECT note FROM {notes}")] == ["after own kill"]


def test_cant_break_the_next_users_tool_by_a_tool_connection_closed_while_idle(
    make_worker, r, db, bot, other, notes
) -> None:
    worker = make_worker(TOOL_MAX_ATTEMPTS="1")
    _db_tools(db, bot, other, notes)
    reply, _ = ask(r, worker, bot, "use reader")
    assert call_of(reply, "reader")["ok"] is True
    assert _kill_tool_backends(db) == 1
    time.sleep(0.1)
    reply, _ = ask(r, worker, other, 'use writer v="after idle kill"')
    assert call_of(reply, "writer")["ok"] is True, call_of(reply, "writer")
    assert [row["note"] for row in query(db, f"SELECT note FROM {notes}")] == ["after idle kill"]
