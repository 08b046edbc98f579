"""The bot pipeline as an RQ job: ``Queue.enqueue(reply, payload)``, run by ``rq worker`` processes.

    rq worker --url $REDIS_URL --logging_level WARNING bots                                        # rq-fork
    rq worker --url $REDIS_URL --logging_level WARNING --worker-class rq.worker.SimpleWorker bots   # rq-simple

One ``rq worker`` process per --procs (RQ's documented way to run several: one worker, one job at a time, each).
RQ's defaults otherwise: pickled jobs, results kept 500 s, a started/finished registry per queue. The default
``Worker`` forks a work horse per job, so each job imports the job module and opens its own PostgreSQL connection
in that child; ``SimpleWorker`` runs jobs in its own process and keeps the connection.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from rq import Queue

from . import System, delete_keys, executable
from .pipeline import handle

QUEUE = "bots"
_queue: Queue | None = None


def reply(payload: dict[str, Any]) -> None:
    """The job."""
    handle(payload)


def enqueue(payloads: list[dict[str, Any]]) -> None:
    global _queue
    if _queue is None:
        _queue = Queue(QUEUE, connection=redis.Redis.from_url(os.environ["REDIS_URL"]))
    for payload in payloads:
        _queue.enqueue(reply, payload)


def _commands(worker_class: str | None) -> Any:
    def commands(procs: int) -> list[list[str]]:
        argv = [executable("rq"), "worker", "--url", os.environ["REDIS_URL"], "--logging_level", "WARNING"]
        if worker_class:
            argv += ["--worker-class", worker_class]
        return [[*argv, QUEUE] for _ in range(procs)]

    return commands


def clean(client: redis.Redis) -> None:
    delete_keys(client, "rq:*")


SYSTEMS = [
    System(
        "rq-simple",
        "N x `rq worker --worker-class rq.worker.SimpleWorker` (one job at a time each, in the worker process)",
        _commands("rq.worker.SimpleWorker"),
        enqueue,
        clean,
    ),
    System(
        "rq-fork",
        "N x `rq worker` (RQ's default Worker: forks a work horse per job)",
        _commands(None),
        enqueue,
        clean,
    ),
]
