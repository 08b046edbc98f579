"""Unit tests of ``botworker.tools.access.denial``: who may run a tool (the bot's owner, an active tool, an active user
for a requiresAuth tool, the listed roles, whichever way each is written) and the order the checks are made in.
"""

from __future__ import annotations

from typing import Any

import pytest

from botworker.tools.access import denial

from toolkit import ACTIVE_USER, BOT, OWNER


@pytest.mark.parametrize(
    ("tool", "bot", "user", "user_id", "expected"),
    [
        # allowed
        ({"name": "t"}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "isActive": True}, BOT, {"id": OWNER}, OWNER, None),
        ({"name": "t", "isActive": None}, BOT, {}, OWNER, None),  # only an explicit False is inactive
        ({"name": "t", "requiresAuth": True}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"requiresAuth": True}}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"requiresAuth": "no"}}, BOT, {"id": OWNER}, OWNER, None),  # a falsy spelling
        ({"name": "t", "requiresAuth": False}, BOT, {"id": OWNER, "isActive": False}, OWNER, None),
        ({"name": "t", "config": {"roles": ["admin", "user"]}}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"roles": "user"}}, BOT, ACTIVE_USER, OWNER, None),
        ({"name": "t", "config": {"roles": ["1"]}}, BOT, {"id": OWNER, "role": 1}, OWNER, None),  # compared as text
        ({"name": "t", "config": "not a dict"}, BOT, ACTIVE_USER, OWNER, None),
        # owner mismatch
        ({"name": "t"}, {"userId": "someone-else"}, ACTIVE_USER, OWNER, "t runs only for the owner of this bot"),
        ({"name": "t"}, {}, ACTIVE_USER, OWNER, "t runs only for the owner of this bot"),
        ({"name": "t"}, BOT, {"id": "someone-else"}, OWNER, "t runs only for the owner of this bot"),
        ({"displayName": "Weather", "name": "w"}, BOT, ACTIVE_USER, "other", "Weather runs only for the owner"),
        ({}, BOT, ACTIVE_USER, "other", "this tool runs only for the owner"),
        # inactive tool
        ({"name": "t", "isActive": False}, BOT, ACTIVE_USER, OWNER, "t is not active"),
        # requiresAuth: the column (truthy) or the config key (True), needs isActive True
        ({"name": "t", "requiresAuth": True}, BOT, {"id": OWNER}, OWNER, "requires an authenticated, active user"),
        ({"name": "t", "requiresAuth": True}, BOT, {"id": OWNER, "isActive": False}, OWNER, "requires an authent"),
        ({"name": "t", "requiresAuth": True}, BOT, {"id": OWNER, "isActive": "true"}, OWNER, "requires an authent"),
        ({"name": "t", "requiresAuth": 1}, BOT, {"id": OWNER, "isActive": None}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": True}}, BOT, {"id": OWNER}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": "yes"}}, BOT, {"id": OWNER}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": 1}}, BOT, {"id": OWNER}, OWNER, "requires an authent"),
        ({"name": "t", "config": {"requiresAuth": True}}, BOT, {"isActive": False}, OWNER, "requires an authent"),
        # roles
        ({"name": "t", "config": {"roles": ["admin"]}}, BOT, ACTIVE_USER, OWNER, "limited to the role(s) admin"),
        ({"name": "t", "config": {"roles": ["admin"]}}, BOT, ACTIVE_USER, OWNER, "your role is 'user'"),
        ({"name": "t", "config": {"roles": "admin"}}, BOT, ACTIVE_USER, OWNER, "limited to the role(s) admin;"),
        ({"name": "t", "config": {"roles": ["a", "b"]}}, BOT, {"id": OWNER}, OWNER, "role(s) a, b; your role is None"),
        ({"name": "t", "config": {"roles": []}}, BOT, ACTIVE_USER, OWNER, "limited to the role(s) (none)"),
    ],
)
def test_denial(
    tool: dict[str, Any], bot: dict[str, Any], user: dict[str, Any], user_id: str, expected: str | None
) -> None:
    got = denial(tool, bot, user, user_id)
    if expected is None:
        assert got is None
    else:
        assert got is not None and expected in got, got


def test_denial_checks_in_order_owner_first() -> None:
    tool = {"name": "t", "isActive": False, "requiresAuth": True, "config": {"roles": ["admin"]}}
    assert denial(tool, {"userId": "x"}, {}, OWNER) == "t runs only for the owner of this bot"
    assert denial(tool, BOT, {}, OWNER) == "t is not active"
    assert "requires" in (denial({**tool, "isActive": True}, BOT, {}, OWNER) or "")
