#!/usr/bin/env python3
"""The floor: how fast one redis-py connection can run the reliable-queue round trips, with no database at all.

    .venv/bin/python bench/baseline_redis.py [--messages 20000] [--parallel 2]

Loops, each over --messages messages pre-filled into ``bot_messages`` (the fill is not timed):

- ``blmove+lrem``: BLMOVE bot_messages -> processing list, "process" (json.loads), LREM: 2 round trips;
- ``blmove+multi``: BLMOVE, then MULTI / LPUSH result / LREM / EXEC in one pipelined transaction: 2 round trips;
- ``botworker queue``: what a worker really sends, through ``botworker.queue.ReliableQueue``: pop (BLMOVE),
  begin (HINCRBY + EXISTS, pipelined) and finish (EVALSHA: LREM, HDEL, SET EX, HINCRBY, LPUSH + PUBLISH of a
  ~1.5 KB response event): 3 round trips, events to a bench list/channel instead of bot_responses;
- the last one again with --parallel processes, each with its own connection and processing list.

Uses REDIS_URL when set (refuses to run while a worker fleet is alive there, and deletes what it created), else
a private Redis from ``botworker.devstack``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import psutil  # noqa: E402
import redis  # noqa: E402
from throughput import machine_line  # noqa: E402

from botworker.queue import DONE_PREFIX, MESSAGES, STATS, STATUS, ReliableQueue  # noqa: E402

PROCESSING = "bot_messages:processing:bench-baseline"
RESULTS = "bot_messages:bench:results"  # not bot_responses: nobody else should see these
STAT = "bench_baseline"


@contextmanager
def redis_server() -> Iterator[tuple[str, int | None]]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"], None
        return
    from botworker.devservers import start_redis

    with tempfile.TemporaryDirectory(prefix="botworker-baseline-") as tmp:
        server = start_redis(Path(tmp))
        try:
            yield server.url, server.proc.pid
        finally:
            server.stop()


def sample_message(i: int) -> str:
    return json.dumps(
        {
            "botId": str(uuid.uuid4()),
            "userId": str(uuid.uuid4()),
            "message": f"hello {i}",
            "messageId": f"baseline-{i}",
        }
    )


# A response event of the contract's shape and typical size (two chat_messages rows).
def sample_event(raw: str) -> dict[str, object]:
    msg = json.loads(raw)
    row = {
        "id": str(uuid.uuid4()),
        "botInstanceId": str(uuid.uuid4()),
        "userId": msg["userId"],
        "role": "user",
        "content": msg["message"],
        "metadata": {"messageId": msg["messageId"]},
        "responseTime": None,
        "tokensUsed": None,
        "createdAt": "2026-01-01T00:00:00.000Z",
        "updatedAt": "2026-01-01T00:00:00.000Z",
    }
    reply = {
        **row,
        "id": str(uuid.uuid4()),
        "role": "bot",
        "content": 'I\'m Helper Bot. You said: "hello". I am running without a language model (offline mode), so I '
        'can run my tools but cannot compose free answers. Try: "list my models", "show applications".',
        "metadata": {"messageId": msg["messageId"], "model": "offline", "toolCalls": [], "tokensEstimated": True},
        "responseTime": 3,
        "tokensUsed": 60,
    }
    return {
        "instanceId": row["botInstanceId"],
        "botId": msg["botId"],
        "userId": msg["userId"],
        "messageId": msg["messageId"],
        "userMessage": row,
        "botResponse": reply,
    }


def fill(client: redis.Redis, n: int, offset: int = 0) -> None:
    for start in range(0, n, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 1000)):
            pipe.lpush(MESSAGES, sample_message(offset + i))
        pipe.execute()


def loop_lrem(client: redis.Redis, n: int, processing: str) -> None:
    for _ in range(n):
        raw = client.blmove(MESSAGES, processing, 1, "RIGHT", "LEFT")
        json.loads(raw)
        client.lrem(processing, -1, raw)


def loop_multi(client: redis.Redis, n: int, processing: str) -> None:
    for _ in range(n):
        raw = client.blmove(MESSAGES, processing, 1, "RIGHT", "LEFT")
        result = json.dumps({"ok": True, "messageId": json.loads(raw)["messageId"]})
        pipe = client.pipeline(transaction=True)
        pipe.lpush(RESULTS, result)
        pipe.lrem(processing, -1, raw)
        pipe.execute()


def loop_botworker(client: redis.Redis, n: int, processing: str) -> None:
    queue = ReliableQueue(client, processing)
    for _ in range(n):
        raw = queue.pop(1)
        msg = json.loads(raw)
        mid = msg["messageId"]
        queue.begin(mid)
        queue.finish(raw, mid, [(RESULTS, sample_event(raw))], STAT)


LOOPS: dict[str, Callable[[redis.Redis, int, str], None]] = {
    "blmove+lrem": loop_lrem,
    "blmove+multi": loop_multi,
    "botworker queue": loop_botworker,
}


def _child(url: str, name: str, n: int, processing: str, start: multiprocessing.synchronize.Event) -> None:
    client = redis.Redis.from_url(url)
    client.ping()
    start.wait()
    LOOPS[name](client, n, processing)
    client.close()


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def run(url: str, server_pid: int | None, name: str, n: int, parallel: int) -> dict[str, float]:
    client = redis.Redis.from_url(url)
    client.delete(MESSAGES, RESULTS)
    fill(client, n)
    per = n // parallel
    cpu0 = cpu_of(server_pid)
    if parallel == 1:
        t = time.perf_counter()
        c0 = time.process_time()
        LOOPS[name](client, n, PROCESSING)
        wall = time.perf_counter() - t
        client_cpu = time.process_time() - c0
    else:
        ctx = multiprocessing.get_context("fork")
        start = ctx.Event()
        procs = [ctx.Process(target=_child, args=(url, name, per, f"{PROCESSING}:{k}", start)) for k in range(parallel)]
        for p in procs:
            p.start()
        time.sleep(0.5)  # let them connect
        t = time.perf_counter()
        start.set()
        for p in procs:
            p.join()
        wall = time.perf_counter() - t
        client_cpu = float("nan")
        n = per * parallel
    server_cpu = cpu_of(server_pid) - cpu0
    left = client.llen(MESSAGES)
    client.delete(MESSAGES, RESULTS)
    client.close()
    return {
        "messages": n,
        "seconds": wall,
        "rate": n / wall,
        "us_per_msg": wall / n * 1e6,
        "client_cpu_us": client_cpu / n * 1e6 if parallel == 1 else float("nan"),
        "server_cpu_us": server_cpu / n * 1e6 if server_pid else float("nan"),
        "left": left,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--parallel", type=int, default=2, help="processes for the parallel run (0: skip)")
    args = parser.parse_args()

    print(f"machine: {machine_line()}")
    with redis_server() as (url, pid):
        client = redis.Redis.from_url(url)
        if pid is None and (client.exists(STATUS) or client.llen(MESSAGES)):
            print("refusing to run: a worker fleet is alive or bot_messages is not empty on this Redis")
            return 2
        info = client.info("server")
        print(
            f"server: {info.get('redis_version')} ({'valkey ' + info['valkey_version'] if 'valkey_version' in info else 'redis'})"
        )
        rows = []
        plan = [(name, 1) for name in LOOPS]
        if args.parallel > 1:
            plan.append(("botworker queue", args.parallel))
        for name, parallel in plan:
            label = name if parallel == 1 else f"{name} x{parallel} processes"
            print(f"running {label} over {args.messages} messages ...", flush=True)
            rows.append((label, run(url, pid, name, args.messages, parallel)))
        # Clean up what the botworker loop left: its done keys and its stats field.
        for start in range(0, args.messages, 1000):
            client.delete(*(DONE_PREFIX + f"baseline-{i}" for i in range(start, min(args.messages, start + 1000))))
        client.hdel(STATS, STAT)
        client.close()

    print(f"\n## Redis floor: {args.messages} messages per loop, one redis-py connection per process\n")
    print(
        "| loop | round trips/msg | seconds | messages/s | round trips/s | µs/msg | client CPU µs/msg "
        "| Redis CPU µs/msg |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    trips = {"blmove+lrem": 2, "blmove+multi": 2, "botworker queue": 3}
    for label, r in rows:
        k = trips[label.split(" x")[0]]
        print(
            f"| {label} | {k} | {r['seconds']:.2f} | {r['rate']:.0f} | {k * r['rate']:.0f} | {r['us_per_msg']:.0f} "
            f"| {r['client_cpu_us']:.0f} | {r['server_cpu_us']:.0f} |"
        )
        if r["left"]:
            print(f"  note: {r['left']} message(s) left in bot_messages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
