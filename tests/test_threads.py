"""Worker threads (WORKER_THREADS): each consumer thread holds at most one message in a processing list of its own,
and everything the reliable queue promises holds per thread: warm and cold stops, a SIGKILLed worker, a stuck
thread. Also the shared parts under concurrent use: one Store (its pool smaller than the threads), one Redis client.

Messages are held mid-flight with the advisory lock a worker takes before saving (``advisory_lock``): the first
thread blocks there, in the process's CPU slot, and the others wait for the slot with their message taken.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg
import pytest
import redis

from botworker import errors
from botworker.config import Config
from botworker.message import Message
from botworker.pipeline import utcnow
from botworker.queue import ERRORS, MESSAGES, PROCESSING_PREFIX, PROCESSING_SET, RESPONSES, ReliableQueue
from botworker.store import Store

from conftest import Bot, Fleet, Servers, advisory_lock, connect, events, process_env, push, query, wait_for
from gemini_server import GeminiServer, slow, text

pytest_plugins = ["gemini_server"]


def holders(r: redis.Redis) -> dict[str, str]:
    """message id -> the processing list (``...:<wid>:<pid>:<thread>``) holding it."""
    held = {}
    for name in r.scan_iter(PROCESSING_PREFIX + "*"):
        for raw in r.lrange(name, 0, -1):
            held[json.loads(raw)["messageId"]] = name
    return held


def answers(r: redis.Redis) -> Counter[str]:
    return Counter(e["messageId"] for e in events(r, RESPONSES) + events(r, ERRORS))


def rows(db: psycopg.Connection[Any], mid: str) -> int:
    return len(query(db, "SELECT id FROM chat_messages WHERE metadata->>'messageId' = %s", mid))


def status(servers: Servers) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "botworker", "status", "--env-file", ""],
        env=process_env(servers),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout


def hold(db_url: str, mids: list[str], stack: ExitStack) -> None:
    """Hold each message's save lock, each on a connection of its own (closed with the stack)."""
    for mid in mids:
        conn = stack.enter_context(connect(db_url))
        stack.enter_context(advisory_lock(conn, mid))


@contextmanager
def busy(
    start_fleet: Callable[..., Fleet], r: redis.Redis, servers: Servers, msgs: list[dict[str, Any]], threads: int = 3
) -> Iterator[tuple[Fleet, dict[str, str]]]:
    """One worker of ``threads`` threads, each holding one of ``msgs`` (held mid-flight until the block ends):
    the fleet and which processing list holds which message. One message a thread (WORKER_BATCH=1): pushed at
    once, they are a backlog, which a thread would otherwise take several of (test_batch.py)."""
    fleet = start_fleet(1, args=("--threads", str(threads)), WORKER_BATCH="1")
    with ExitStack() as stack:
        hold(servers.database_url, [m["messageId"] for m in msgs], stack)
        for msg in msgs:
            push(r, msg)
        taken = min(threads, len(msgs))
        yield fleet, wait_for(lambda: (h := holders(r)) and len(h) == taken and h, 20, "every thread busy")


def test_each_thread_holds_one_message_in_its_own_list_and_nothing_is_prefetched(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, servers: Servers, start_fleet: Callable[..., Fleet]
) -> None:
    msgs = [bot.message("list my models") for _ in range(4)]
    mids = [m["messageId"] for m in msgs]
    with busy(start_fleet, r, servers, msgs) as (fleet, held):
        assert len(set(held.values())) == 3, held  # three lists
        assert {name.rsplit(":", 1)[1] for name in held.values()} == {"0", "1", "2"}
        assert len({name.rsplit(":", 2)[1] for name in held.values()}) == 1  # of one worker process
        assert r.llen(MESSAGES) == 1  # the fourth waits in the queue: a thread takes a message only when free
        wait_for(lambda: "3/3 threads busy" in status(servers), 10, "status to show every thread busy")
        [worker] = wait_for(lambda: (n := fleet.node()) and n["workers"], 10, "the node key")
        assert [(t["processed"], t["busyFor"] > 0) for t in worker["eachThread"]] == [(0, True)] * 3
    wait_for(lambda: len(answers(r)) == 4, 30, "all four answers")
    assert answers(r) == Counter(mids) and all(rows(db, mid) == 2 for mid in mids)
    assert "3 thread(s) idle" in wait_for(lambda: (s := status(servers)) and "idle" in s and s, 10, "idle threads")
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == errors.EXIT_OK


def test_warm_stop_with_every_thread_busy_finishes_each_message(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, servers: Servers, start_fleet: Callable[..., Fleet]
) -> None:
    msgs = [bot.message(f"hello {i}") for i in range(3)]
    behind = bot.message("queued behind them")
    mids = [m["messageId"] for m in msgs]
    with busy(start_fleet, r, servers, msgs) as (fleet, _):
        push(r, behind)
        fleet.signal(signal.SIGTERM)
        wait_for(lambda: "warm stop" in fleet.log(), 10, "the warm stop to begin")
        with pytest.raises(subprocess.TimeoutExpired):
            fleet.wait(timeout=1.0)  # draining: every thread is still blocked
    assert fleet.wait() == errors.EXIT_OK, fleet.log()
    assert answers(r) == Counter(mids)  # each finished once; the one behind them was not taken
    assert all(rows(db, mid) == 2 for mid in mids)
    assert [json.loads(x)["messageId"] for x in r.lrange(MESSAGES, 0, -1)] == [behind["messageId"]]
    assert holders(r) == {} and r.smembers(PROCESSING_SET) == set()


def test_a_sigkilled_threaded_worker_has_every_threads_message_requeued_and_answered_once(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, servers: Servers, start_fleet: Callable[..., Fleet]
) -> None:
    msgs = [bot.message("list my models") for _ in range(3)]
    mids = [m["messageId"] for m in msgs]
    with busy(start_fleet, r, servers, msgs) as (fleet, held):
        [pid] = {int(name.split(":")[-2]) for name in held.values()}
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: f"(pid {pid}) killed by SIGKILL" in fleet.log(), 10, "the death to be seen")
        assert "requeued 1 in-flight message(s)" in fleet.log()
        # Back in line and taken again by the new worker's threads.
        wait_for(
            lambda: (h := holders(r)) and len(h) == 3 and all(f":{pid}:" not in n for n in h.values()), 20, "retaken"
        )
    wait_for(lambda: len(answers(r)) == 3, 30, "the three answers")
    assert answers(r) == Counter(mids) and all(rows(db, mid) == 2 for mid in mids)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == errors.EXIT_OK


def test_one_stuck_thread_gets_its_worker_replaced_and_the_message_answered_once(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, servers: Servers, start_fleet: Callable[..., Fleet]
) -> None:
    """The other thread idles and beats; the stuck one's silence is enough for the supervisor."""
    env = {"WORKER_TIMEOUT": "3", "HTTP_MAX_TIMEOUT": "1", "DB_TOOL_TIMEOUT": "1", "GEMINI_TIMEOUT": "1"}
    fleet = start_fleet(1, args=("--threads", "2"), **env)
    msg = bot.message("list my models")
    mid = msg["messageId"]
    with ExitStack() as stack:
        hold(servers.database_url, [mid], stack)
        push(r, msg)
        name = wait_for(lambda: holders(r).get(mid), 20, "a thread to take it")
        pid = int(name.split(":")[-2])
        wait_for(lambda: f"(pid {pid}) silent for" in fleet.log(), 20, "the supervisor to kill the worker")
        wait_for(lambda: (n := holders(r).get(mid)) and f":{pid}:" not in n, 20, "the message to be taken again")
    wait_for(lambda: answers(r)[mid] == 1, 20, "the answer")
    assert answers(r) == Counter([mid]) and rows(db, mid) == 2
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == errors.EXIT_OK


def test_threads_wait_on_gemini_side_by_side(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, gemini: GeminiServer, start_fleet: Callable[..., Fleet]
) -> None:
    """One worker process of 4 threads, a Gemini that takes 2 s a request: 4 requests are in progress at once (the
    4th arrives before the 1st is answered), and every message gets its own reply, once."""
    gemini.script(then=slow(text("Here you are."), 2.0))
    fleet = start_fleet(1, args=("--threads", "4"), GEMINI_KEY="test-key", GEMINI_BASE_URL=gemini.url)
    msgs = [bot.message(f"question {i}") for i in range(8)]
    for msg in msgs:
        push(r, msg)
    wait_for(lambda: len(answers(r)) == 8, 30, "eight answers")
    arrivals = sorted(request.at for request in gemini.requests)
    assert len(arrivals) == 8
    assert arrivals[3] - arrivals[0] < 2.0, arrivals  # the first four overlapped: one process, four waits
    assert answers(r) == Counter(m["messageId"] for m in msgs)
    replies = [e["botResponse"]["content"] for e in events(r, RESPONSES)]
    assert replies == ["Here you are."] * 8
    assert all(rows(db, m["messageId"]) == 2 for m in msgs)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == errors.EXIT_OK


# ---- shared parts under concurrent use -------------------------------------------------------------------------


@pytest.fixture
def shared_store(make_cfg: Callable[..., Config]) -> Iterator[Store]:
    store = Store(make_cfg(WORKER_THREADS="16", DB_POOL_SIZE="2"))
    yield store
    store.close()


def test_one_store_serves_many_threads_through_a_smaller_pool(
    shared_store: Store, db: psycopg.Connection[Any], bot: Bot
) -> None:
    """16 threads load and save 160 messages through 2 pooled connections: each exchange saved once, whole."""
    errors_seen: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(10):
                mid = str(uuid.uuid4())
                msg = Message(bot.bot_id, bot.user_id, f"thread {n} message {i}", mid, None, utcnow())
                ctx = shared_store.load_context(msg)
                shared_store.save_exchange(
                    msg, ctx.instance_id, f"reply {n}.{i}", utcnow(), 1, 1, {"messageId": mid}, {"messageId": mid}
                )
        except BaseException as exc:  # reported below
            errors_seen.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors_seen == []
    saved = query(db, """SELECT m.content, m.role FROM chat_messages m JOIN bot_instances i ON i.id = m."botInstanceId"
                         WHERE i."botId" = %s""", bot.bot_id)  # fmt: skip
    assert Counter(r["role"] for r in saved) == {"user": 160, "bot": 160}
    assert {r["content"] for r in saved if r["role"] == "bot"} == {
        f"reply {n}.{i}" for n in range(16) for i in range(10)
    }
    backends = query(db, "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'botworker'")
    assert backends[0]["n"] <= 2


def test_one_redis_client_serves_many_consumers_and_each_message_is_taken_once(r: redis.Redis) -> None:
    """12 consumer threads on one client (one pooled connection each while they wait) pop and finish 300 messages."""
    client = redis.Redis(connection_pool=r.connection_pool)
    node = f"threads-{uuid.uuid4().hex[:8]}"
    taken: list[str] = []
    lock = threading.Lock()
    for i in range(300):
        r.lpush(MESSAGES, json.dumps({"messageId": f"m{i}"}))

    def consume(n: int) -> None:
        queue = ReliableQueue(client, f"{PROCESSING_PREFIX}{node}:0:1:{n}")
        while (raw := queue.pop(0.5)) is not None:
            mid = json.loads(raw)["messageId"]
            assert r.llen(queue.processing) == 1  # one message per thread, in its own list
            assert queue.finish(raw, mid, [], "processed")
            with lock:
                taken.append(mid)

    threads = [threading.Thread(target=consume, args=(n,)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == sorted(f"m{i}" for i in range(300))
    assert r.llen(MESSAGES) == 0
