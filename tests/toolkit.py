"""Test helpers for tools end to end: tool and secret rows, a local HTTP server, one message through a worker; and
the rows and secrets the unit tests of the tool plumbing share (no servers).

``encrypt`` is the platform's side of secrets (Node's ``scryptSync`` + AES-256-CBC, written here independently of
the worker's decryption) so fixtures are produced the way the platform produces them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import redis
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from psycopg.types.json import Jsonb

from botworker.queue import ERRORS, RESPONSES
from botworker.tools.secrets import Secrets
from botworker.worker import Worker

from conftest import Bot, events, push, query

PASSPHRASE = "platform-encryption-key-for-tests"


def encrypt(plaintext: str, passphrase: str = PASSPHRASE) -> str:
    """What the platform stores: hex(iv):hex(AES-256-CBC(scrypt(passphrase, 'salt', 32), PKCS#7(plaintext)))."""
    key = hashlib.scrypt(passphrase.encode(), salt=b"salt", n=16384, r=8, p=1, dklen=32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    data = padder.update(plaintext.encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv.hex() + ":" + (encryptor.update(data) + encryptor.finalize()).hex()


def add_tool(
    db: psycopg.Connection[Any],
    bot: Bot,
    name: str,
    kind: str,
    config: dict[str, Any],
    requires_auth: bool = False,
    active: bool = True,
    display: str | None = None,
) -> str:
    [row] = query(
        db,
        """INSERT INTO bot_tools (name, "displayName", description, type, config, "botId", "requiresAuth", "isActive")
           VALUES (%s, %s, 'test tool', %s, %s, %s, %s, %s) RETURNING id""",
        name,
        display or name.replace("_", " ").title(),
        kind,
        Jsonb(config),
        bot.bot_id,
        requires_auth,
        active,
    )
    return str(row["id"])


def add_secret(
    db: psycopg.Connection[Any],
    user_id: str,
    value: str,
    key: str = "API_TOKEN",
    active: bool = True,
    passphrase: str = PASSPHRASE,
) -> str:
    secret_id = str(uuid.uuid4())
    query(
        db,
        """INSERT INTO secrets (id, name, key, "encryptedValue", type, provider, "isActive", "userId")
           VALUES (%s, %s, %s, %s, 'api_key', 'test', %s, %s)""",
        secret_id,
        f"secret {key}",
        key,
        encrypt(value, passphrase),
        active,
        user_id,
    )
    return secret_id


def ask(r: redis.Redis, worker: Worker, bot: Bot, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Send one message through the worker; return the reply row and the error events it caused."""
    r.delete(RESPONSES, ERRORS)
    push(r, bot.message(text))
    assert worker.run_once()
    [reply] = events(r, RESPONSES)
    return reply["botResponse"], events(r, ERRORS)


def ask_raw(r: redis.Redis, worker: Worker, bot: Bot, text: str) -> tuple[dict[str, Any], list[Any]]:
    """Send one message through the worker; return its bot_responses event and every event as Redis holds it."""
    r.delete(RESPONSES, ERRORS)
    push(r, bot.message(text))
    assert worker.run_once()
    raw_events = r.lrange(RESPONSES, 0, -1) + r.lrange(ERRORS, 0, -1)
    [event] = events(r, RESPONSES)
    return event, raw_events


def calls_of(reply: dict[str, Any]) -> list[dict[str, Any]]:
    return reply["metadata"]["toolCalls"]


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass
class LocalHTTP:
    """A real HTTP server on 127.0.0.1 with a few scripted routes; records every request it gets.

    /json                 {"ok": true, "query": {...}}
    /echo                 the request's method, headers, query and body, as JSON
    /status/<code>        answers <code> (?retry_after=N adds Retry-After)
    /flaky/<n>/<code>     answers <code> to the first n requests on that path, then 200
    /redirect?to=<url>    302 to <url>
    /big?bytes=N          N bytes of text
    /slow?s=S             sleeps S seconds before answering
    """

    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    hits: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


class QuietHandler(BaseHTTPRequestHandler):
    """Base of the test servers' handlers: HTTP/1.1 keep-alive, no access log, ``_raw`` / ``_send`` answers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._raw(code, json.dumps(payload).encode(), "application/json", headers)

    def _raw(self, code: int, data: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        with contextlib.suppress(OSError):  # the client may be gone: a timeout is what some tests are about
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)


def _handler(state: LocalHTTP) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        wbufsize = -1  # headers and body in one write: no Nagle/delayed-ACK stall of 40 ms per response

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            parts = urlsplit(self.path)
            q = parse_qs(parts.query)
            state.seen.append(Seen(self.command, parts.path, q, dict(self.headers.items()), body))
            state.hits[parts.path] = state.hits.get(parts.path, 0) + 1
            segments = parts.path.strip("/").split("/")
            extra: dict[str, str] = {}
            if segments[0] == "json":
                self._send(200, {"ok": True, "query": q})
            elif segments[0] == "echo":
                payload = {
                    "method": self.command,
                    "headers": dict(self.headers.items()),
                    "query": q,
                    "body": body.decode("utf-8", "replace"),
                }
                self._send(200, payload)
            elif segments[0] == "status":
                if "retry_after" in q:
                    extra["Retry-After"] = q["retry_after"][0]
                self._send(int(segments[1]), {"status": int(segments[1])}, extra)
            elif segments[0] == "flaky":
                n, code = int(segments[1]), int(segments[2])
                if state.hits[parts.path] <= n:
                    self._send(code, {"try": state.hits[parts.path]}, {"Retry-After": q.get("retry_after", ["0"])[0]})
                else:
                    self._send(200, {"ok": True, "try": state.hits[parts.path]})
            elif segments[0] == "redirect":
                self._send(302, {}, {"Location": q["to"][0]})
            elif segments[0] == "big":
                self._raw(200, b"x" * int(q["bytes"][0]), "text/plain")
            elif segments[0] == "slow":
                time.sleep(float(q["s"][0]))
                self._send(200, {"slow": True})
            else:
                self._send(404, {"error": "no such route"})

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    return Handler


def start_http() -> Iterator[LocalHTTP]:
    """Generator for a fixture: a LocalHTTP serving in a daemon thread until the fixture ends."""
    state = LocalHTTP(ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler))
    state.server.server_close()
    state.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.server.daemon_threads = True
    thread = threading.Thread(target=state.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.server.shutdown()
        state.server.server_close()


def tcp_forwarder(host: str, port: int) -> Iterator[int]:
    """Generator for a fixture: a TCP port on 127.0.0.1 that forwards to (host, port), standing in for another
    server (say, a database other than the platform's) without starting one."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection((host, port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


# ---- for unit tests: an owner, their bot and user rows, remembered secrets ----------------------------------

OWNER = "user-1"
BOT = {"id": "b", "userId": OWNER}  # a bots row of OWNER's
ACTIVE_USER = {"id": OWNER, "isActive": True, "role": "user"}  # OWNER's users row


def remembering(*values: str) -> Secrets:
    """A ``Secrets`` without a store that has seen ``values``, so redacts them."""
    s = Secrets(store=None, encryption_key="k", user_id="u")  # type: ignore[arg-type]
    for value in values:
        s.remember(value)
    return s
