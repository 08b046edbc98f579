#!/usr/bin/env python3
"""LLM-bound traffic: replies/s and memory of a fleet whose every reply waits on a slow Gemini.

    .venv/bin/python bench/llm_bound.py [--delay 1.0] [--configs 2x1,2x16,2x64] [--rounds 4] [--tool]
        [--json out.json]

Starts a local server speaking Gemini's REST API (``generateContent``) that answers every request after --delay
seconds, and points the fleet at it (GEMINI_KEY, GEMINI_BASE_URL): the real Gemini responder and client run, only
the model is local. Uses REDIS_URL and DATABASE_URL when both are set, else private servers (as throughput.py).

For each ``PROCSxTHREADS`` configuration:
1. start the fleet as an operator does: ``python -m botworker run --procs P --threads T``; wait until it is ready;
2. measure its PSS at rest (supervisor, workers, sandbox processes and their lanes: every process of the tree);
3. push ``--rounds`` x P x T messages at once (a burst: each thread takes --rounds of them in turn), and time every
   reply event; meanwhile sample the fleet's PSS, the PostgreSQL connections open (``pg_stat_activity``) and the
   Gemini server's concurrent requests, keeping the peaks;
4. stop the fleet with SIGTERM and check every message was answered exactly once.

replies/s is messages / (last reply - push); the ideal is P x T / delay (every thread always waiting on Gemini).
"steady" leaves out the first P x T replies: a burst makes every thread take its first message at the same instant,
so the first round's CPU work (load, the SDK building the request) queues for each process's GIL at once; later
rounds are spread out by it, as real traffic is.
"MiB per reply in flight" is the loaded PSS divided by P x T. ``--tool``: every message also runs the demo bot's
word-counter script in the sandbox first (the sandbox's lanes: SANDBOX_CONCURRENCY).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
import psycopg
import redis
from throughput import (
    Collector,
    Fleet,
    Servers,
    code_version,
    machine_line,
    new_bot,
    payload,
    push,
    servers,
)

from botworker.queue import ERRORS, RESPONSES
from botworker.schema import migrate

MiB = 1 << 20


class SlowGemini:
    """``POST .../models/<model>:generateContent`` answered after ``delay`` seconds; counts requests in progress."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.served = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with outer._lock:
                    outer.active += 1
                    outer.peak = max(outer.peak, outer.active)
                try:
                    time.sleep(outer.delay)
                finally:
                    with outer._lock:
                        outer.active -= 1
                        outer.served += 1
                body = json.dumps(
                    {
                        "candidates": [
                            {"content": {"role": "model", "parts": [{"text": "Noted."}]}, "finishReason": "STOP"}
                        ],
                        "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 2, "totalTokenCount": 42},
                        "modelVersion": "bench-slow-gemini",
                    }
                ).encode()
                # Headers and body in one write: two small writes on a kept-alive connection meet Nagle's
                # algorithm and the client's delayed ACK, 40 ms per reply that no real server adds.
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=UTF-8\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                self.wfile.write(head.encode() + body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # a fleet opens hundreds of connections at once

        self.httpd = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True, name="slow-gemini").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def reset_peak(self) -> None:
        with self._lock:
            self.peak = self.active

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tree_sum(pid: int, measure: Callable[[psutil.Process], float]) -> float:
    """``measure`` summed over a process and all its descendants (processes gone meanwhile count 0)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            total += measure(proc)
        except psutil.Error:
            continue
    return total


def fleet_pss(pid: int) -> float:
    """PSS (MiB) of a process tree (shared pages split among the processes sharing them)."""
    return _tree_sum(pid, lambda p: p.memory_full_info().pss) / MiB


def fleet_cpu(pid: int) -> float:
    """CPU seconds used so far by a process tree (reaped children included: each sandboxed run's processes)."""

    def used(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    return _tree_sum(pid, used)


def pg_connections(conn: psycopg.Connection[Any]) -> int:
    """Client backends of the fleet (its pools and tools; not this script's own connection)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'botworker%' AND pid <> pg_backend_pid()"
    ).fetchone()
    return int(row[0]) if row else 0


class Sampler(threading.Thread):
    """Peaks of the fleet's PSS and PostgreSQL connections while the burst is in progress (one connection of its
    own for the whole burst: a connection a sample would cost PostgreSQL a fork each time, on the measured cores)."""

    def __init__(self, pid: int, dsn: str) -> None:
        super().__init__(daemon=True, name="sampler")
        self.pid, self.dsn = pid, dsn
        self.pss = 0.0
        self.connections = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self._halt.wait(0.5):
                self.pss = max(self.pss, fleet_pss(self.pid))
                self.connections = max(self.connections, pg_connections(conn))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


@dataclass
class Result:
    procs: int
    threads: int
    messages: int
    delay: float
    tool: bool
    seconds: float = 0.0
    rate: float = 0.0
    steady: float = 0.0  # replies/s after the first P x T replies: without the burst's ramp-up
    ideal: float = 0.0
    peak_llm: int = 0
    pss_idle: float = 0.0
    pss_loaded: float = 0.0
    pg_peak: int = 0
    cpu_ms: float = 0.0  # the fleet's CPU per reply
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0

    @property
    def per_reply(self) -> float:
        return self.pss_loaded / (self.procs * self.threads)


def run_config(srv: Servers, client: redis.Redis, gemini: SlowGemini, procs: int, threads: int, args: Any) -> Result:
    n = args.rounds * procs * threads
    res = Result(procs, threads, n, args.delay, args.tool, ideal=procs * threads / args.delay)
    client.delete(RESPONSES, ERRORS)
    env = {"GEMINI_KEY": "bench-key", "GEMINI_BASE_URL": gemini.url, "LLM_DEADLINE": "60", "GEMINI_TIMEOUT": "30"}
    env["SANDBOX_ROOT"] = args.sandbox_root
    fleet = Fleet(procs, srv, ("--threads", str(threads)), env)
    collector = Collector(client)
    collector.start()
    try:
        fleet.wait_ready(client)
        warm = new_bot(srv.database_url)  # every worker's first message pays for its connections: not measured
        warm_ids = [f"warm-{uuid.uuid4().hex}" for _ in range(procs * threads)]
        push(client, [(m, payload(warm, text_for(i, args.tool), m)) for i, m in enumerate(warm_ids)], 500)
        if not collector.wait_for(warm_ids, stall=60):
            raise RuntimeError("the warm-up messages were not all answered")
        time.sleep(1.0)
        res.pss_idle = fleet_pss(fleet.proc.pid)
        bot = new_bot(srv.database_url)
        items = [(f"llm-{uuid.uuid4().hex}", i) for i in range(n)]
        sampler = Sampler(fleet.proc.pid, srv.database_url)
        sampler.start()
        gemini.reset_peak()
        cpu_before = fleet_cpu(fleet.proc.pid)
        started = time.perf_counter()
        push(client, [(m, payload(bot, text_for(i, args.tool), m)) for m, i in items], 500)
        complete = collector.wait_for([m for m, _ in items], stall=max(30.0, 5 * args.delay))
        res.cpu_ms = (fleet_cpu(fleet.proc.pid) - cpu_before) * 1000 / n
        sampler.stop()
        ids = [m for m, _ in items]
        times = [t for m in ids if (t := collector.responses.get(m, collector.errors.get(m))) is not None]
        res.seconds = max(times) - started if times else float("nan")
        res.answered = len(times)
        res.rate = res.answered / res.seconds if times else 0.0
        times.sort()
        first = procs * threads  # the first round: every thread took a message at the same instant
        if len(times) > first:
            res.steady = (len(times) - first) / (times[-1] - times[first - 1])
        res.peak_llm = gemini.peak
        res.pss_loaded, res.pg_peak = max(sampler.pss, res.pss_idle), sampler.connections
        res.errors = dict(collector.error_codes)
        res.duplicates = collector.duplicates
        if not complete:
            print(f"  {procs}x{threads}: only {res.answered} of {n} answered", file=sys.stderr)
    finally:
        collector.close()
        fleet.stop()
    return res


def text_for(i: int, tool: bool) -> str:
    return f'run the word counter on "reply number {i} in flight"' if tool else f"hello {i}"


def print_table(results: list[Result]) -> None:
    print()
    print("| procs x threads | messages | replies/s | steady replies/s | ideal | % of ideal (steady) "
          "| peak LLM requests | PSS idle MiB "
          "| PSS loaded MiB | MiB per reply in flight | PostgreSQL connections | fleet CPU ms per reply |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.procs} x {r.threads} | {r.messages} | {r.rate:.1f} | {r.steady:.1f} | {r.ideal:.0f} "
            f"| {100 * r.rate / r.ideal:.0f}% ({100 * r.steady / r.ideal:.0f}%) "
            f"| {r.peak_llm} | {r.pss_idle:.0f} | {r.pss_loaded:.0f} | {r.per_reply:.2f} | {r.pg_peak} | {r.cpu_ms:.1f} |"
        )
    for r in results:
        if r.errors or r.duplicates or r.answered != r.messages:
            print(f"  {r.procs}x{r.threads}: answered {r.answered}/{r.messages}, errors {r.errors}, "
                  f"duplicates {r.duplicates}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds the fake Gemini takes per request")
    parser.add_argument("--configs", default="2x1,2x16,2x64", help="PROCSxTHREADS, comma-separated")
    parser.add_argument("--rounds", type=int, default=4, help="messages per thread in the burst")
    parser.add_argument("--tool", action="store_true", help="every message also runs a sandboxed script")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs.split(",")]
    print(f"machine: {machine_line()}\ncode: {code_version()}")
    print(f"fake Gemini delay {args.delay:g}s, {args.rounds} messages per thread, tool: {args.tool}")
    gemini = SlowGemini(args.delay)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as sandbox_root, servers() as srv:
        os.chmod(sandbox_root, 0o755)
        args.sandbox_root = sandbox_root
        migrate(srv.database_url)
        client = redis.Redis.from_url(srv.redis_url, decode_responses=True)
        for procs, threads in configs:
            print(f"running {procs} x {threads}...", flush=True)
            results.append(run_config(srv, client, gemini, procs, threads, args))
        client.close()
    gemini.close()
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "per_reply": r.per_reply} for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
