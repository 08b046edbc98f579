"""What a redirect answered to an HTTP tool can make the worker do: not follow it to an address the first URL could not
name, nor to another scheme, a URL with credentials, or a plain-text port over TLS; not carry the tool's secret header
to another origin; not loop forever; and turn a POST into a GET (or keep it) as HTTP says.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from attack_kit import DENIED, FAILED, INVALID, LOCAL, SECRET, assert_nowhere, call_of, refused
from toolkit import LocalHTTP, add_secret, add_tool, ask, start_http

pytest_plugins = ["attack_kit"]


@pytest.fixture
def web2() -> Iterator[LocalHTTP]:
    yield from start_http()


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
