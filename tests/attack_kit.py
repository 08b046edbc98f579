"""Fixtures and checks shared by the tool tests (``test_tools.py``, ``test_pgbouncer.py``) and the attacks on tools
(``tests/attacks/``, one file per attack surface): in-process workers, a second platform user, a tool login without
grants, a table to attack, hostile local servers, and the assertions "this call was refused, readably" and "this
secret is nowhere".

Every attack sends ordinary bot messages (the attacker controls the text, hence the tool parameters; or, through the
local Gemini stub, the model's function calls) to a real in-process worker with the test Redis and PostgreSQL, whose
bot has tools configured the way a platform user would configure them, then checks two things: the attack failed in a
readable way (a failed tool call in the reply's ``toolCalls`` and/or a ``bot_errors`` event with a tool_* or llm_*
code), and nothing happened (no row changed, no request reached the target, no secret anywhere).

A pytest plugin: a module using the fixtures declares ``pytest_plugins = ["attack_kit"]``.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import psycopg
import pytest
import redis

from botworker import errors
from botworker.config import Config
from botworker.demo import seed
from botworker.queue import ERRORS, RESPONSES
from botworker.worker import Heartbeat, Worker

from conftest import Bot, Servers, events, push, query
from gemini_server import GeminiServer
from toolkit import PASSPHRASE, LocalHTTP, QuietHandler, calls_of, start_http

DENIED, INVALID, FAILED = errors.TOOL_DENIED, errors.TOOL_INVALID_PARAMS, errors.TOOL_FAILED
LOCAL = "127.0.0.1/32"  # HTTP_ALLOWED_HOSTS that lets tools reach the local test servers
GEMINI_KEY = "attack-key-Zq81Lp07"  # the workers' Gemini key: it must never leave the worker but in its header
ROLE, ROLE_PASSWORD = "botworker_attack_ro", "attack-ro-pw"  # a login with no grants at all, for DB_TOOL_URL
# A secret that needs escaping in JSON, URLs, headers and HTML (a '/', a '"', a space, a non-ASCII letter); the
# ASCII tail makes prefixes long.
SECRET = 'r2/s3cr\u00e9t"+ =-0f4a2b9c7d1e'
NEUTRAL = "hello there"  # a message that makes detection run no tool: the model's calls are the only ones


@pytest.fixture
def make_worker(make_cfg: Callable[..., Config], r: redis.Redis) -> Iterator[Callable[..., Worker]]:
    """In-process workers (one per call) with the platform's encryption key and quick tool retries; given a
    Gemini stub, they answer through it (one attempt per request)."""
    made: list[Worker] = []

    def make(gemini: GeminiServer | None = None, **env: str) -> Worker:
        if gemini is not None:
            env = {"GEMINI_KEY": GEMINI_KEY, "GEMINI_BASE_URL": gemini.url, "LLM_MAX_ATTEMPTS": "1", **env}
        worker = Worker(
            make_cfg(**{"ENCRYPTION_KEY": PASSPHRASE, "TOOL_RETRY_DELAY": "0.01", **env}), 0, "test-node", Heartbeat()
        )
        worker.init_process()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.sandbox.close()
        worker.pipeline.http.close()
        worker.store.close()
        worker.redis.close()


@pytest.fixture
def web() -> Iterator[LocalHTTP]:
    yield from start_http()


@pytest.fixture
def other(servers: Servers) -> Bot:
    """Another platform user with a bot of their own."""
    user_id, bot_id = seed(servers.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    return Bot(user_id, bot_id, str(uuid.uuid5(uuid.UUID(bot_id), "tool")))


@pytest.fixture
def tool_url(db: psycopg.Connection[Any], servers: Servers) -> str:
    """DB_TOOL_URL as docs/tools.md recommends: a login granted nothing (cluster-wide, so created once and kept)."""
    try:
        query(
            db,
            f"DO $$ BEGIN CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        )
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("the test database user cannot create roles")
    parts = urlsplit(servers.database_url)
    return parts._replace(netloc=f"{ROLE}:{ROLE_PASSWORD}@{parts.hostname}:{parts.port}").geturl()


def rows_of(db: psycopg.Connection[Any], name: str) -> list[dict[str, Any]]:
    """The rows of a sweep's table (columns id, name, note), to show nothing changed."""
    return query(db, f"SELECT id, name, note FROM {name} ORDER BY id")


def call_of(reply: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in calls_of(reply) if c["tool"] == name]
    assert len(found) == 1, (name, calls_of(reply))
    return found[0]


def failed(call: dict[str, Any], *codes: str) -> dict[str, Any]:
    """The call failed with one of ``codes`` and a readable reason."""
    assert call["ok"] is False, call
    assert call["code"] in codes, call
    assert isinstance(call["error"], str) and len(call["error"]) > 10, call
    return call


def refused(reply: dict[str, Any], errs: list[dict[str, Any]], name: str, *codes: str) -> dict[str, Any]:
    """The call of tool ``name`` failed with one of ``codes``, readably, and the message's one error event says so."""
    call = failed(call_of(reply, name), *codes)
    assert [e["code"] for e in errs] == [call["code"]], errs
    assert call["error"] in errs[0]["error"]
    return call


def send(r: redis.Redis, worker: Worker, payload: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """Push one raw payload through the worker: (response events, error events)."""
    r.delete(RESPONSES, ERRORS)
    push(r, payload)
    assert worker.run_once()
    return events(r, RESPONSES), events(r, ERRORS)


def needles(value: str) -> list[str]:
    """Every usual form a leaked secret could take in JSON, logs or URLs."""
    forms = {
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        base64.b64encode(value.encode()).decode(),
        base64.urlsafe_b64encode(value.encode()).decode(),
        value.encode().hex(),
    }
    return sorted(forms)


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside ``value`` (dict keys included), as it is, not re-serialised."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)
    elif value is not None:
        yield str(value)


def assert_nowhere(value: str, *places: Any) -> None:
    """No usual form of ``value`` in any string of ``places`` (raw texts, logs, events, rows, Gemini bodies)."""
    for text in strings_in(places):
        for needle in needles(value):
            assert needle not in text, (needle, text[:2000])


# ---- a table to attack --------------------------------------------------------------------------------------

WEIRD = "' OR '1'='1"  # a stored name that is itself an injection string: binding must find exactly this row


@pytest.fixture
def table(db: psycopg.Connection[Any]) -> Iterator[str]:
    """A fresh table with three rows; dropped afterwards."""
    name = "attack_" + uuid.uuid4().hex[:10]
    query(db, f"CREATE TABLE {name} (id serial PRIMARY KEY, name text NOT NULL, note text)")
    query(db, f"INSERT INTO {name} (name, note) VALUES ('alice', 'a'), ('bob', 'b'), (%s, 'weird')", WEIRD)
    yield name
    query(db, f"DROP TABLE IF EXISTS {name}")


# ---- hostile servers ----------------------------------------------------------------------------------------


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


# ---- what the worker sent Gemini ----------------------------------------------------------------------------


def gemini_saw(gemini: GeminiServer) -> str:
    """Everything the worker sent to Gemini, as one text (the recorded request bodies, re-serialised both ways)."""
    bodies = gemini.bodies()
    return json.dumps(bodies) + json.dumps(bodies, ensure_ascii=False)
