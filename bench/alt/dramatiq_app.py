"""The bot pipeline as a Dramatiq actor: ``reply.send(payload)``, run by Dramatiq's worker processes.

    dramatiq bench.alt.dramatiq_app --processes N --threads 8

The Redis broker, Dramatiq's default middleware (age and time limits, retries, callbacks, pipelines) and its
default 8 worker threads per process (``DRAMATIQ_THREADS`` in the bench's environment changes it); each thread
opens its own PostgreSQL connection on its first message (a psycopg connection is one transaction at a time).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from . import System, delete_keys, executable
from .pipeline import handle

THREADS = int(os.environ.get("DRAMATIQ_THREADS", "8"))  # dramatiq's own default

dramatiq.set_broker(RedisBroker(url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")))


@dramatiq.actor
def reply(payload: dict[str, Any]) -> None:
    handle(payload)


def enqueue(payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        reply.send(payload)


def commands(procs: int) -> list[list[str]]:
    return [[executable("dramatiq"), "bench.alt.dramatiq_app", "--processes", str(procs), "--threads", str(THREADS)]]


def clean(client: redis.Redis) -> None:
    delete_keys(client, "dramatiq:*")


SYSTEMS = [
    System(
        "dramatiq",
        f"`dramatiq --processes N --threads {THREADS}` (+ its main process), default middleware",
        commands,
        enqueue,
        clean,
    )
]
