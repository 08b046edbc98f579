#!/usr/bin/env python3
"""How soon a fleet answers again after PostgreSQL or Redis comes back from an outage.

    .venv/bin/python bench/outage_resume.py [--procs 2] [--outage 8] [--rounds 3]

Starts its own PostgreSQL and Redis (with its append-only file, as production should run it) and a fleet
(``python -m botworker run``, offline responder), keeps a trickle of messages coming (one every 50 ms), and in
turn: stops PostgreSQL for ``--outage`` seconds and starts it again; SIGKILLs Redis for as long and starts it
again (from its append-only file). For each outage it prints the time from the server answering again to the
fleet's next reply, and at the end checks that every message sent was answered exactly once (by message id, in
the reply events and in the saved rows).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import redis  # noqa: E402

from botworker.demo import seed  # noqa: E402
from botworker.devservers import start_postgres, start_redis  # noqa: E402
from botworker.queue import ERRORS, MESSAGES, RESPONSES  # noqa: E402
from botworker.schema import migrate  # noqa: E402


class Trickle(threading.Thread):
    """Pushes one message every ``every`` seconds (to a Redis that may be down: those are retried)."""

    def __init__(self, url: str, user_id: str, bot_id: str, every: float) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        self.user_id, self.bot_id, self.every = user_id, bot_id, every
        self.sent: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            mid = str(uuid.uuid4())
            body = {"botId": self.bot_id, "userId": self.user_id, "message": f"hello {mid[:8]}", "messageId": mid}
            while not self.stop.is_set():
                try:
                    self.client.lpush(MESSAGES, json.dumps(body))
                    self.sent.append(mid)
                    break
                except redis.RedisError:
                    time.sleep(0.05)


def replies(url: str) -> int:
    try:
        return int(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).llen(RESPONSES))
    except redis.RedisError:
        return -1


def next_reply_after(url: str, count: int, timeout: float = 60.0) -> float:
    """Seconds until the reply list grows past ``count``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if replies(url) > count:
            return time.monotonic() - started
        time.sleep(0.005)
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--outage", type=float, default=8.0, help="seconds each server stays down")
    parser.add_argument("--rounds", type=int, default=3, help="outages of each server")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="botworker-outage-bench-"))
    work.chmod(0o755)
    pg = start_postgres(work)
    rs = start_redis(work, appendonly=True)
    fleet = None
    try:
        migrate(pg.url)
        user_id, bot_id = seed(pg.url, str(uuid.uuid4()), str(uuid.uuid4()))
        env = {**os.environ, "REDIS_URL": rs.url, "DATABASE_URL": pg.url, "LOG_LEVEL": "WARNING",
               "SANDBOX_ROOT": str(work / "sandbox"), "PYTHONPATH": str(ROOT)}  # fmt: skip
        log = (work / "fleet.log").open("w")
        argv = [sys.executable, "-m", "botworker", "run", "--procs", str(args.procs), "--env-file", ""]
        fleet = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
        trickle = Trickle(rs.url, user_id, bot_id, 0.05)
        trickle.start()
        while replies(rs.url) < 5:
            time.sleep(0.1)
        waits: dict[str, list[float]] = {"PostgreSQL": [], "Redis": []}
        for _ in range(args.rounds):
            for name, server in (("PostgreSQL", pg), ("Redis", rs)):
                if name == "Redis":
                    time.sleep(1.2)  # appendfsync everysec: what was acknowledged is on disk
                    server.proc.kill()
                    server.proc.wait()
                else:
                    server.stop()
                time.sleep(args.outage)
                # (while Redis is down the reply list cannot be read: count once it is back)
                before = replies(rs.url) if name == "PostgreSQL" else None
                server.start_again()
                count = replies(rs.url) if before is None else before
                waits[name].append(next_reply_after(rs.url, count))
                print(f"{name} down {args.outage:g}s: next reply {waits[name][-1]:.2f}s after it answered again",
                      flush=True)  # fmt: skip
                time.sleep(2)
        trickle.stop.set()
        trickle.join()
        client = redis.Redis.from_url(rs.url, decode_responses=True)
        deadline = time.monotonic() + 60
        while client.llen(RESPONSES) + client.llen(ERRORS) < len(trickle.sent) and time.monotonic() < deadline:
            time.sleep(0.2)
        answered = [json.loads(e)["messageId"] for e in client.lrange(RESPONSES, 0, -1)]
        with psycopg.connect(pg.url) as conn:
            rows = conn.execute(
                "SELECT metadata->>'messageId', count(*) FROM chat_messages GROUP BY 1"
            ).fetchall()  # fmt: skip
        saved = {mid: n for mid, n in rows}
        sent = set(trickle.sent)
        lost = sorted(sent - set(answered))
        doubled = sorted({m for m in answered if answered.count(m) > 1} | {m for m, n in saved.items() if n != 2})
        print(f"\nsent {len(sent)}, answered {len(set(answered))}, errors {client.llen(ERRORS)}, lost {len(lost)}, "
              f"doubled {len(doubled)}")  # fmt: skip
        for name, values in waits.items():
            print(f"{name}: next reply after it came back, median {statistics.median(values):.2f}s, "
                  f"max {max(values):.2f}s over {len(values)} outages of {args.outage:g}s")  # fmt: skip
        return 0 if not lost and not doubled else 1
    finally:
        if fleet is not None:
            fleet.terminate()
            fleet.wait(90)
        rs.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
