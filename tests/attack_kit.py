"""Fixtures and checks shared by the tool tests and the attack sweeps (``test_tools.py``,
``test_tool_attacks.py``, ``test_attacks_round2.py``, ``test_attacks_round3.py``): in-process workers, a second platform user, a tool login without grants, and the
assertions "this call was refused, readably" and "this secret is nowhere".

A pytest plugin: a module using the fixtures declares ``pytest_plugins = ["attack_kit"]``.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

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
from toolkit import PASSPHRASE, LocalHTTP, calls_of, start_http

DENIED, INVALID, FAILED = errors.TOOL_DENIED, errors.TOOL_INVALID_PARAMS, errors.TOOL_FAILED
LOCAL = "127.0.0.1/32"  # HTTP_ALLOWED_HOSTS that lets tools reach the local test servers
GEMINI_KEY = "attack-key-Zq81Lp07"  # the workers' Gemini key: it must never leave the worker but in its header
ROLE, ROLE_PASSWORD = "botworker_attack_ro", "attack-ro-pw"  # a login with no grants at all, for DB_TOOL_URL


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
