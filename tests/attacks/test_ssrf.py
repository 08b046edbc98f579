"""Where an HTTP or database tool may connect: not to internal, loopback, link-local or metadata addresses in any
spelling (IPv4 shorthands, IPv6 mappings, full-width digits, other schemes, credentials and backslashes in the URL), not
to another host by a value put into a fixed URL, not to a private database host named in a tool's DSN (and no refusal
quotes the DSN's password); and HTTP_ALLOWED_HOSTS opening exactly what it names (a host name, not its address nor
look-alike names; a wildcard, only subdomains).
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote, unquote, urlsplit

import pytest

from botworker.tools.outbound import OutboundPolicy

from attack_kit import DENIED, FAILED, INVALID, LOCAL, SECRET, assert_nowhere, call_of, http_answer, refused
from conftest import Servers, query
from toolkit import add_secret, add_tool, ask, tcp_forwarder

pytest_plugins = ["attack_kit"]


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
