"""Server outages ridden out by a real fleet, against servers this test starts and stops itself (a PostgreSQL
cluster, a Redis with its append-only file): a worker respawned while PostgreSQL is down waits for it instead of
stopping the fleet, and a warm stop during a Redis outage settles the message in hand once Redis is back.
Nothing is lost or done twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from botworker.demo import seed
from botworker.devservers import Server, start_postgres, start_redis
from botworker.queue import ERRORS, RESPONSES
from botworker.schema import migrate

from conftest import Bot, Fleet, advisory_lock, events, push, query, wait_for


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="botworker-outage-"))
    path.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def postgres(workdir: Path) -> Iterator[Server]:
    server = start_postgres(workdir)
    migrate(server.url)
    yield server
    server.stop()


@pytest.fixture
def redis_aof(workdir: Path) -> Iterator[Server]:
    server = start_redis(workdir, appendonly=True)
    yield server
    server.stop()


def _rows(database_url: str, message_id: str) -> int:
    with psycopg.connect(database_url) as conn:
        found = conn.execute(
            "SELECT count(*) FROM chat_messages WHERE metadata->>'messageId' = %s", (message_id,)
        ).fetchone()
    return int(found[0]) if found else 0


def _replies(client: redis.Redis, message_id: str) -> list[dict[str, Any]]:
    return [e for e in events(client, RESPONSES) if e.get("messageId") == message_id]


def test_a_worker_respawned_while_postgres_is_down_waits_instead_of_stopping_the_fleet(
    spawn: Callable[..., Fleet], r: redis.Redis, postgres: Server
) -> None:
    user_id, bot_id = seed(postgres.url, str(uuid.uuid4()), str(uuid.uuid4()))
    bot = Bot(user_id, bot_id, "")
    r.delete(RESPONSES, ERRORS)
    argv = [sys.executable, "-m", "botworker", "run", "--procs", "2", "--env-file", ""]
    fleet = spawn(argv, DATABASE_URL=postgres.url, BOOT_TIMEOUT="2")
    first, second = fleet.wait_workers(2)
    before = bot.message("hello before the outage")
    push(r, before)
    wait_for(lambda: _replies(r, before["messageId"]), 20, "the reply before the outage")

    postgres.stop()
    os.kill(first, signal.SIGKILL)
    # The respawned worker cannot reach PostgreSQL; at the first boot that would stop the node after BOOT_TIMEOUT.
    wait_for(lambda: "waiting for Redis/PostgreSQL" in fleet.log(), 20, "the respawned worker waiting")
    during = bot.message("hello during the outage")
    push(r, during)
    time.sleep(2 + 2)  # BOOT_TIMEOUT, and then some
    assert fleet.proc.poll() is None, fleet.log()[-3000:]
    assert not _replies(r, during["messageId"])

    postgres.start_again()
    wait_for(lambda: _replies(r, during["messageId"]), 30, "the reply once PostgreSQL is back")
    assert len(fleet.wait_workers(2)) == 2 and second in fleet.worker_pids()
    assert events(r, ERRORS) == [] and len(_replies(r, during["messageId"])) == 1
    assert _rows(postgres.url, during["messageId"]) == 2 and _rows(postgres.url, before["messageId"]) == 2
    assert "could not boot" not in fleet.log()
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == 0


def test_a_warm_stop_during_a_redis_outage_settles_the_message_when_redis_is_back(
    spawn: Callable[..., Fleet], db: psycopg.Connection[Any], bot: Bot, redis_aof: Server, servers: Any
) -> None:
    client = redis.Redis.from_url(redis_aof.url, decode_responses=True)
    argv = [sys.executable, "-m", "botworker", "run", "--procs", "1", "--env-file", ""]
    fleet = spawn(argv, REDIS_URL=redis_aof.url, WORKER_THREADS="1", WORKER_BATCH="1")
    fleet.client = client  # the node keys live in this Redis
    fleet.wait_workers(1)
    message = bot.message("hello through a Redis outage")
    with advisory_lock(db, message["messageId"]):  # the worker stops at its save, message in hand
        push(client, message)
        wait_for(lambda: query(db, "SELECT 1 AS x FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"), 20,
                 "the worker waiting at its save")  # fmt: skip
        time.sleep(1.2)  # the append-only file is fsynced every second: the processing list is on disk
        redis_aof.proc.kill()  # a crash, not a clean shutdown
        redis_aof.proc.wait()
        fleet.signal(signal.SIGTERM)  # warm stop while Redis is down
        time.sleep(0.5)
    # The save goes through; settling the message needs Redis, which is still down
    wait_for(lambda: _rows(servers.database_url, message["messageId"]) == 2, 20, "the reply saved")
    time.sleep(2)
    assert fleet.proc.poll() is None, fleet.log()[-3000:]  # still finishing its message
    redis_aof.start_again()
    client = redis.Redis.from_url(redis_aof.url, decode_responses=True)
    assert fleet.wait(30) == 0, fleet.log()[-3000:]
    assert len(_replies(client, message["messageId"])) == 1 and events(client, ERRORS) == []
    leftovers = [k for k in client.smembers("bot_worker:processing") if client.llen(k)]
    assert leftovers == [] and client.llen("bot_messages") == 0
    assert _rows(servers.database_url, message["messageId"]) == 2


def test_a_warm_stop_during_a_redis_outage_requeues_a_dead_workers_message_when_redis_is_back(
    spawn: Callable[..., Fleet], db: psycopg.Connection[Any], bot: Bot, redis_aof: Server
) -> None:
    """The worker holding the message dies while Redis is down, so the supervisor cannot requeue its list at once;
    it keeps trying through the stop's grace period instead of leaving the message for another host's recovery."""
    client = redis.Redis.from_url(redis_aof.url, decode_responses=True)
    argv = [sys.executable, "-m", "botworker", "run", "--procs", "1", "--env-file", ""]
    fleet = spawn(argv, REDIS_URL=redis_aof.url, WORKER_THREADS="1", WORKER_BATCH="1")
    fleet.client = client
    [worker] = fleet.wait_workers(1)
    message = bot.message("hello to a worker that dies")
    with advisory_lock(db, message["messageId"]):
        push(client, message)
        wait_for(lambda: query(db, "SELECT 1 AS x FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"), 20,
                 "the worker waiting at its save")  # fmt: skip
        time.sleep(1.2)  # on disk (appendfsync everysec)
        redis_aof.proc.kill()
        redis_aof.proc.wait()
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "killed by SIGKILL" in fleet.log(), 20, "the supervisor reaping the worker")
        fleet.signal(signal.SIGTERM)
    time.sleep(2)
    assert fleet.proc.poll() is None, fleet.log()[-3000:]  # waiting for Redis to requeue the message
    redis_aof.start_again()
    client = redis.Redis.from_url(redis_aof.url, decode_responses=True)
    assert fleet.wait(30) == 0, fleet.log()[-3000:]
    assert [json.loads(raw)["messageId"] for raw in client.lrange("bot_messages", 0, -1)] == [message["messageId"]]
    assert [k for k in client.smembers("bot_worker:processing") if client.llen(k)] == []


def test_a_message_whose_ack_redis_forgot_is_taken_again_though_no_thread_saw_an_error(
    spawn: Callable[..., Fleet], db: psycopg.Connection[Any], bot: Bot, redis_aof: Server
) -> None:
    """Redis came back without its last writes: an ack lost, so a message is back in a live thread's own list. The
    thread never sees an error (redis-py replaces a broken pooled connection silently at its next use), yet the
    message must not wait there until the worker exits: a connection made anew makes each consumer reclaim its
    list before its next pop."""
    client = redis.Redis.from_url(redis_aof.url, decode_responses=True)
    argv = [sys.executable, "-m", "botworker", "run", "--procs", "1", "--env-file", ""]
    fleet = spawn(argv, REDIS_URL=redis_aof.url, WORKER_THREADS="1", WORKER_BATCH="1")
    fleet.client = client
    fleet.wait_workers(1)
    [processing] = client.smembers("bot_worker:processing")
    forgotten = bot.message("an answer whose ack Redis forgot")
    held = bot.message("hello while Redis restarts")
    with advisory_lock(db, held["messageId"]):  # the thread waits at its save, using no Redis connection
        push(client, held)
        wait_for(lambda: query(db, "SELECT 1 AS x FROM pg_locks WHERE NOT granted AND locktype = 'advisory'"), 20,
                 "the worker waiting at its save")  # fmt: skip
        client.lpush(processing, json.dumps(forgotten))  # what a restored file holds when the ack never reached it
        time.sleep(1.2)  # (fsynced every second)
        redis_aof.proc.kill()
        redis_aof.proc.wait()
        redis_aof.start_again()
        client = redis.Redis.from_url(redis_aof.url, decode_responses=True)
        assert client.llen(processing) == 2
    wait_for(lambda: len(_replies(client, forgotten["messageId"])) == 1, 20, "the forgotten message answered")
    assert len(_replies(client, held["messageId"])) == 1 and events(client, ERRORS) == []
    assert client.llen(processing) == 0
