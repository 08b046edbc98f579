"""Which secret a tool gets and how it is handed over: only an active secret of the bot's owner, named by a well-formed
id (not another user's, an inactive or missing one, an id spelled otherwise, a list or an object); a value that cannot
go into a header is refused; a shell tool's secret goes into an environment variable whose name cannot change how
programs run.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from attack_kit import FAILED, INVALID, LOCAL, SECRET, assert_nowhere, refused
from toolkit import add_secret, add_tool, ask

pytest_plugins = ["attack_kit"]


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
