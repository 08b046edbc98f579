"""The floor: N forked processes, each a plain reliable-queue loop around the same pipeline, no library.

    python -m bench.alt.bare_loop --procs N [--sql plain|fused]     (REDIS_URL, DATABASE_URL in the environment)

Each child: BLMOVE bench_bare:queue -> bench_bare:processing:<pid> (1 s timeout, to notice SIGTERM), run
``pipeline.handle``, LREM it from its processing list. ``--sql plain`` ("bare") runs the pipeline the libraries run;
``--sql fused`` ("bare-fused") runs it with botworker's own load, lock and save statements, one message at a time:
what botworker's SQL gives without its threads and batches. The parent only forks the children and forwards
SIGTERM; nothing is opened before the fork. Producers LPUSH JSON payloads onto ``bench_bare:queue``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import redis

from . import System, delete_keys
from .pipeline import handle

QUEUE = "bench_bare:queue"
_stop = False
_producer: redis.Redis | None = None


def _on_term(signum: int, frame: object) -> None:
    global _stop
    _stop = True


def consume(sql: str) -> None:
    """One child's loop, until SIGTERM (finishing the message in hand)."""
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    processing = f"bench_bare:processing:{os.getpid()}"
    while not _stop:
        raw = client.blmove(QUEUE, processing, 1, "RIGHT", "LEFT")
        if raw is None:
            continue
        handle(json.loads(raw), sql)
        client.lrem(processing, 1, raw)


def main() -> int:
    parser = argparse.ArgumentParser(description="a bare BLMOVE loop around the bot pipeline")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--sql", choices=["plain", "fused"], default="plain")
    args = parser.parse_args()
    children = []
    for _ in range(args.procs):
        pid = os.fork()
        if pid == 0:
            try:
                consume(args.sql)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(signum: int, frame: object) -> None:
        for child in children:
            os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        _, code = os.waitpid(child, 0)
        status |= os.waitstatus_to_exitcode(code)
    return status


def enqueue(payloads: list[dict[str, Any]]) -> None:
    """LPUSH, pipelined by 100 (as the API server's side of botworker is fed in the bench)."""
    global _producer
    if _producer is None:
        _producer = redis.Redis.from_url(os.environ["REDIS_URL"])
    for start in range(0, len(payloads), 100):
        pipe = _producer.pipeline(transaction=False)
        for payload in payloads[start : start + 100]:
            pipe.lpush(QUEUE, json.dumps(payload))
        pipe.execute()


def _commands(sql: str) -> Callable[[int], list[list[str]]]:
    def commands(procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "bench.alt.bare_loop", "--procs", str(procs), "--sql", sql]]

    return commands


def clean(client: redis.Redis) -> None:
    delete_keys(client, "bench_bare:*")


SYSTEMS = [
    System(
        "bare",
        "N forked BLMOVE loops (+ an idle parent), one message at a time each",
        _commands("plain"),
        enqueue,
        clean,
    ),
    System(
        "bare-fused",
        "the same loops running botworker's load and save statements instead of the user's",
        _commands("fused"),
        enqueue,
        clean,
    ),
]

if __name__ == "__main__":
    sys.exit(main())
