"""Where a private value could show up and must not: a tool's secret echoed by the server it is sent to (as is, cut by
truncation, in another encoding, escaped as common server stacks escape, as a number), quoted by the model, or carried
into later history; the credentials in a tool's URL or DSN and the worker's own passwords and keys; another user's
conversation and tools. Nowhere means in no reply, event, row, log or request sent to Gemini.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import uuid
from typing import Any

import pytest

from botworker.errors import ConfigError
from botworker.queue import ERRORS

from attack_kit import (
    DENIED,
    FAILED,
    GEMINI_KEY,
    LOCAL,
    NEUTRAL,
    SECRET,
    assert_nowhere,
    call_of,
    failed,
    gemini_saw,
    refused,
    send,
)
from conftest import Servers, events, query
from gemini_server import call, text
from toolkit import PASSPHRASE, add_secret, add_tool, ask, ask_raw, calls_of

pytest_plugins = ["attack_kit", "gemini_server"]


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
    event, raw_events = ask_raw(r, worker, bot, "use echoer and keyed k=1")
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
    event, raw_events = ask_raw(r, worker, bot, NEUTRAL)
    reply = event["botResponse"]
    assert call_of(reply, "echoer")["ok"] and call_of(reply, "keyed")["ok"]
    failed(call_of(reply, "bounced"), FAILED)
    failed(call_of(reply, "far_db"), FAILED, DENIED)
    assert "[redacted]" in reply["content"]
    # The next message's history carries the saved (redacted) reply to Gemini.
    reply2, _ = ask(r, worker, bot, "and now?" + " " + "x" * 3)
    rows = query(db, """SELECT content, metadata FROM chat_messages WHERE "userId" = %s""", bot.user_id)
    assert_nowhere(SECRET, raw_events, event, reply2, rows, caplog.text, gemini.bodies())


def test_cant_see_url_credentials_in_errors(make_worker, r, db, bot, caplog) -> None:
    worker = make_worker()
    add_tool(db, bot, "legacy", "http_request", {"url": "http://svc:hunter2-pw@api.example.com/v1"})
    reply, errs = ask(r, worker, bot, "run legacy")
    refused(reply, errs, "legacy", DENIED)
    assert_nowhere("hunter2-pw", reply, errs, caplog.text)


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
