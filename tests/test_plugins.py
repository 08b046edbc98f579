"""Tool types are plugins: a package that declares a ``botworker.tools`` entry point adds a type, the way the
built-in families are registered. The plugin here is a real distribution on sys.path (a module and its
dist-info), found by importlib.metadata exactly as an installed package would be."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from botworker import errors
from botworker.errors import ConfigError
from botworker.queue import RESPONSES
from botworker.tools import registry

from conftest import Bot, Fleet, events, push, query, wait_for
from toolkit import add_tool

BUILTIN_TYPES = {
    "mcp_tool",
    "http_request",
    "database_query",
    "shell_command",
    "custom_script",
    "file_operation",
    "workflow_action",
}


def install(root: Path, name: str, source: str, entry_points: str) -> Path:
    """Write a module and its dist-info under ``root`` (what `pip install` leaves in site-packages)."""
    root.mkdir(exist_ok=True)
    (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[botworker.tools]\n" + textwrap.dedent(entry_points))
    return root


ECHO = """
    TYPES = ("acme_echo",)

    def run(call, tool, ctx):
        return {"echo": call.params, "user": ctx.user_id, "prefix": tool["config"].get("prefix")}
"""


def test_builtin_families_come_from_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group=registry.GROUP)}
    assert set(registry.BUILTIN.values()) <= names
    assert set(registry.load()) == BUILTIN_TYPES


def test_a_plugin_adds_a_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(install(tmp_path / "site", "acme_tools", ECHO, "acme = acme_tools\n")))
    families = registry.load()
    assert set(families) == BUILTIN_TYPES | {"acme_echo"}
    assert families["acme_echo"].run.__module__ == "acme_tools"


@pytest.mark.parametrize(
    ("source", "entry", "message"),
    [
        (ECHO.replace("acme_echo", "http_request"), "acme = acme_dup\n", "registered twice"),
        ("raise RuntimeError('boom')\n", "acme = acme_dup\n", "cannot be loaded: RuntimeError: boom"),
        ("TYPES = 'acme'\ndef run(call, tool, ctx): pass\n", "acme = acme_dup\n", "must define TYPES"),
        ("TYPES = ('acme',)\n", "acme = acme_dup\n", "must define TYPES"),
    ],
)
def test_broken_plugins_are_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, entry: str, message: str
) -> None:
    monkeypatch.syspath_prepend(str(install(tmp_path / "site", "acme_dup", source, entry)))
    monkeypatch.delitem(sys.modules, "acme_dup", raising=False)
    with pytest.raises(ConfigError, match=message):
        registry.load()


def test_plugin_tool_runs_from_a_real_message(
    tmp_path: Path,
    r: redis.Redis,
    db: psycopg.Connection[Any],
    bot: Bot,
    start_fleet: Callable[..., Fleet],
) -> None:
    site = install(tmp_path / "site", "acme_tools", ECHO, "acme = acme_tools\n")
    # The platform's enum lists the types it knows; a deployment adding a type adds it there too.
    query(db, "ALTER TYPE bot_tools_type_enum ADD VALUE IF NOT EXISTS 'acme_echo'")
    add_tool(db, bot, "shout", "acme_echo", {"prefix": ">>"})
    fleet = start_fleet(1, PYTHONPATH=str(site))
    assert "acme_echo" in fleet.log()
    push(r, bot.message('use shout "hello"'))
    [event] = wait_for(lambda: events(r, RESPONSES), what="a reply")
    [call] = event["botResponse"]["metadata"]["toolCalls"]
    assert call["ok"] and call["type"] == "acme_echo"
    assert call["result"] == {"echo": {"param1": "hello"}, "user": bot.user_id, "prefix": ">>"}
    assert json.dumps(call["result"]) in json.dumps(event)


def test_broken_plugin_stops_the_fleet_at_start(tmp_path: Path, start_fleet: Callable[..., Fleet]) -> None:
    site = install(tmp_path / "site", "acme_bad", "import nothing_here\n", "bad = acme_bad\n")
    fleet = start_fleet(1, wait=False, PYTHONPATH=str(site))
    assert fleet.wait(30) == errors.EXIT_CONFIG
    assert "tool plugin bad = acme_bad cannot be loaded" in fleet.log()
