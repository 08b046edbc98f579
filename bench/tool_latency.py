#!/usr/bin/env python3
"""What a tool call costs the worker beyond the work itself: dispatch overhead for HTTP and database tools.

    .venv/bin/python bench/tool_latency.py [--n 500]

Starts throwaway Redis/PostgreSQL (botworker.devstack) unless REDIS_URL and DATABASE_URL are set, and a local
HTTP server (a tiny JSON endpoint) in a thread. Measures, interleaved round by round so noise hits all alike:

- ``http: requests.Session.get``: the floor, a kept-alive session straight to the server;
- ``http: dispatch``: the same GET through ``tools.dispatch`` (access, params, the pinned outbound session,
  URL template, size-capped read, redaction);
- ``http: dispatch + secret``: plus decrypting a secret from the database and redacting it;
- ``db: psycopg select``: the floor, the statement on a warm connection;
- ``db: dispatch``: the same statement as a ``database_query`` tool (template -> bound statement, READ ONLY
  transaction with its settings in one round trip, row cap, JSON rows, rollback + advisory unlock).
Prints p50 / p90 / p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from botworker.config import load_config
from botworker.demo import seed
from botworker.message import ToolCall
from botworker.schema import migrate
from botworker.store import Store
from botworker.tools import ToolContext, outbound, pinned
from botworker.tools.dispatch import dispatch
from botworker.tools.secrets import Secrets

from toolkit import PASSPHRASE, QuietHandler, encrypt


class Handler(QuietHandler):
    wbufsize = -1  # headers and body in one write: no Nagle/delayed-ACK stall of 40 ms per response

    def do_GET(self) -> None:
        self._send(200, {"ok": True, "path": self.path})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args()
    stack = None
    if os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL"):
        database_url = os.environ["DATABASE_URL"]
    else:
        from botworker.devstack import DevStack

        stack = DevStack().start()
        database_url = stack.database_url
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        migrate(database_url)
        run(database_url, base, args.n)
    finally:
        server.shutdown()
        if stack is not None:
            stack.stop()


def run(database_url: str, base: str, n: int) -> None:
    user_id, bot_id = seed(database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    conn = psycopg.connect(database_url)
    conn.autocommit = True
    secret_id = str(uuid.uuid4())
    with conn.cursor() as cur:
        cur.execute(
            """INSERT INTO secrets (id, name, key, "encryptedValue", type, "isActive", "userId")
               VALUES (%s, 'bench', 'TOKEN', %s, 'api_key', true, %s)""",
            (secret_id, encrypt("bench-token-" + uuid.uuid4().hex), user_id),
        )
    cfg = load_config(
        environ={"DATABASE_URL": database_url, "ENCRYPTION_KEY": PASSPHRASE, "HTTP_ALLOWED_HOSTS": "127.0.0.1/32"},
        env_file=None,
    )
    store = Store(cfg)
    user = {"id": user_id, "role": "user", "isActive": True}
    bot = {"id": bot_id, "userId": user_id}
    tools = [
        {"id": "h", "name": "h", "type": "http_request", "config": {"url": base + "/json?q={{q}}"}},
        {"id": "s", "name": "s", "type": "http_request", "config": {"url": base + "/json", "secretId": secret_id}},
        {"id": "d", "name": "d", "type": "database_query", "config": {"query": "SELECT {{n}}::int + 1 AS n"}},
    ]
    http = pinned.session(outbound.OutboundPolicy(cfg.http_allowed_hosts))
    floor = requests.Session()

    def ctx() -> ToolContext:
        return ToolContext(user_id, bot, tools, store, cfg, None, user, http, Secrets(store, PASSPHRASE, user_id))

    def ok(call: ToolCall) -> None:
        result = dispatch(call, ctx())
        assert result.ok, result.error

    cases: dict[str, Callable[[], None]] = {
        "http: requests.Session.get": lambda: floor.get(base + "/json?q=x", timeout=5).json(),
        "http: dispatch": lambda: ok(ToolCall("h", "h", "http_request", None, {"q": "x"})),
        "http: dispatch + secret": lambda: ok(ToolCall("s", "s", "http_request", None, {})),
        "db: psycopg select": lambda: _select(conn),
        "db: dispatch": lambda: ok(ToolCall("d", "d", "database_query", None, {"n": 41})),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm: connections, the scrypt key, imports
        fn()
    for _ in range(n):
        for name, fn in cases.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    print(f"{'case':32} {'p50':>8} {'p90':>8} {'p99':>8}   (ms, n={n})")
    for name, values in times.items():
        q = statistics.quantiles(values, n=100)
        print(f"{name:32} {q[49]:8.3f} {q[89]:8.3f} {q[98]:8.3f}")
    store.close()
    conn.close()


def _select(conn: psycopg.Connection[Any]) -> None:
    with conn.cursor() as cur:
        cur.execute("SELECT %s::int + 1 AS n", (41,))
        cur.fetchall()


if __name__ == "__main__":
    main()
