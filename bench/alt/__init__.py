"""The bot pipeline written as a user of each queue library would write it, for ``bench/compare.py``.

``pipeline.py`` is the pipeline (psycopg 3 + redis-py, nothing from botworker); ``rq_app.py``, ``celery_app.py``,
``dramatiq_app.py`` and ``bare_loop.py`` each wrap it in one library's job/task/actor (or a plain BLMOVE loop) and
expose ``SYSTEMS``: what compare.py needs to run them alike (``System`` below). Their libraries are pinned in
``bench/requirements-bench.txt``, not in the product's requirements.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent.parent


def executable(name: str) -> str:
    """A console script of this virtualenv (rq, celery, dramatiq), as its users run it."""
    return str(Path(sys.executable).with_name(name))


def delete_keys(client: redis.Redis, *patterns: str) -> int:
    """DEL every key matching the patterns (SCAN, never KEYS): a system's own keys only."""
    gone = 0
    for pattern in patterns:
        batch = list(client.scan_iter(pattern, count=1000))
        for start in range(0, len(batch), 500):
            gone += int(client.delete(*batch[start : start + 500]))
    return gone


@dataclass(frozen=True)
class System:
    """One system under comparison, as compare.py drives it.

    ``commands(procs)``: the argv of each process to start (cwd = the repository, environment = REDIS_URL,
    DATABASE_URL, PYTHONPATH); ``enqueue(payloads)``: push messages with the library's own API, from the bench's
    process; ``clean(client)``: delete the system's keys; ``settings``: what it runs with, for the report.
    """

    name: str
    settings: str
    commands: Callable[[int], list[list[str]]]
    enqueue: Callable[[list[dict[str, Any]]], None]
    clean: Callable[[redis.Redis], None]
