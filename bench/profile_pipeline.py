#!/usr/bin/env python3
"""Where one worker's time goes: a real ``botworker.worker.Worker`` processing N messages in this process.

    .venv/bin/python bench/profile_pipeline.py [--messages 2000] [--tool|--no-tool] [--log-level WARNING]

Builds the worker exactly as a forked worker does (``Worker.init_process``: its Redis client, ``Store`` pool,
``ReliableQueue`` and ``Pipeline``), pre-fills ``bot_messages`` and calls ``run_once()`` once per message, so the
measured path is BLMOVE -> begin -> load_context -> detect/tools -> reply -> save_exchange ->
finish, with no supervisor and no other worker competing. Three passes over fresh messages:

1. timing: wall time per message, split by step (the steps' methods are wrapped with timers), every SQL statement
   timed by the client (round trip + server time) and grouped by kind, Redis commands per message from the
   server's own ``INFO commandstats``, CPU of this process, of its PostgreSQL backend and of Redis;
2. cProfile: the functions with the most own time and cumulative time;
3. the floors on this machine: one PostgreSQL round trip (``SELECT 1``, with and without BEGIN/COMMIT) and one
   Redis round trip (``PING``).

Uses REDIS_URL/DATABASE_URL when both are set (only bench keys are touched), else private DevStack servers.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402
from throughput import Servers, machine_line, new_bot, payload, servers, text_for  # noqa: E402

import botworker.pipeline  # noqa: E402
from botworker.config import load_config  # noqa: E402
from botworker.logs import setup_logging  # noqa: E402
from botworker.queue import ERRORS, MESSAGES, RESPONSES, STATUS  # noqa: E402
from botworker.schema import migrate  # noqa: E402
from botworker.store.statements import NAMED  # noqa: E402
from botworker.worker import Heartbeat, Worker  # noqa: E402

# ---- instrumentation ---------------------------------------------------------------------------------------

SQL_TIME: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # kind -> [count, seconds]
STEP_TIME: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
SAMPLES: dict[str, list[tuple[str, Any]]] = {}  # kind -> one batch's (statement, parameters) (for EXPLAIN ANALYZE)
TIMING = {"on": False}

# What a statement does, by a piece of its text; a batch of several (the store sends them pipelined, in one round
# trip) is named after all of them.
_KINDS = (
    ("pg_advisory_xact_lock", "advisory lock"),
    ("UPDATE bot_instances", "UPDATE instance"),
    ("INSERT INTO chat_messages", "INSERT chat rows"),
    ("INSERT INTO bot_instances", "INSERT instance"),
    ("FROM bots b WHERE b.id", "bot+user+prompts+tools"),
    ("FROM bot_instances WHERE id", "SELECT instance"),
    ("coalesce(metadata->>'messageId', '') <>", "history"),
    ("metadata->>'messageId' = ", "rows of this messageId"),
    ("count(*) OVER ()", "tool: list query"),
    ("SELECT 1", "ping"),
)


def _sql_kind(sql: Any) -> str:
    text = " ".join((sql.decode() if isinstance(sql, bytes) else str(sql)).split())
    found = [label for needle, label in _KINDS if needle in text]
    return " + ".join(found) if found else text[:50]


def timed_run(run: Callable[..., list[dict[str, Any]]]) -> Callable[..., list[dict[str, Any]]]:
    """``Store._run_all`` timed (client view: one round trip + server work) and named by its statements (a batch's
    repeated statements counted: "botworker_load x8")."""

    def wrapper(steps: Any) -> list[dict[str, Any]]:
        if not TIMING["on"]:
            return run(steps)
        kinds = Counter(_sql_kind(sql) for sql, _ in steps)
        kind = " + ".join(k if n == 1 else f"{k} x{n}" for k, n in kinds.items())
        SAMPLES.setdefault(kind, list(steps))
        t = time.perf_counter()
        try:
            return run(steps)
        finally:
            slot = SQL_TIME[kind]
            slot[0] += 1
            slot[1] += time.perf_counter() - t

    return wrapper


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        if not TIMING["on"]:
            return fn(*a, **kw)
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            slot = STEP_TIME[name]
            slot[0] += 1
            slot[1] += time.perf_counter() - t

    return wrapper


# (object attribute on the worker, method, label); methods that do not exist (the code moved on) are skipped.
STEPS = (
    ("queue", "pop", "redis: pop (BLMOVE)"),
    ("queue", "take", "redis: take (the backlog behind it, WORKER_BATCH)"),
    ("queue", "begin_many", "redis: begin (attempts, done?)"),
    ("queue", "finish_many", "redis: finish (ack + LPUSH/PUBLISH events)"),
    ("store", "load_context", "pg: load_context"),
    ("store", "load_contexts", "pg: load_contexts (a batch)"),
    ("store", "save_exchanges", "pg: save_exchanges"),
)
NESTED = "tool dispatch (incl. its SQL)"


def instrument(worker: Worker) -> list[str]:
    """Wrap the steps with timers; returns the labels of what was wrapped."""
    worker.store._run_all = timed_run(worker.store._run_all)  # type: ignore[method-assign]
    wrapped = []
    for owner, method, label in STEPS:
        obj = getattr(worker, owner)
        if hasattr(obj, method):
            setattr(obj, method, timed(label, getattr(obj, method)))
            wrapped.append(label)
    responder = worker.pipeline.responder
    responder.reply = timed("reply (offline responder)", responder.reply)  # type: ignore[method-assign]
    wrapped.append("reply (offline responder)")
    for name, label in (("detect", "detect tools"), ("dispatch", NESTED)):
        if hasattr(botworker.pipeline, name):
            setattr(botworker.pipeline, name, timed(label, getattr(botworker.pipeline, name)))
            wrapped.append(label)
    return wrapped


# ---- helpers -----------------------------------------------------------------------------------------------


def fill(client: redis.Redis, dsn: str, n: int, tool: bool) -> None:
    bot = new_bot(dsn)
    tag = uuid.uuid4().hex[:8]
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        pipe.lpush(MESSAGES, payload(bot, text_for(i, tool), f"prof-{tag}-{i}"))
    pipe.execute()


def drain(worker: Worker, n: int) -> float:
    t = time.perf_counter()
    start = worker.handled
    while worker.handled - start < n:  # (a call may take a batch: WORKER_BATCH)
        worker.run_once()
    return time.perf_counter() - t


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    out = {}
    for key, val in client.info("commandstats").items():
        out[key.removeprefix("cmdstat_")] = (int(val["calls"]), int(val["usec"]))
    return out


def cpu_of(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def backend_pids(worker: Worker) -> list[int]:
    """The PostgreSQL backends of the worker's pooled connections."""
    rows = worker.store.fetch("SELECT pid FROM pg_stat_activity WHERE application_name = 'botworker'")
    return [int(row["pid"]) for row in rows]


_UUID_TUPLE = re.compile(r"\(\s*'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'")


def explain(srv: Servers, repeat: int = 20) -> list[tuple[str, float, float]]:
    """(statement, median planning ms, median execution ms) of each sampled statement, under EXPLAIN ANALYZE in a
    transaction that is rolled back (writes included)."""
    out = []
    with psycopg.connect(srv.database_url) as conn:
        for kind, steps in SAMPLES.items():
            for sql, params in steps:
                if sql in NAMED:  # a named statement: its SQL text
                    sql = NAMED[sql][0]
                if isinstance(params, dict) and "uid1" in params:  # new row ids, or the key clashes with real rows
                    params = {**params, "uid1": str(uuid.uuid4()), "uid2": str(uuid.uuid4())}
                plans, execs = [], []
                for _ in range(repeat):
                    conn.execute("SET LOCAL TimeZone = 'UTC'")
                    report = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0][0]
                    plans.append(report["Planning Time"])
                    execs.append(report["Execution Time"])
                    conn.rollback()
                label = next((lbl for needle, lbl in _KINDS if needle in sql), kind)
                out.append((label, sorted(plans)[repeat // 2], sorted(execs)[repeat // 2]))
    return out


def floors(srv: Servers, n: int = 2000, rounds: int = 5) -> dict[str, tuple[float, float, float, float]]:
    """Per round trip of the cheapest PostgreSQL and Redis calls, over ``rounds`` rounds of ``n`` calls:
    (median wall µs, best wall µs, client CPU µs, server CPU µs)."""
    samples: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    conn = psycopg.connect(srv.database_url, autocommit=True)
    client = redis.Redis.from_url(srv.redis_url)
    cur = conn.cursor()
    backend = conn.info.backend_pid

    def measure(name: str, server_pid: int | None, call: Callable[[], None]) -> None:
        w, c, s = time.perf_counter(), time.process_time(), cpu_of(server_pid)
        for _ in range(n):
            call()
        samples[name].append(
            (
                (time.perf_counter() - w) / n * 1e6,
                (time.process_time() - c) / n * 1e6,
                (cpu_of(server_pid) - s) / n * 1e6,
            )
        )

    def select1() -> None:
        cur.execute("SELECT 1")
        cur.fetchone()

    def transaction() -> None:
        with conn.transaction():  # BEGIN, the statement, COMMIT: three round trips
            cur.execute("SELECT 1")
            cur.fetchone()

    def pipelined() -> None:
        with conn.pipeline():  # what the store sends: the transaction's settings and the statement, one Sync
            conn.execute("SELECT set_config('statement_timeout', '30000', true), set_config('TimeZone', 'UTC', true)")
            done = cur.execute("SELECT 1")
        done.fetchone()

    try:
        for _ in range(rounds):
            measure("pg SELECT 1 (autocommit: 1 round trip)", backend, select1)
            measure("pg settings + SELECT 1, pipelined (the store's frame: 1 round trip)", backend, pipelined)
            measure("pg BEGIN; SELECT 1; COMMIT (a transaction block: 3 round trips)", backend, transaction)
            measure("redis PING", srv.redis_pid, client.ping)
    finally:
        conn.close()
        client.close()
    out = {}
    for name, rows in samples.items():
        walls = sorted(r[0] for r in rows)
        out[name] = (
            walls[len(walls) // 2],
            walls[0],
            sorted(r[1] for r in rows)[len(rows) // 2],
            sorted(r[2] for r in rows)[len(rows) // 2],
        )
    return out


# ---- main --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per pass (default 2000)")
    parser.add_argument("--tool", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--log-level", default="WARNING", help="the worker's log level (the fleet bench uses WARNING)")
    parser.add_argument("--top", type=int, default=25, help="functions shown per cProfile table")
    args = parser.parse_args()
    n = args.messages

    print(f"machine: {machine_line()}")
    with servers() as srv:
        client = redis.Redis.from_url(srv.redis_url)
        if not srv.private and (client.exists(STATUS) or client.llen(MESSAGES)):
            print("refusing to run: a worker fleet is alive or bot_messages is not empty on this Redis")
            return 2
        migrate(srv.database_url)
        cfg = load_config(
            {"redis_url": srv.redis_url, "database_url": srv.database_url, "log_level": args.log_level}, env_file=None
        )
        setup_logging(cfg.log_level)
        worker = Worker(cfg, 0, f"profile-{os.getpid()}", Heartbeat())
        worker.init_process()
        try:
            instrument(worker)
            be_pids = backend_pids(worker)
            # warm-up: connections, plans, caches
            fill(client, srv.database_url, 100, args.tool)
            drain(worker, 100)

            # ---- pass 1: timing -------------------------------------------------------------------------------
            fill(client, srv.database_url, n, args.tool)
            stats0 = commandstats(client)
            cpu0 = (time.process_time(), sum(map(cpu_of, be_pids)), cpu_of(srv.redis_pid))
            TIMING["on"] = True
            wall = drain(worker, n)
            TIMING["on"] = False
            cpu1 = (time.process_time(), sum(map(cpu_of, be_pids)), cpu_of(srv.redis_pid))
            stats1 = commandstats(client)
            errors = client.llen(ERRORS)

            kind = "tool (list my models)" if args.tool else "no tool (hello <i>)"
            print(f"\n## one worker in-process, {n} messages, {kind}, log level {args.log_level}\n")
            print(f"wall: {wall:.2f}s = {wall / n * 1000:.3f} ms/message = {n / wall:.0f} messages/s; errors {errors}")
            print(
                f"CPU per message: worker {1000 * (cpu1[0] - cpu0[0]) / n:.3f} ms, its PostgreSQL backends "
                f"{1000 * (cpu1[1] - cpu0[1]) / n:.3f} ms, Redis {1000 * (cpu1[2] - cpu0[2]) / n:.3f} ms\n"
            )
            print("| step | calls/msg | ms/msg | share of wall |")
            print("|---|---:|---:|---:|")
            steps = sorted(STEP_TIME.items(), key=lambda kv: -kv[1][1])
            accounted = sum(v[1] for _, v in steps)
            for name, (count, secs) in steps:
                print(f"| {name} | {count / n:.2f} | {secs / n * 1000:.3f} | {100 * secs / wall:.1f}% |")
            rest = wall - accounted
            print(
                f"| rest (parse, events, JSON, pool, logging, loop) | | {rest / n * 1000:.3f} | {100 * rest / wall:.1f}% |"
            )

            print("\nSQL round trips (client-timed: round trip + server work; one pipelined batch each):\n")
            print("| statement | per msg | µs each | ms/msg |")
            print("|---|---:|---:|---:|")
            total_sql = 0
            for name, (count, secs) in sorted(SQL_TIME.items(), key=lambda kv: -kv[1][1]):
                total_sql += count
                print(f"| {name} | {count / n:.2f} | {secs / count * 1e6:.0f} | {secs / n * 1000:.3f} |")
            print(f"\nPostgreSQL round trips per message: {total_sql / n:.1f}")
            print("\nRedis commands per message (server side, INFO commandstats):\n")
            print("| command | calls/msg | server µs each |")
            print("|---|---:|---:|")
            for cmd, (calls, usec) in sorted(stats1.items()):
                c0, u0 = stats0.get(cmd, (0, 0))
                if calls - c0 <= 0 or cmd in ("info",):
                    continue
                print(f"| {cmd} | {(calls - c0) / n:.2f} | {(usec - u0) / (calls - c0):.1f} |")

            print("\nServer side of each SQL statement (EXPLAIN ANALYZE, median of 20, rolled back):\n")
            print("| statement | planning ms | execution ms |")
            print("|---|---:|---:|")
            for label, plan_ms, exec_ms in explain(srv):
                print(f"| {label} | {plan_ms:.3f} | {exec_ms:.3f} |")

            # ---- pass 2: cProfile -----------------------------------------------------------------------------
            fill(client, srv.database_url, n, args.tool)
            prof = cProfile.Profile()
            prof.enable()
            pwall = drain(worker, n)
            prof.disable()
            print(f"\n## cProfile, {n} messages ({pwall / n * 1000:.3f} ms/message under the profiler)\n")
            for order in ("tottime", "cumulative"):
                buf = io.StringIO()
                pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(args.top)
                lines = buf.getvalue().splitlines()
                start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
                print(f"top {args.top} by {order}:")
                print("\n".join(lines[start:]).rstrip() + "\n")

            # ---- pass 3: floors -------------------------------------------------------------------------------
            print("## round-trip floors on this machine (µs per call, one connection, loopback; 5 rounds)\n")
            print("| call | wall µs (median) | wall µs (best) | client CPU µs | server CPU µs |")
            print("|---|---:|---:|---:|---:|")
            for name, (median, best, ccpu, scpu) in floors(srv).items():
                print(f"| {name} | {median:.0f} | {best:.0f} | {ccpu:.0f} | {scpu:.0f} |")
        finally:
            worker._close()
            client.delete(RESPONSES, ERRORS)
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
