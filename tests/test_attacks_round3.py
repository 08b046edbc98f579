"""Attacks, third round: odd values and odd servers, through real messages to a real in-process worker.

Each test sends ordinary bot messages (the attacker controls the text, hence the parameters; or the model's
function calls, through the local Gemini stub) to a worker with the test Redis and PostgreSQL, and local servers
that answer from raw bytes. Each checks that the attack failed in a readable way and that nothing happened.
Covered here, not in ``test_tool_attacks.py`` / ``test_attacks_round2.py``: values JSON cannot carry (NaN,
Infinity, numbers past float range) coming back from tools; responses that leave bytes on a kept-alive
connection for the next user's call; host-name entries of HTTP_ALLOWED_HOSTS; a tool connection that dies;
secrets stored in odd spellings; what the worker tells Gemini about its own database.

This sweep found four holes (NaN/Infinity or a numeric past float range losing the whole reply, a malformed
DB_TOOL_URL whose libpq error quoted its password to Gemini and the events, a tool connection closed while idle
failing the next user's call); each test here was a strict xfail until its hole was closed.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis

from botworker.errors import ConfigError
from botworker.queue import ERRORS, RESPONSES
from botworker.worker import Worker

from attack_kit import DENIED, GEMINI_KEY, INVALID, LOCAL, call_of
from conftest import Bot, Servers, events, push, query
from gemini_server import text
from toolkit import PASSPHRASE, add_tool, ask

pytest_plugins = ["attack_kit", "gemini_server"]

NEUTRAL = "hello there"  # detection runs no tool: the model's calls are the only ones


# ---- fixtures and helpers -----------------------------------------------------------------------------------


def strict_json(raw: str) -> Any:
    """Parse as a JavaScript consumer would: NaN / Infinity are not JSON."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def send(r: redis.Redis, worker: Worker, payload: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """One message through the worker: (raw response events, error events)."""
    r.delete(RESPONSES, ERRORS)
    push(r, payload)
    assert worker.run_once()
    raw = [x.decode() if isinstance(x, bytes) else x for x in reversed(r.lrange(RESPONSES, 0, -1))]
    return raw, events(r, ERRORS)


class RawServer:
    """A TCP server on 127.0.0.1 answering each request on a connection from a script of raw byte strings.

    ``answers[path]`` is the bytes to send for a request to that path (the request is read up to its blank line);
    the connection stays open for the next request, as HTTP/1.1 keep-alive does. ``requests`` records
    (connection number, request line)."""

    def __init__(self, answers: dict[str, bytes | Callable[[], bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[int, str]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.conns = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.conns += 1
            threading.Thread(target=self._serve, args=(conn, self.conns), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                line = head.split(b"\r\n")[0].decode("latin-1")
                self.requests.append((number, line))
                path = line.split(" ")[1].split("?")[0]
                answer = self.answers.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                conn.sendall(answer() if callable(answer) else answer)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def raw_server() -> Iterator[Callable[[dict[str, Any]], RawServer]]:
    made: list[RawServer] = []

    def make(answers: dict[str, Any]) -> RawServer:
        server = RawServer(answers)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def http_answer(body: bytes, ctype: str = "application/json", status: str = "200 OK", extra: bytes = b"") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body + extra


# ---- values JSON cannot carry ------------------------------------------------------------------------------


def test_cant_lose_the_reply_with_a_nan_from_an_http_api(make_worker, r, db, bot, raw_server) -> None:
    server = raw_server({"/stats": http_answer(b'{"ratio": NaN, "max": Infinity, "big": 1e999}')})
    worker = make_worker(HTTP_ALLOWED_HOSTS=LOCAL)
    add_tool(db, bot, "stats_api", "http_request", {"url": server.url + "/stats", "timeout": 2})
    raw, errs = send(r, worker, bot.message("use stats_api"))
    assert errs == [] and len(raw) == 1, errs  # a reply, not internal_error
    event = strict_json(raw[0])
    assert call_of(event["botResponse"], "stats_api")["ok"] is True


def test_cant_lose_the_reply_with_a_numeric_past_float_range(make_worker, r, db, bot) -> None:
    worker = make_worker()
    add_tool(db, bot, "big_db", "database_query", {"query": "SELECT ({{n}})::numeric * 1 AS n"})
    raw, errs = send(r, worker, bot.message('use big_db n="1e400"'))
    assert errs == [] and len(raw) == 1, errs
    event = strict_json(raw[0])
    call = call_of(event["botResponse"], "big_db")
    assert call["ok"] is True and str(call["result"]["rows"][0]["n"]).startswith("1"), call


def test_cant_lose_the_reply_with_odd_but_valid_database_values(make_worker, r, db, bot) -> None:
    """Control for the hole above: values JSON can carry in some form all come back (as text where needed)."""
    worker = make_worker()
    add_tool(
        db,
        bot,
        "odd_db",
        "database_query",
        {
            "query": "SELECT 'NaN'::numeric AS nan_num, 'Infinity'::float8 AS inf_f, '-Infinity'::numeric AS ninf,"
            " 1e300::numeric AS big, '\\x00ff'::bytea AS raw, ARRAY[1,NULL,3] AS arr, '{\"a\":[1,{\"b\":null}]}'::jsonb"
            " AS doc, interval '1 month 2 days 3 seconds' AS span, '2024-02-29 12:00+05:45'::timestamptz AS at,"
            " '12:00+14'::timetz AS tz, 'e\u00e9\\u'::text AS t, point(1,2) AS pt, '10.0.0.1/8'::inet AS net"
        },
    )
    raw, errs = send(r, worker, bot.message("use odd_db"))
    assert errs == [] and len(raw) == 1, errs
    row = call_of(strict_json(raw[0])["botResponse"], "odd_db")["result"]["rows"][0]
    assert row["nan_num"] == "NaN" and row["inf_f"] == "inf" and row["ninf"] == "-Infinity", row
    assert row["arr"] == [1, None, 3] and row["doc"] == {"a": [1, {"b": None}]} and row["raw"] == "AP8=", row


# ---- kept-alive connections shared by users' calls ---------------------------------------------------------


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


# ---- host names in HTTP_ALLOWED_HOSTS ----------------------------------------------------------------------


def test_cant_stretch_an_allowed_host_name_to_other_names_or_addresses(make_worker, r, db, bot, raw_server) -> None:
    """HTTP_ALLOWED_HOSTS names a host (written "LocalHost.", as an operator might): that name, in any case and
    with or without its trailing dot, is allowed; the address it resolves to is not (by literal, another spelling
    or another name for it), nor a redirect to it, nor a URL that only mentions the name as credentials."""
    server = raw_server({})
    port = server.port
    server.answers.update(
        {
            "/ok": http_answer(b'{"ok": true}'),
            "/to-ip": f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/ok\r\nContent-Length: 0\r\n\r\n".encode(),
            "/to-v6": f"HTTP/1.1 302 Found\r\nLocation: http://[::ffff:127.0.0.1]:{port}/ok\r\nContent-Length: 0\r\n\r\n".encode(),
        }
    )
    worker = make_worker(HTTP_ALLOWED_HOSTS="LocalHost., *.localhost")
    add_tool(db, bot, "fetcher", "http_request", {"url": "{{url}}", "timeout": 2})
    for allowed in (f"http://localhost:{port}/ok", f"http://LOCALHOST:{port}/ok"):
        reply, errs = ask(r, worker, bot, f"use fetcher url={allowed}")
        assert errs == [] and call_of(reply, "fetcher")["result"]["json"] == {"ok": True}, (allowed, reply)
    before = len(server.requests)
    other_names = [n for n in ("vm", "runsc", socket.gethostname()) if _loopback(n)]
    refused = [
        f"http://127.0.0.1:{port}/ok",
        f"http://127.1:{port}/ok",
        f"http://2130706433:{port}/ok",
        f"http://[::ffff:127.0.0.1]:{port}/ok",
        f"http://localhost:{port}@127.0.0.1:{port}/ok",
        f"http://localhost@127.0.0.1:{port}/ok",
        f"http://127.0.0.1:{port}#@localhost/ok",
        *(f"http://{n}:{port}/ok" for n in other_names),
    ]
    for url in refused:
        reply, errs = ask(r, worker, bot, f"use fetcher url={url}")
        call = call_of(reply, "fetcher")
        assert call["ok"] is False and call["code"] in (DENIED, INVALID), (url, call)
    assert len(server.requests) == before  # not one of them reached the server
    for hop in ("/to-ip", "/to-v6"):
        reply, errs = ask(r, worker, bot, f"use fetcher url=http://localhost:{port}{hop}")
        call = call_of(reply, "fetcher")
        assert call["ok"] is False and call["code"] == DENIED, (hop, call)
    assert [line.split(" ")[1] for _, line in server.requests[before:]] == ["/to-ip", "/to-v6"]


def _loopback(name: str) -> bool:
    try:
        return all(info[4][0].startswith(("127.", "::1")) for info in socket.getaddrinfo(name, 80))
    except OSError:
        return False


def test_wildcard_allowed_host_does_not_cover_look_alike_names() -> None:
    """'*.corp.example' is the subdomains of corp.example, however the name is spelled (case, trailing dots,
    IDNA full stops), and nothing that merely ends with the same letters."""
    from botworker.tools.outbound import OutboundPolicy

    policy = OutboundPolicy(("*.Corp.Example.", "intranet"))
    for yes in ("a.corp.example", "A.CORP.EXAMPLE.", "a.b.corp.example", "x\u3002corp.example", "INTRANET."):
        assert policy.host_allowed(yes), yes
    for no in (
        "corp.example",
        "evilcorp.example",
        "corp.example.evil.com",
        "a.corp.example\uff0eevil",
        "corp\u3002example",
        "intranet.evil.com",
        "xintranet",
        "intranet\u00ad.evil",
        "",
        ".",
    ):
        assert not policy.host_allowed(no), no


# ---- the tool connection dying -----------------------------------------------------------------------------


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


# ---- what Gemini is told -----------------------------------------------------------------------------------

TOOL_DB_PASSWORD = "p%zzToolLoginPw-71c"  # a '%' left unencoded in the URL's password: a plausible operator slip


def _tool_url(servers: Servers, password: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(servers.database_url)
    return parts._replace(netloc=f"botworker_tools:{password}@{parts.hostname}:{parts.port}").geturl()


def test_cant_get_the_tool_logins_password_into_gemini_or_events(make_cfg, servers) -> None:
    """A DB_TOOL_URL libpq cannot read (an unencoded '%' in its password) is refused at start-up, and the refusal
    does not quote the password; otherwise every tool call would answer libpq's complaint, password included."""
    with pytest.raises(ConfigError) as refused:
        make_cfg(DB_TOOL_URL=_tool_url(servers, TOOL_DB_PASSWORD))
    assert "DB_TOOL_URL" in str(refused.value)
    for needle in (TOOL_DB_PASSWORD, "ToolLoginPw"):
        assert needle not in str(refused.value)


def test_cant_see_another_users_conversation_or_tools_through_gemini(
    make_worker, r, db, bot, other, servers, gemini
) -> None:
    """Two users of one worker, each with a bot and a tool: what the worker sends Gemini for one holds nothing of
    the other's history, tools, ids, or the worker's database URLs and keys."""
    worker = make_worker(gemini)
    add_tool(db, bot, "mine_api", "http_request", {"url": "https://example.com/mine"})
    add_tool(db, other, "theirs_api", "http_request", {"url": "https://example.com/theirs"})
    gemini.script(text("first for other"), text("reply for me"))
    send(r, worker, other.message("OTHER-USER-PRIVATE-7781 my salary is 90k"))
    send(r, worker, bot.message(NEUTRAL))
    mine = json.dumps(gemini.requests[1].body)
    assert "mine_api" in mine  # control: the request is the one for this bot
    for needle in ("OTHER-USER-PRIVATE-7781", "first for other", "theirs_api", other.user_id, other.bot_id):
        assert needle not in mine, needle
    for needle in (servers.database_url, servers.redis_url, PASSPHRASE, GEMINI_KEY):
        assert needle not in json.dumps(gemini.bodies()), needle
