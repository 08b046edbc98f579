"""Chaos tests: many messages through a real fleet while workers are SIGKILLed at random, and hostile payloads.

What must hold whatever happens: every message ends in exactly one event, every answered message has exactly its
2 rows in `chat_messages`, and nothing is left behind in the queue's lists.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import redis

from botworker import errors
from botworker.demo import seed
from botworker.queue import DEAD, ERRORS, MESSAGES, PROCESSING_PREFIX, PROCESSING_SET, RESPONSES

from conftest import Bot, Fleet, Servers, all_events, events, in_flight, live_children, push, query, wait_for

pytestmark = pytest.mark.slow


def busy_pids(r: redis.Redis) -> list[int]:
    """Pids of the workers with a processing list (``...:<wid>:<pid>:<thread>``) holding a message right now."""
    return [int(name.split(":")[-2]) for name in r.scan_iter(PROCESSING_PREFIX + "*") if r.llen(name)]


@pytest.mark.parametrize("procs,threads", [(4, 1), (2, 3)], ids=["4x1", "2x3"])
def test_burst_under_random_sigkills_answers_every_message_exactly_once(
    r: redis.Redis, db: psycopg.Connection[Any], bot: Bot, start_fleet: Callable[..., Fleet], procs: int, threads: int
) -> None:
    """300 messages (tool and plain, a fifth without messageId) go through the workers (processes x threads) while
    a random worker is SIGKILLed every 0.3 s: every message gets exactly one bot_responses event and exactly its 2
    rows, nothing is duplicated, dead-lettered or left in bot_messages/processing lists, and the fleet is whole
    again. With threads, a kill takes every message its threads hold."""
    fleet = start_fleet(procs, args=("--threads", str(threads)), MAX_ATTEMPTS="10")
    run = uuid.uuid4().hex[:8]
    sent: list[dict[str, Any]] = []
    for i in range(300):
        text = f"list my models ({run} #{i})" if i % 3 == 0 else f"hello from chaos run {run}, message #{i}"
        msg: dict[str, Any] = {"botId": bot.bot_id, "userId": bot.user_id, "message": text}
        if i % 5 != 4:
            msg["messageId"] = str(uuid.uuid4())
        sent.append(msg)

    kills: list[int] = []
    mid_message: list[int] = []
    stop = threading.Event()

    def chaos() -> None:
        """Every ~0.3 s: push the next slice of the burst, then SIGKILL a random worker, preferring one that holds
        a message (the whole burst takes well under a second to process, so it is fed in slices to overlap)."""
        rng = random.Random(run)
        slices = [sent[i : i + 25] for i in range(0, len(sent), 25)]
        end = time.monotonic() + 4.5
        while (slices or time.monotonic() < end) and not stop.is_set():
            if slices:
                pipe = r.pipeline(transaction=False)
                for msg in slices.pop(0):
                    pipe.lpush(MESSAGES, json.dumps(msg))
                pipe.execute()
            time.sleep(rng.uniform(0.0, 0.01))
            alive = live_children(fleet.proc.pid)
            busy = [pid for pid in busy_pids(r) if pid in alive]
            if alive:
                victim = rng.choice(busy or alive)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                    if busy:
                        mid_message.append(victim)
                except ProcessLookupError:
                    pass
            stop.wait(rng.uniform(0.2, 0.4))

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        thread.join(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=5)

    def settled() -> bool:
        return len(all_events(r)) >= len(sent) and r.llen(MESSAGES) == 0 and in_flight(r) == 0

    wait_for(settled, 90, "every message to be settled")
    fleet.wait_workers(procs, timeout=60)
    log = fleet.log()
    stats = r.hgetall("bot_worker:stats")
    print(f"killed {len(kills)} workers, {len(mid_message)} busy; {log.count('requeued')} requeues; {stats}")
    assert len(kills) >= 5
    assert log.count("requeued") >= 3, "few kills hit a worker mid-message: the test did not exercise recovery"

    responses, errs = events(r, RESPONSES), events(r, ERRORS)
    assert errs == [], errs[:3]
    assert r.llen(DEAD) == 0
    assert len(responses) == len(sent)
    ids = [e["messageId"] for e in responses]
    assert len(set(ids)) == len(ids), "duplicate bot_responses events"
    by_text = {e["userMessage"]["content"]: e for e in responses}
    assert set(by_text) == {m["message"] for m in sent}
    for msg in sent:
        event = by_text[msg["message"]]
        if "messageId" in msg:
            assert event["messageId"] == msg["messageId"]
        assert event["userMessage"]["metadata"]["messageId"] == event["messageId"]

    rows = query(
        db,
        """SELECT metadata->>'messageId' AS mid, role, content FROM chat_messages
           WHERE "userId" = %s""",
        bot.user_id,
    )
    assert len(rows) == 2 * len(sent)
    per_id = Counter(row["mid"] for row in rows)
    assert set(per_id) == set(ids)
    assert set(per_id.values()) == {2}
    roles = Counter((row["mid"], row["role"]) for row in rows)
    assert set(roles.values()) == {1}
    user_texts = sorted(row["content"] for row in rows if row["role"] == "user")
    assert user_texts == sorted(m["message"] for m in sent)

    assert r.llen(MESSAGES) == 0
    assert all(r.llen(name) == 0 for name in r.smembers(PROCESSING_SET))
    assert fleet.proc.poll() is None


def test_malformed_messages_get_one_error_each_and_good_ones_are_answered(
    r: redis.Redis,
    db: psycopg.Connection[Any],
    bot: Bot,
    servers: Servers,
    start_fleet: Callable[..., Fleet],
) -> None:
    """Hostile payloads interleaved with good messages: each bad one gets exactly one bot_errors event with its
    contract code (matched by messageId where it has a usable one, by count of codes otherwise), no reply and no
    row; every good message is answered; no worker dies."""
    fleet = start_fleet(2, MAX_MESSAGE_BYTES="200")
    pids = sorted(fleet.wait_workers(2))
    other_user, inactive_bot = seed(servers.database_url, str(uuid.uuid4()), str(uuid.uuid4()))
    query(db, """UPDATE bots SET "isActive" = false WHERE id = %s""", inactive_bot)

    def mid() -> str:
        return str(uuid.uuid4())

    good = {"botId": bot.bot_id, "userId": bot.user_id, "message": "hello"}
    # (payload with a usable messageId, expected code)
    by_id: list[tuple[dict[str, Any], str]] = [
        ({"userId": bot.user_id, "message": "hi", "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "botId": "not-a-uuid", "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "botId": 12345, "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "userId": 67890, "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "userId": None, "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "message": "", "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "message": "   \n\t", "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "message": 5, "messageId": mid()}, errors.INVALID_MESSAGE),
        ({"botId": bot.bot_id, "userId": bot.user_id, "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "message": "nul \x00 inside", "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "instanceId": "nope", "messageId": mid()}, errors.INVALID_MESSAGE),
        ({**good, "message": "x" * 201, "messageId": mid()}, errors.MESSAGE_TOO_LONG),
        ({**good, "message": "é" * 101, "messageId": mid()}, errors.MESSAGE_TOO_LONG),  # 101 chars, 202 bytes
        ({**good, "botId": str(uuid.uuid4()), "messageId": mid()}, errors.BOT_NOT_FOUND),
        ({**good, "userId": str(uuid.uuid4()), "messageId": mid()}, errors.BOT_NOT_FOUND),
        ({**good, "botId": inactive_bot, "messageId": mid()}, errors.BOT_NOT_FOUND),  # another user's bot
        ({**good, "botId": inactive_bot, "userId": other_user, "messageId": mid()}, errors.BOT_INACTIVE),
        ({**good, "instanceId": str(uuid.uuid4()), "messageId": mid()}, errors.INSTANCE_NOT_FOUND),
    ]
    # (raw payload without a usable messageId, expected code): their events carry an id the worker assigned.
    anonymous: list[tuple[str | bytes, str]] = [
        ("not json at all", errors.INVALID_JSON),
        ("", errors.INVALID_JSON),
        ("[1, 2, 3]", errors.INVALID_JSON),
        ('"just a string"', errors.INVALID_JSON),
        ("42", errors.INVALID_JSON),
        ("null", errors.INVALID_JSON),
        ('{"botId": ', errors.INVALID_JSON),
        (b"\xff\xfe\x00garbage", errors.INVALID_JSON),
        (json.dumps({**good, "messageId": ""}), errors.INVALID_MESSAGE),
        (json.dumps({**good, "messageId": "m" * 201}), errors.INVALID_MESSAGE),
        (json.dumps({**good, "messageId": True}), errors.INVALID_MESSAGE),
        (json.dumps({**good, "messageId": {"a": 1}}), errors.INVALID_MESSAGE),
        (json.dumps({}), errors.INVALID_MESSAGE),
        (json.dumps({**good, "message": "x" * 20000}), errors.MESSAGE_TOO_LONG),  # refused before or after parsing
    ]
    number_id = random.randint(10**9, 10**10)
    goods = [{**good, "message": f"list my models {i}", "messageId": mid()} for i in range(10)]
    goods.append({**good, "message": "hello with a numeric id", "messageId": number_id})
    good_ids = [str(m["messageId"]) for m in goods]

    bad_raw: list[str | bytes] = [json.dumps(p) for p, _ in by_id] + [raw for raw, _ in anonymous]
    random.Random(7).shuffle(bad_raw)
    pending_goods = list(goods)
    for i, raw in enumerate(bad_raw):
        r.lpush(MESSAGES, raw)
        if i % 3 == 2 and pending_goods:
            push(r, pending_goods.pop(0))
    for msg in pending_goods:
        push(r, msg)
    total = len(bad_raw) + len(goods)

    wait_for(lambda: len(all_events(r)) >= total and r.llen(MESSAGES) == 0 and in_flight(r) == 0, 30, "all events")
    responses, errs = events(r, RESPONSES), events(r, ERRORS)
    assert all(e["messageId"] for e in errs), "an error event without messageId"

    assert sorted(e["messageId"] for e in responses) == sorted(good_ids)
    assert [e for e in errs if e["messageId"] in good_ids] == []

    errs_by_id = {}
    for event in errs:
        assert event["messageId"] not in errs_by_id, f"two error events for {event['messageId']}"
        errs_by_id[event["messageId"]] = event
    for payload, code in by_id:
        event = errs_by_id.pop(payload["messageId"], None)
        assert event is not None, f"no error event for {payload!r}"
        assert event["code"] == code, (payload, event)
        assert event["error"]
    assert Counter(e["code"] for e in errs_by_id.values()) == Counter(code for _, code in anonymous)

    bad_ids = [p["messageId"] for p, _ in by_id] + list(errs_by_id)
    assert query(db, "SELECT id FROM chat_messages WHERE metadata->>'messageId' = ANY(%s)", bad_ids) == []
    assert r.llen(DEAD) == 0
    assert fleet.proc.poll() is None
    assert sorted(fleet.worker_pids()) == pids
    assert "killed by" not in fleet.log() and "exited with status" not in fleet.log()
