#!/usr/bin/env python3
"""botworker beside the same bot pipeline on RQ, Celery and Dramatiq, and a bare BLMOVE loop: one table, one run.

    .venv/bin/pip install -r bench/requirements-bench.txt      # once: the libraries compared (pinned)
    .venv/bin/python bench/compare.py --rounds 3 [--procs 2] [--messages 3000] [--systems botworker,celery,...]
        [--rate 200] [--latency-seconds 5] [--json out.json]

Starts its own Redis and PostgreSQL (``botworker.devstack``; REDIS_URL and DATABASE_URL when both are set), runs
``botworker.schema.migrate``, then interleaved rounds: each round runs every system once, the order rotated by one
between rounds. The offline pipeline only (no LLM delay; ``--scenario llm`` is for a later session). One run:

1. start the fleet as its own command line starts it (``python -m botworker run --procs N``, ``rq worker`` x N,
   ``celery worker --pool prefork --concurrency N``, ``dramatiq --processes N``, ``bench.alt.bare_loop --procs N``);
2. warm up: --warmup messages (a separate bot), enqueued with the system's own API, all answered;
3. burst: the fleet is paused (SIGSTOP to each of its processes) while --messages are enqueued with the system's
   own API (timed: "enqueue msgs/s"), so that the producer does not compete with the fleet for the cores; then
   SIGCONT, and every reply is timed by a subscriber of the ``bot_responses`` channel. Throughput is steady state:
   the replies from the 10th to the 90th percentile of arrival over their time span;
4. CPU per message (user + system, from /proc via psutil, reaped children included) of the fleet's process trees,
   PostgreSQL's and Redis's, over the drain; the fleet's PSS (``/proc/<pid>/smaps_rollup``) just after it;
5. open loop: messages enqueued one at a time at a fixed rate (--rate, or half the system's own burst throughput
   when that is lower) for --latency-seconds; push-to-reply p50/p99;
6. SIGTERM (a second one after 15 s, then SIGKILL: noted under the table); verify every message of 3 and 5:
   exactly one response event and no error event per messageId, LLEN bot_responses equal to their number, and
   exactly 2 chat_messages rows (one user, one bot) per messageId.

The messages: a third "list my models" (the platform tool: a SELECT on models), the rest "hello <i>"; every other
one in an existing conversation (instanceId of one of --conversations seeded instances, history loaded), the others
in a new one. RQ's default forking worker gets --slow-messages instead (it forks a process per job).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "bench")) if p not in sys.path]

import psycopg  # noqa: E402
import redis  # noqa: E402
import throughput as tp  # noqa: E402  (the servers, the reply collector and the machine line are shared)

from bench.alt import System, delete_keys  # noqa: E402
from bench.alt.processes import Fleet, cpu_snapshot, cpu_used, pss_mib  # noqa: E402
from botworker.config import load_config  # noqa: E402
from botworker.queue import ERRORS, MESSAGES, RESPONSES  # noqa: E402
from botworker.schema import migrate  # noqa: E402

LIBRARIES = {"rq": "rq", "celery": "celery", "dramatiq": "dramatiq"}  # system family -> module to import
ORDER = ("botworker", "bare-fused", "bare", "dramatiq", "celery", "rq-simple", "rq-fork")
SLOW = {"rq-fork"}


# ---- the systems -------------------------------------------------------------------------------------------


def botworker_system() -> System:
    cfg = load_config(environ={}, env_file=None)
    settings = (
        f"`python -m botworker run --procs N` with its defaults: {cfg.worker_threads} threads, WORKER_BATCH "
        f"{cfg.worker_batch}, {cfg.cpu_slots} CPU slot, {cfg.pool_size} PostgreSQL connections per process (+ the "
        "supervisor and a sandbox process per worker)"
    )
    producer: list[redis.Redis] = []

    def commands(procs: int) -> list[list[str]]:
        return [[sys.executable, "-m", "botworker", "run", "--procs", str(procs), "--log-level", "WARNING"]]

    def enqueue(payloads: list[dict[str, Any]]) -> None:
        """LPUSH, pipelined by 100, as the API server does (bench/throughput.py's push)."""
        if not producer:
            producer.append(redis.Redis.from_url(os.environ["REDIS_URL"]))
        for start in range(0, len(payloads), 100):
            pipe = producer[0].pipeline(transaction=False)
            for payload in payloads[start : start + 100]:
                pipe.lpush(MESSAGES, json.dumps(payload))
            pipe.execute()

    def clean(client: redis.Redis) -> None:
        delete_keys(client, MESSAGES, MESSAGES + ":*", "bot_worker:*")

    return System("botworker", settings, commands, enqueue, clean)


def missing_libraries() -> list[str]:
    return [name for name in LIBRARIES.values() if importlib.util.find_spec(name) is None]


def load_systems(names: list[str]) -> list[System]:
    """The systems asked for, in ORDER; the alternatives' modules are imported now (they read REDIS_URL)."""
    found = {"botworker": botworker_system()}
    for module in ("bare_loop", "rq_app", "celery_app", "dramatiq_app"):
        for system in importlib.import_module(f"bench.alt.{module}").SYSTEMS:
            found[system.name] = system
    return [found[n] for n in ORDER if n in names]


# ---- messages --------------------------------------------------------------------------------------------------


def payloads(bot: tp.Bot, n: int, tag: str) -> list[dict[str, Any]]:
    """The mix: a third with the platform tool, every other one in an existing conversation."""
    out = []
    for i in range(n):
        msg = {
            "botId": bot.bot_id,
            "userId": bot.user_id,
            "message": "list my models" if i % 3 == 0 else f"hello {i}",
            "messageId": f"{tag}-{i}",
        }
        if i % 2 == 0 and bot.instances:
            msg["instanceId"] = bot.instances[(i // 2) % len(bot.instances)]
        out.append(msg)
    return out


def rows_by_message(dsn: str, bot_id: str) -> dict[str, tuple[int, int]]:
    """messageId -> (rows, user rows) of the bot's conversations."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            """SELECT m.metadata->>'messageId', count(*), count(*) FILTER (WHERE m.role = 'user')
               FROM chat_messages m JOIN bot_instances i ON i.id = m."botInstanceId"
               WHERE i."botId" = %s GROUP BY 1""",
            (bot_id,),
        ).fetchall()
    return {str(mid): (int(n), int(users)) for mid, n, users in found}


# ---- one run -------------------------------------------------------------------------------------------------


@dataclass
class Run:
    system: str
    round: int
    messages: int
    enqueue_rate: float = 0.0  # msgs/s of the library's enqueue API, from the bench's process
    drain_seconds: float = 0.0
    rate: float = 0.0  # steady state: replies 10%..90% over their span
    rate_whole: float = 0.0  # all replies over SIGCONT -> last reply
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds over the drain, per group
    pss_mib: float = 0.0
    latency_rate: float = 0.0
    latency_messages: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    exit_codes: list[int] = field(default_factory=list)
    stop_note: str = ""  # a stop that took more than one SIGTERM (not a verification failure)
    problems: list[str] = field(default_factory=list)  # verification failures

    @property
    def ok(self) -> bool:
        return not self.problems

    def other_cores(self) -> float:
        """Cores' worth of CPU that processes outside the bench used during the drain: another user of the box."""
        return self.cpu.get("other", 0.0) / self.drain_seconds if self.drain_seconds else 0.0

    def ms_per_msg(self, group: str) -> float:
        return 1000 * self.cpu.get(group, 0.0) / max(1, self.messages)


def steady_rate(times: list[float]) -> float:
    """Replies per second between the 10th and the 90th percentile of arrival (start-up and tail excluded)."""
    times = sorted(times)
    lo, hi = int(0.1 * len(times)), max(0, math.ceil(0.9 * len(times)) - 1)
    span = times[hi] - times[lo] if hi > lo else 0.0
    return (hi - lo) / span if span > 0 else 0.0


def run_one(
    system: System, rnd: int, srv: tp.Servers, client: redis.Redis, args: argparse.Namespace, logdir: Path
) -> Run:
    slow = system.name in SLOW
    n = args.slow_messages if slow else args.messages
    run = Run(system.name, rnd, n)
    system.clean(client)
    client.delete(RESPONSES, ERRORS)
    env = {
        **os.environ,
        "REDIS_URL": srv.redis_url,
        "DATABASE_URL": srv.database_url,
        "PYTHONPATH": str(ROOT),
    }
    collector = tp.Collector(client)
    collector.start()
    fleet = Fleet(system, args.procs, env, logdir)
    ids: list[str] = []
    bot = None
    try:
        warm = tp.new_bot(srv.database_url, 5)
        tag = uuid.uuid4().hex[:8]
        items = payloads(warm, max(10, args.warmup // 10) if slow else args.warmup, f"warm-{tag}")
        system.enqueue(items)
        if not collector.wait_for([m["messageId"] for m in items], stall=args.stall + 30):  # (+ start-up)
            fleet.check_alive()
            raise RuntimeError(f"warm-up not answered; see {fleet.log}")
        fleet.check_alive()

        # The burst, enqueued while the fleet is paused.
        bot = tp.new_bot(srv.database_url, args.conversations)
        items = payloads(bot, n, f"burst-{tag}")
        ids = [m["messageId"] for m in items]
        client.delete(RESPONSES, ERRORS)
        fleet.signal_all(signal.SIGSTOP)
        started = time.perf_counter()
        system.enqueue(items)
        run.enqueue_rate = n / (time.perf_counter() - started)
        groups: dict[str, list[int | None]] = {
            "fleet": list(fleet.roots),
            "postgres": [srv.postgres_pid],
            "redis": [srv.redis_pid],
        }
        before = cpu_snapshot(groups)
        go = time.perf_counter()
        fleet.signal_all(signal.SIGCONT)
        complete = collector.wait_for(ids, stall=args.stall)
        after = cpu_snapshot(groups)
        run.pss_mib = pss_mib(fleet.roots)
        run.cpu = cpu_used(before, after)
        with collector.cond:
            times = [collector.responses.get(i, collector.errors.get(i)) for i in ids]
        done = [t for t in times if t is not None]
        run.drain_seconds = (max(done) - go) if done else 0.0
        run.rate_whole = len(done) / run.drain_seconds if run.drain_seconds else 0.0
        run.rate = steady_rate(done)
        if not complete:
            run.problems.append(f"stalled: {n - len(done)} of {n} burst messages unanswered after {args.stall:g}s")
        else:
            ids += latency_phase(system, bot, run, collector, args, tag)
    except Exception as exc:
        run.problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        run.exit_codes, run.stop_note = fleet.stop()
        collector.close()
    if bot is not None and ids:
        verify(run, ids, collector, client, srv.database_url, bot.bot_id)
    if run.stop_note or any(code != 0 for code in run.exit_codes):
        run.stop_note = f"exit codes {run.exit_codes}; {run.stop_note}".rstrip("; ")
    system.clean(client)
    client.delete(RESPONSES, ERRORS)
    return run


def latency_phase(
    system: System, bot: tp.Bot, run: Run, collector: tp.Collector, args: argparse.Namespace, tag: str
) -> list[str]:
    """Open loop: one message at a time at a fixed rate, below the system's capacity; push-to-reply percentiles."""
    if args.latency_seconds <= 0:
        return []
    rate = min(args.rate, 0.5 * run.rate) if run.rate > 0 else args.rate
    count = max(10, int(rate * args.latency_seconds))
    items = payloads(bot, count, f"open-{tag}")
    pushed: dict[str, float] = {}
    start = time.perf_counter()
    for k, item in enumerate(items):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pushed[item["messageId"]] = time.perf_counter()
        system.enqueue([item])
    ids = list(pushed)
    if not collector.wait_for(ids, stall=args.stall):
        run.problems.append("stalled in the open-loop phase")
    with collector.cond:
        lat = sorted((collector.responses[i] - pushed[i]) * 1000 for i in ids if i in collector.responses)
    run.latency_rate, run.latency_messages = rate, count
    run.p50_ms, run.p99_ms = tp.percentile(lat, 50), tp.percentile(lat, 99)
    return ids


def verify(run: Run, ids: list[str], collector: tp.Collector, client: redis.Redis, dsn: str, bot_id: str) -> None:
    """Exactly once: one response event and no error event per messageId; 2 rows (user + bot) per messageId."""
    with collector.cond:
        answered = sum(1 for i in ids if i in collector.responses)
        errors = sum(1 for i in ids if i in collector.errors)
        duplicates = collector.duplicates
        codes = dict(collector.error_codes)
    if answered != len(ids):
        run.problems.append(f"{answered} of {len(ids)} messages have a response event")
    if errors:
        run.problems.append(f"{errors} error events: {codes}")
    if duplicates:
        run.problems.append(f"{duplicates} duplicate events")
    listed = int(client.llen(RESPONSES))
    if listed != len(ids):
        run.problems.append(f"LLEN bot_responses = {listed}, expected {len(ids)}")
    rows = rows_by_message(dsn, bot_id)
    wrong = [i for i in ids if rows.get(i) != (2, 1)]
    strays = set(rows) - set(ids)
    if wrong or strays:
        example = f" (e.g. {wrong[0]}: {rows.get(wrong[0])})" if wrong else ""
        run.problems.append(f"{len(wrong)} messages without exactly 2 rows{example}, {len(strays)} unexpected ids")


# ---- report --------------------------------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def table(systems: list[System], runs: list[Run], args: argparse.Namespace) -> str:
    by: dict[str, list[Run]] = {s.name: [r for r in runs if r.system == s.name] for s in systems}
    base = statistics.median(r.rate for r in by["botworker"]) if by.get("botworker") else None
    lines = [
        f"{args.procs} processes each; offline pipeline; medians of {args.rounds} interleaved round(s) (run with the "
        "median msgs/s for the other columns)",
        "",
        "| system | msgs/s (min–max) | × botworker | enqueue msgs/s | CPU ms/msg fleet / PostgreSQL / Redis | "
        "PSS MiB | open loop p50 / p99 ms (at msgs/s) | check |",
        "|---|---:|---:|---:|---|---:|---|---|",
    ]
    for s in systems:
        rs = by[s.name]
        if not rs:
            continue
        rates = [r.rate for r in rs]
        med = statistics.median(rates)
        m = median_run(rs)
        ratio = f"{med / base:.2f}" if base else "–"
        cpu = f"{m.ms_per_msg('fleet'):.2f} / {m.ms_per_msg('postgres'):.2f} / {m.ms_per_msg('redis'):.2f}"
        lat = f"{m.p50_ms:.1f} / {m.p99_ms:.1f} (at {m.latency_rate:.0f})" if m.latency_messages else "–"
        check = "OK" if all(r.ok for r in rs) else "MISMATCH"
        lines.append(
            f"| {s.name} | {med:.0f} ({min(rates):.0f}–{max(rates):.0f}) | {ratio} | {m.enqueue_rate:.0f} | {cpu} "
            f"| {m.pss_mib:.0f} | {lat} | {check} |"
        )
    others = [f"{r.system} {r.other_cores():.2f}" for r in runs]
    lines += ["", "cores used by the rest of the machine during each drain (noise), in run order: " + ", ".join(others)]
    for r in runs:
        for p in r.problems:
            lines.append(f"MISMATCH {r.system} round {r.round}: {p}")
        if r.stop_note:
            lines.append(f"stop: {r.system} round {r.round}: {r.stop_note}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--procs", type=int, default=2, help="worker processes of every system (default 2)")
    parser.add_argument("--messages", type=int, default=3000, help="burst per run (default 3000)")
    parser.add_argument("--slow-messages", type=int, default=300, help="burst for rq-fork (default 300)")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up messages per run (default 200)")
    parser.add_argument("--conversations", type=int, default=50, help="seeded conversations per run (default 50)")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop msgs/s, at most half the system's own")
    parser.add_argument("--latency-seconds", type=float, default=5.0, help="open-loop phase length (0: skip)")
    parser.add_argument("--stall", type=float, default=60.0, help="give up after this many seconds without a reply")
    parser.add_argument("--systems", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--scenario", choices=["offline"], default="offline", help="offline only for now")
    parser.add_argument("--json", dest="json_out", help="also write every run to this JSON file")
    args = parser.parse_args()
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    if unknown := set(names) - set(ORDER):
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if missing := missing_libraries():
        print(f"missing bench libraries: {', '.join(missing)}. Install them (pinned, not product dependencies):")
        print("    .venv/bin/pip install -r bench/requirements-bench.txt")
        return 2

    print(f"machine: {tp.machine_line()}")
    print(f"code: {tp.code_version()}")
    logs = tempfile.mkdtemp(prefix="bench-compare-")  # the fleets' output; kept when a run fails
    with tp.servers() as srv:
        os.environ["REDIS_URL"], os.environ["DATABASE_URL"] = srv.redis_url, srv.database_url
        systems = load_systems(names)
        client = redis.Redis.from_url(srv.redis_url, decode_responses=True)
        print(f"schema ready ({len(migrate(srv.database_url))} objects created)")
        for s in systems:
            print(f"  {s.name}: {s.settings}")
        runs: list[Run] = []
        for rnd in range(args.rounds):
            k = rnd % len(systems)
            for system in systems[k:] + systems[:k]:
                print(f"round {rnd + 1}/{args.rounds}: {system.name} ...", flush=True)
                r = run_one(system, rnd + 1, srv, client, args, Path(logs))
                runs.append(r)
                print(
                    f"  {r.rate:.0f} msgs/s steady ({r.rate_whole:.0f} whole drain, {r.drain_seconds:.1f}s), enqueue "
                    f"{r.enqueue_rate:.0f}/s, fleet {r.ms_per_msg('fleet'):.2f} ms/msg, PSS {r.pss_mib:.0f} MiB, "
                    f"p50/p99 {r.p50_ms:.1f}/{r.p99_ms:.1f} ms, other {r.other_cores():.2f} cores, "
                    f"{'OK' if r.ok else 'MISMATCH: ' + '; '.join(r.problems)} {r.stop_note}",
                    flush=True,
                )
        client.close()
    report = table(systems, runs, args)
    print("\n" + report)
    if all(r.ok and not r.stop_note for r in runs):
        shutil.rmtree(logs, ignore_errors=True)
    else:
        print(f"the fleets' output is in {logs}")
    if args.json_out:
        out = {
            "machine": tp.machine_line(),
            "code": tp.code_version(),
            "args": vars(args),
            "systems": {s.name: s.settings for s in systems},
            "runs": [asdict(r) for r in runs],
        }
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
