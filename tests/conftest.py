"""Shared fixtures: real Redis and PostgreSQL for the whole session, a fresh bot per test, a worker fleet on demand.

The servers are the ones named by REDIS_URL and DATABASE_URL when both are set (the tests FLUSH that Redis
database), otherwise throwaway ones that ``botworker.devstack`` starts in a temp dir on free ports.
Each test gets an empty Redis database and its own user and bot rows (random ids), so tests do not see each
other's data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.rows import dict_row
from psycopg.types.string import TextLoader

from botworker.config import Config, load_config
from botworker.demo import seed
from botworker.queue import ERRORS, MESSAGES, NODE_PREFIX, PROCESSING_PREFIX, RESPONSES
from botworker.schema import migrate

ROOT = Path(__file__).resolve().parent.parent

# Helper modules whose asserts are the tests' checks: rewritten like test modules' (detailed failure messages).
pytest.register_assert_rewrite("attack_kit", "toolkit")

# One sandbox state directory for the whole run (per-run work dirs and bots' files live under it).
SANDBOX_ROOT = tempfile.mkdtemp(prefix="botworker-sandbox-")
os.chmod(SANDBOX_ROOT, 0o755)

# Settings that make process tests quick: short waits, fast respawns.
FAST = {
    "SANDBOX_ROOT": SANDBOX_ROOT,
    "POP_TIMEOUT": "0.2",
    "RETRY_DELAY": "0.05",
    "LLM_RETRY_DELAY": "0.05",
    "BOOT_TIMEOUT": "5",
    "GRACEFUL_TIMEOUT": "10",
    "NODE_TTL": "5",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture(scope="session", autouse=True)
def _remove_sandbox_root() -> Iterator[None]:
    yield
    shutil.rmtree(SANDBOX_ROOT, ignore_errors=True)


@dataclass(frozen=True)
class Servers:
    redis_url: str
    database_url: str


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    if os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL"):
        found = Servers(os.environ["REDIS_URL"], os.environ["DATABASE_URL"])
        migrate(found.database_url)
        yield found
        return
    from botworker.devstack import DevStack

    with DevStack() as stack:
        migrate(stack.database_url)
        yield Servers(stack.redis_url, stack.database_url)


@pytest.fixture
def r(servers: Servers) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def db(servers: Servers) -> Iterator[psycopg.Connection[Any]]:
    """The tests' own connection: autocommit, values quoted into the text by the client (so DDL and SET can take
    them), uuids read as text as the events and Redis carry them."""
    with connect(servers.database_url) as conn:
        yield conn


def connect(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor)
    conn.adapters.register_loader("uuid", TextLoader)
    return conn


def query(conn: psycopg.Connection[Any], sql: str, *args: Any) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, args)
        return [dict(row) for row in cur.fetchall()] if cur.description else []


@dataclass(frozen=True)
class Bot:
    user_id: str
    bot_id: str
    tool_id: str

    def message(self, text: str, **extra: Any) -> dict[str, Any]:
        return {"botId": self.bot_id, "userId": self.user_id, "message": text, "messageId": str(uuid.uuid4()), **extra}


@pytest.fixture
def bot(servers: Servers) -> Bot:
    """A fresh user with models and applications, and a bot with a prompt and a platform tool."""
    user_id, bot_id = seed(servers.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    tool_id = str(uuid.uuid5(uuid.UUID(bot_id), "tool"))
    return Bot(user_id, bot_id, tool_id)


@pytest.fixture
def make_cfg(servers: Servers) -> Callable[..., Config]:
    def make(**env: str) -> Config:
        return load_config(
            environ={"REDIS_URL": servers.redis_url, "DATABASE_URL": servers.database_url, **FAST, **env}, env_file=None
        )

    return make


def push(client: redis.Redis, payload: dict[str, Any] | str) -> None:
    client.lpush(MESSAGES, payload if isinstance(payload, str) else json.dumps(payload))


def events(client: redis.Redis, key: str) -> list[dict[str, Any]]:
    """Every event on a result list, oldest first (consumers pop from the right)."""
    return [json.loads(x) for x in reversed(client.lrange(key, 0, -1))]


def all_events(client: redis.Redis) -> list[dict[str, Any]]:
    """Every bot_responses event, then every bot_errors event, each oldest first."""
    return events(client, RESPONSES) + events(client, ERRORS)


def in_flight(client: redis.Redis) -> int:
    """Messages held in all processing lists right now."""
    return sum(client.llen(name) for name in client.scan_iter(PROCESSING_PREFIX + "*"))


def live_children(pid: int) -> list[int]:
    """Pids of the live (not zombie) child processes of ``pid``, read from /proc: never stale, unlike the node key."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process went away meanwhile
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (children, their children...), parents before their children."""
    found, frontier = [], [pid]
    while frontier:
        children = [child for parent in frontier for child in live_children(parent)]
        found += children
        frontier = children
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


class Fleet:
    """A real `python -m botworker run` process and helpers to look at it."""

    def __init__(self, proc: subprocess.Popen[str], client: redis.Redis, log_path: Path) -> None:
        self.proc = proc
        self.client = client
        self.log_path = log_path

    def node(self) -> dict[str, Any] | None:
        for key in self.client.scan_iter(NODE_PREFIX + "*"):
            value = self.client.get(key)
            if value and json.loads(value)["pid"] == self.proc.pid:
                return json.loads(value)
        return None

    def worker_pids(self) -> list[int]:
        node = self.node()
        return [w["pid"] for w in node["workers"] if not w["retiring"]] if node else []

    def wait_workers(self, n: int, timeout: float = 20.0) -> list[int]:
        """Wait until the node reports exactly n live workers whose processing lists are registered."""

        def ready() -> list[int] | None:
            pids = self.worker_pids()
            if len(pids) != n:
                return None
            lists = self.client.smembers("bot_worker:processing")
            return pids if all(any(f":{pid}:" in name for name in lists) for pid in pids) else None

        return wait_for(ready, timeout, f"{n} ready workers")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def process_env(servers: Servers, **env: str) -> dict[str, str]:
    """The environment of a botworker process under test: the test servers, fast settings, this checkout."""
    return {
        **os.environ,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        **FAST,
        **env,
        "PYTHONPATH": os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p),
    }


@pytest.fixture
def spawn(servers: Servers, r: redis.Redis, tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    """Start any command line as a fleet (stderr to a log file); stopped (SIGQUIT, then SIGKILL) at teardown."""
    started: list[Fleet] = []

    def start(argv: list[str], **env: str) -> Fleet:
        log_path = tmp_path / f"fleet-{len(started)}.log"
        with log_path.open("w") as log_file:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                argv,
                env=process_env(servers, **env),
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                text=True,
                cwd=str(ROOT),
            )
        fleet = Fleet(proc, r, log_path)
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        if fleet.proc.poll() is None:
            fleet.proc.send_signal(signal.SIGQUIT)
            try:
                fleet.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                fleet.proc.kill()
                fleet.proc.wait()


@pytest.fixture
def start_fleet(spawn: Callable[..., Fleet]) -> Callable[..., Fleet]:
    """`python -m botworker run --procs N` with fast settings (plus **env); waits for N ready workers."""

    def start(procs: int = 2, wait: bool = True, args: tuple[str, ...] = (), **env: str) -> Fleet:
        argv = [sys.executable, "-m", "botworker", "run", "--procs", str(procs), "--env-file", "", *args]
        fleet = spawn(argv, **env)
        if wait:
            fleet.wait_workers(procs)
        return fleet

    return start


@contextmanager
def advisory_lock(conn: psycopg.Connection[Any], message_id: str) -> Iterator[None]:
    """Hold the lock a worker takes before saving this message: the worker blocks there, mid-message."""
    query(conn, "SELECT pg_advisory_lock(hashtextextended(%s, 0))", "botworker:" + message_id)
    try:
        yield
    finally:
        query(conn, "SELECT pg_advisory_unlock(hashtextextended(%s, 0))", "botworker:" + message_id)
