"""The bot pipeline as a Celery task: ``reply.delay(payload)``, run by Celery's prefork pool.

    celery -A bench.alt.celery_app worker --pool prefork --concurrency N --loglevel WARNING

Redis as the broker (kombu's redis transport), no result backend (Celery's default: results are not stored), and
Celery's defaults otherwise: JSON messages, ``acks_late`` off (a task is acknowledged when a pool process takes it),
a prefetch of 4 messages per pool process, the main process consuming and handing tasks to N forked pool processes.
Each pool process opens its own PostgreSQL connection on its first task.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

from . import System, delete_keys, executable
from .pipeline import handle

app = Celery("bench_alt", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.broker_connection_retry_on_startup = True  # silences Celery 5's start-up warning; the default behaviour


@app.task
def reply(payload: dict[str, Any]) -> None:
    handle(payload)


def enqueue(payloads: list[dict[str, Any]]) -> None:
    for payload in payloads:
        reply.delay(payload)


def commands(procs: int) -> list[list[str]]:
    return [
        [executable("celery"), "-A", "bench.alt.celery_app", "worker", "--pool", "prefork", "--concurrency",
         str(procs), "--loglevel", "WARNING"]
    ]  # fmt: skip


def clean(client: redis.Redis) -> None:
    delete_keys(client, "celery", "celery\x06*", "unacked*", "_kombu.*")


SYSTEMS = [
    System(
        "celery",
        "`celery worker --pool prefork --concurrency N` (+ its main process), acks_late off, prefetch 4",
        commands,
        enqueue,
        clean,
    )
]
