#!/usr/bin/env python3
"""End-to-end throughput and latency of a real worker fleet: push M messages, time every reply event.

    .venv/bin/python bench/throughput.py [--procs 1,2,4,8] [--threads 1] [--messages 2000] [--tool|--no-tool] [--warmup 100]
        [--repeat 3] [--closed-loop 200] [--conversations 0] [--json out.json] [--py-spy /tmp/spy]

Uses REDIS_URL and DATABASE_URL when both are set (nothing is flushed there: only the bench's own keys are
deleted, and it refuses to run while another fleet is alive), otherwise starts private servers with
``botworker.devstack.DevStack``. Runs ``botworker.schema.migrate`` and seeds fresh users and bots with
``botworker.demo.seed``.

For each --procs value:
1. start the fleet exactly as an operator does: ``python -m botworker run --procs N --log-level WARNING``;
2. wait until its node key ``bot_worker:node:*`` lists N workers;
3. subscribe to the ``bot_responses`` / ``bot_errors`` channels (before anything is pushed);
4. warm up with --warmup messages (a separate bot) and wait for all of their replies;
5. DEL bot_responses bot_errors, then push --messages messages in pipelined batches, recording the push time of
   each messageId; the subscriber thread records the receive time of each reply event;
6. stop the fleet with SIGTERM, wait for it, and check: exactly M response events, 2*M chat_messages rows.

Latency is push -> reply event as seen by a pub/sub subscriber. Because all M messages are pushed at once, loaded
latency is mostly time spent waiting in ``bot_messages``; the closed-loop figure (one message at a time, one worker)
is the unloaded latency. CPU is sampled from /proc (psutil) for the fleet, Redis, PostgreSQL and this script;
"other" is what the rest of the machine used meanwhile (other users of a shared box).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from botworker.demo import seed  # noqa: E402
from botworker.queue import DEAD, ERRORS, MESSAGES, NODE_PREFIX, PROCESSING_SET, RESPONSES, STATUS  # noqa: E402
from botworker.schema import migrate  # noqa: E402

CORES = os.cpu_count() or 1


# ---- servers -----------------------------------------------------------------------------------------------


@dataclass
class Servers:
    redis_url: str
    database_url: str
    private: bool
    redis_pid: int | None = None
    postgres_pid: int | None = None


def _listener_pid(url: str) -> int | None:
    """The pid of the local process listening on the URL's port, if it is local and visible to us."""
    parts = urlsplit(url)
    if parts.hostname not in ("localhost", "127.0.0.1", "::1") or parts.port is None:
        return None
    with suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == parts.port:
                return conn.pid
    return None


@contextmanager
def servers() -> Iterator[Servers]:
    if os.environ.get("REDIS_URL") and os.environ.get("DATABASE_URL"):
        rurl, durl = os.environ["REDIS_URL"], os.environ["DATABASE_URL"]
        yield Servers(rurl, durl, False, _listener_pid(rurl), _listener_pid(durl))
        return
    from botworker.devstack import DevStack

    print("starting private Redis and PostgreSQL (botworker.devstack; set REDIS_URL and DATABASE_URL to use yours)")
    with DevStack() as stack:
        assert stack.redis is not None and stack.postgres is not None
        yield Servers(stack.redis_url, stack.database_url, True, stack.redis.proc.pid, stack.postgres.proc.pid)


# ---- CPU accounting ----------------------------------------------------------------------------------------


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields_ = [float(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (fields_ + [0.0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / tick, (busy + idle + iowait) / tick


def _tree_cpu(pid: int | None, children: bool = True) -> dict[int, float]:
    """CPU seconds (user+system) of a process and (unless told not to) its descendants, per pid."""
    out: dict[int, float] = {}
    if pid is None:
        return out
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if children else [root]
    except psutil.Error:
        return out
    for p in procs:
        with suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


@dataclass
class CpuSnapshot:
    busy: float
    total: float
    groups: dict[str, dict[int, float]]

    @classmethod
    def take(cls, pids: dict[str, int | None]) -> CpuSnapshot:
        busy, total = _machine_busy()
        groups = {name: _tree_cpu(pid) for name, pid in pids.items()}
        groups["bench"] = _tree_cpu(os.getpid(), children=False)  # the servers and the fleet are our children
        return cls(busy, total, groups)


def cpu_delta(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    """CPU seconds used between two snapshots, per group, plus 'machine' and 'other' (the rest of the box)."""
    out: dict[str, float] = {}
    for name, after in b.groups.items():
        before = a.groups.get(name, {})
        out[name] = sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in after.items())
    out["machine"] = b.busy - a.busy
    out["other"] = max(0.0, out["machine"] - sum(v for k, v in out.items() if k != "machine"))
    out["wall_cores"] = (b.total - a.total) or 1e-9  # core-seconds available in the window
    return out


# ---- optional py-spy sampling of the workers -----------------------------------------------------------------

ANCHORS = ("Worker.run_once", "Worker.process", "Pipeline.handle")
WRAPPERS = ("Worker._redis", "Worker._finish", "<lambda>")


def _func(frame: str) -> str:
    return frame.split(" (", 1)[0]


def summarize_collapsed(path: Path, top: int = 15) -> str:
    """Worker samples of a py-spy raw (collapsed) profile: share by pipeline step, and by innermost Python frame."""
    by_step: dict[str, int] = {}
    by_leaf: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or "Worker.run_once" not in stack:
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        anchor = max(i for i, f in enumerate(frames) if _func(f) in ANCHORS)
        inner = [f for f in frames[anchor + 1 :] if not any(w in _func(f) for w in WRAPPERS)]
        step = _func(inner[0]) if inner else _func(frames[anchor]) + " (own code)"
        by_step[step] = by_step.get(step, 0) + n
        leaf = frames[-1].split("/")[-1] if "(" in frames[-1] else frames[-1]
        leaf = f"{_func(frames[-1])} ({leaf.rsplit('(', 1)[-1].rstrip(')')})"
        by_leaf[leaf] = by_leaf.get(leaf, 0) + n
    if not total:
        return "no worker samples"
    out = [f"{total} worker samples (wall-clock, idle included)", "", "| step (frame under the worker loop) | share |"]
    out.append("|---|---:|")
    out += [f"| {k} | {100 * v / total:.1f}% |" for k, v in sorted(by_step.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", "| innermost Python frame (C calls below it are not shown) | share |", "|---|---:|"]
    out += [f"| {k} | {100 * v / total:.1f}% |" for k, v in sorted(by_leaf.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


class Sampler:
    """``py-spy record`` of the supervisor and its workers while the measured messages flow (--py-spy)."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        cmd = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid), "--subprocesses", "--idle"]
        cmd += ["--nonblocking", "--rate", "200", "--format", "raw", "-o", str(out)]
        self.out = out
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attach before the messages arrive

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return summarize_collapsed(self.out) if self.out.exists() else "py-spy wrote nothing (is it installed?)"


# ---- the reply collector -----------------------------------------------------------------------------------


class Collector(threading.Thread):
    """Subscribes to bot_responses and bot_errors (before anything is pushed) and times every event by messageId."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(name="collector", daemon=True)
        self.pubsub = client.pubsub()
        self.pubsub.subscribe(RESPONSES, ERRORS)
        confirmed = 0
        deadline = time.monotonic() + 10
        while confirmed < 2:  # wait for both subscriptions to be confirmed: no event can be missed after this
            msg = self.pubsub.get_message(timeout=1.0)
            if msg and msg["type"] == "subscribe":
                confirmed += 1
            if time.monotonic() > deadline:
                raise RuntimeError("could not subscribe to the reply channels")
        self.cond = threading.Condition()
        self.responses: dict[str, float] = {}
        self.errors: dict[str, float] = {}
        self.error_codes: dict[str, int] = {}
        self.order: list[str] = []  # message ids in arrival order (first event of each)
        self.duplicates = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if msg is None or msg["type"] != "message":
                continue
            now = time.perf_counter()
            channel = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
            try:
                event = json.loads(msg["data"])
                mid = str(event.get("messageId"))
            except (ValueError, AttributeError):
                continue
            with self.cond:
                target = self.responses if channel == RESPONSES else self.errors
                if mid in target:
                    self.duplicates += 1
                else:
                    target[mid] = now
                    if mid not in (self.errors if channel == RESPONSES else self.responses):
                        self.order.append(mid)
                if channel == ERRORS:
                    code = str(event.get("code"))
                    self.error_codes[code] = self.error_codes.get(code, 0) + 1
                self.cond.notify_all()

    def wait_for(self, ids: list[str], stall: float) -> bool:
        """Wait until every id has a response or error event; False if nothing new arrived for ``stall`` seconds."""
        with self.cond:
            missing = {i for i in ids if i not in self.responses and i not in self.errors}
            seen = len(self.order)
            while missing:
                if not self.cond.wait(timeout=stall) and len(self.order) == seen:
                    return False
                missing.difference_update(self.order[seen:])
                seen = len(self.order)
        return True

    def wait_one(self, mid: str, timeout: float) -> float | None:
        with self.cond:
            ok = self.cond.wait_for(lambda: mid in self.responses or mid in self.errors, timeout=timeout)
            if not ok:
                return None
            return self.responses.get(mid, self.errors.get(mid))

    def close(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.pubsub.close()


# ---- the fleet ---------------------------------------------------------------------------------------------


class Fleet:
    """``python -m botworker run --procs N`` in a subprocess, as an operator starts it."""

    def __init__(
        self, procs: int, srv: Servers, flags: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> None:
        self.procs = procs
        env = {**os.environ, "REDIS_URL": srv.redis_url, "DATABASE_URL": srv.database_url, **(env or {})}
        cmd = [sys.executable, "-m", "botworker", "run", "--procs", str(procs), "--log-level", "WARNING", *flags]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def wait_ready(self, client: redis.Redis, timeout: float = 60.0) -> dict[str, Any]:
        """Until our node key (the one whose pid is the supervisor's) lists N workers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the fleet exited with status {self.proc.returncode} before it was ready")
            for key in client.scan_iter(NODE_PREFIX + "*"):
                raw = client.get(key)
                if not raw:
                    continue
                node = json.loads(raw)
                if node.get("pid") == self.proc.pid and len(node.get("workers", [])) == self.procs:
                    return node
            time.sleep(0.1)
        raise RuntimeError(f"the fleet did not show {self.procs} workers within {timeout:.0f}s")

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  fleet pid {self.proc.pid} ignored SIGTERM for {timeout:.0f}s: killing it", file=sys.stderr)
            self.proc.kill()
            return self.proc.wait()


# ---- messages ----------------------------------------------------------------------------------------------


@dataclass
class Bot:
    user_id: str
    bot_id: str
    instances: list[str] = field(default_factory=list)  # existing conversations, used round-robin


def new_bot(dsn: str, conversations: int = 0) -> Bot:
    """A fresh user and bot (``demo.seed``), and optionally that many existing conversations (bot_instances)."""
    user_id, bot_id = seed(dsn, user_id=str(uuid.uuid4()), bot_id=str(uuid.uuid4()))
    bot = Bot(user_id, bot_id, [str(uuid.uuid4()) for _ in range(conversations)])
    if bot.instances:
        conn = psycopg.connect(dsn)
        try:
            with conn, conn.cursor() as cur:
                for iid in bot.instances:
                    cur.execute(
                        """INSERT INTO bot_instances (id, "botId", "userId", status, "lastStartedAt")
                           VALUES (%s, %s, %s, 'running', now())""",
                        (iid, bot_id, user_id),
                    )
        finally:
            conn.close()
    return bot


def payload(bot: Bot, text: str, mid: str, i: int = 0) -> str:
    msg = {"botId": bot.bot_id, "userId": bot.user_id, "message": text, "messageId": mid}
    if bot.instances:
        msg["instanceId"] = bot.instances[i % len(bot.instances)]
    return json.dumps(msg)


def push(client: redis.Redis, items: list[tuple[str, str]], batch: int) -> dict[str, float]:
    """LPUSH (mid, raw) pairs in pipelined batches; returns each id's push time (taken just before its batch)."""
    pushed: dict[str, float] = {}
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        pipe = client.pipeline(transaction=False)
        for _, raw in chunk:
            pipe.lpush(MESSAGES, raw)
        t = time.perf_counter()
        pipe.execute()
        for mid, _ in chunk:
            pushed[mid] = t
    return pushed


def text_for(i: int, tool: bool) -> str:
    return "list my models" if tool else f"hello {i}"


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def chat_rows(dsn: str, bot_id: str) -> int:
    conn = psycopg.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                """SELECT count(*) FROM chat_messages m JOIN bot_instances i ON i.id = m."botInstanceId"
                   WHERE i."botId" = %s""",
                (bot_id,),
            )
            return int(cur.fetchone()[0])
    finally:
        conn.close()


# ---- one run -----------------------------------------------------------------------------------------------


@dataclass
class Result:
    procs: int
    messages: int
    tool: bool
    seconds: float = 0.0
    rate: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    errors: int = 0
    responses_seen: int = 0
    responses_listed: int = 0
    chat_rows: int = 0
    duplicates: int = 0
    check: str = "MISMATCH"
    problems: list[str] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    fleet_exit: int | None = None
    rates: list[float] = field(default_factory=list)  # messages/s of every repeat, when --repeat > 1
    profile: str = ""  # py-spy summary, with --py-spy


def warm_up(client: redis.Redis, collector: Collector, dsn: str, n: int, tool: bool, batch: int) -> None:
    if n <= 0:
        return
    bot = new_bot(dsn)
    tag = uuid.uuid4().hex[:8]
    items = [(f"warm-{tag}-{i}", "") for i in range(n)]
    items = [(mid, payload(bot, text_for(i, tool), mid)) for i, (mid, _) in enumerate(items)]
    push(client, items, batch)
    if not collector.wait_for([mid for mid, _ in items], stall=60):
        raise RuntimeError("warm-up messages were not all answered within 60s of silence")


def run_once(srv: Servers, client: redis.Redis, procs: int, args: argparse.Namespace) -> Result:
    res = Result(procs, args.messages, args.tool)
    client.delete(RESPONSES, ERRORS)
    collector = Collector(client)
    collector.start()
    fleet = Fleet(procs, srv, ("--threads", str(args.threads)), getattr(args, "fleet_env", None))
    try:
        fleet.wait_ready(client)
        warm_up(client, collector, srv.database_url, args.warmup, args.tool, args.batch)

        bot = new_bot(srv.database_url, args.conversations)
        tag = uuid.uuid4().hex[:8]
        items = [
            (f"bench-{tag}-{i}", payload(bot, text_for(i, args.tool), f"bench-{tag}-{i}", i))
            for i in range(args.messages)
        ]
        ids = [mid for mid, _ in items]
        client.delete(RESPONSES, ERRORS)
        pids = {"fleet": fleet.proc.pid, "redis": srv.redis_pid, "postgres": srv.postgres_pid}
        sampler = Sampler(fleet.proc.pid, Path(f"{args.py_spy}-procs{procs}.txt")) if args.py_spy else None
        before = CpuSnapshot.take(pids)
        pushed = push(client, items, args.batch)
        complete = collector.wait_for(ids, stall=args.stall)
        after = CpuSnapshot.take(pids)
        if sampler:
            res.profile = sampler.stop()

        with collector.cond:
            got = {mid: collector.responses[mid] for mid in ids if mid in collector.responses}
            failed = {mid: collector.errors[mid] for mid in ids if mid in collector.errors}
            res.duplicates = collector.duplicates
        finished = {**failed, **got}
        lat = sorted((finished[mid] - pushed[mid]) * 1000 for mid in finished)
        first = min(pushed.values())
        last = max(finished.values()) if finished else time.perf_counter()
        res.seconds = last - first
        res.rate = len(finished) / res.seconds if res.seconds > 0 else 0.0
        res.p50, res.p90, res.p99 = (percentile(lat, p) for p in (50, 90, 99))
        res.max = lat[-1] if lat else float("nan")
        res.responses_seen = len(got)
        res.errors = int(client.llen(ERRORS))
        res.responses_listed = int(client.llen(RESPONSES))
        res.cpu = cpu_delta(before, after)
        if not complete:
            res.problems.append(
                f"stalled: {len(ids) - len(finished)} message(s) without any event after {args.stall:g}s"
            )
    finally:
        res.fleet_exit = fleet.stop()
        collector.close()

    res.chat_rows = chat_rows(srv.database_url, bot.bot_id)
    left = int(client.llen(MESSAGES))
    if res.responses_seen != args.messages:
        res.problems.append(f"{res.responses_seen} response events on the channel, expected {args.messages}")
    if res.responses_listed != args.messages:
        res.problems.append(f"LLEN bot_responses = {res.responses_listed}, expected {args.messages}")
    if res.chat_rows != 2 * args.messages:
        res.problems.append(f"{res.chat_rows} chat_messages rows for the bench bot, expected {2 * args.messages}")
    if res.duplicates:
        res.problems.append(f"{res.duplicates} duplicate event(s)")
    if left:
        res.problems.append(f"{left} message(s) left in bot_messages")
    if res.fleet_exit != 0:
        res.problems.append(f"fleet exited with status {res.fleet_exit}")
    if collector.error_codes:
        res.problems.append("bot_errors codes: " + ", ".join(f"{k} x{v}" for k, v in collector.error_codes.items()))
    res.check = "MISMATCH" if res.problems else "OK"
    client.delete(RESPONSES, ERRORS)
    return res


def closed_loop(srv: Servers, client: redis.Redis, args: argparse.Namespace) -> dict[str, float]:
    """One worker, one message at a time: the unloaded push -> reply latency."""
    client.delete(RESPONSES, ERRORS)
    collector = Collector(client)
    collector.start()
    fleet = Fleet(1, srv)
    lat: list[float] = []
    try:
        fleet.wait_ready(client)
        warm_up(client, collector, srv.database_url, min(args.warmup, 50), args.tool, args.batch)
        bot = new_bot(srv.database_url)
        tag = uuid.uuid4().hex[:8]
        for i in range(args.closed_loop):
            mid = f"single-{tag}-{i}"
            raw = payload(bot, text_for(i, args.tool), mid)
            t = time.perf_counter()
            client.lpush(MESSAGES, raw)
            got = collector.wait_one(mid, timeout=30)
            if got is None:
                raise RuntimeError(f"no reply to closed-loop message {mid} within 30s")
            lat.append((got - t) * 1000)
    finally:
        fleet.stop()
        collector.close()
        client.delete(RESPONSES, ERRORS)
    lat.sort()
    return {
        "n": len(lat),
        "mean": sum(lat) / len(lat),
        "p50": percentile(lat, 50),
        "p90": percentile(lat, 90),
        "p99": percentile(lat, 99),
        "max": lat[-1],
        "rate": 1000 * len(lat) / sum(lat),
    }


# ---- report ------------------------------------------------------------------------------------------------


def machine_line() -> str:
    model = "unknown CPU"
    with suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{CORES} cores ({model}), Python {platform.python_version()}, {platform.platform()}"


def code_version() -> str:
    """The commit the fleet runs, and whether botworker/ has uncommitted changes (best effort)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "botworker"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes in botworker/" if dirty else "")


def print_table(results: list[Result], closed: dict[str, float] | None, tool: bool, conversations: int = 0) -> None:
    kind = 'tool ("list my models", mcp_tool list_models)' if tool else 'no tool ("hello <i>")'
    if conversations:
        kind += f", {conversations} existing conversations (instanceId, history)"
    else:
        kind += ", a new conversation per message (no instanceId)"
    print(f"\n## botworker throughput: {kind}")
    print(f"machine: {machine_line()}")
    print(f"code: {code_version()}")
    if closed:
        print(
            f"\nclosed loop, 1 worker, {closed['n']:.0f} messages one at a time: mean {closed['mean']:.2f} ms, "
            f"p50 {closed['p50']:.2f}, p90 {closed['p90']:.2f}, p99 {closed['p99']:.2f}, max {closed['max']:.2f} ms "
            f"(= {closed['rate']:.0f} msg/s serial)"
        )
    print()
    spread = any(len(r.rates) > 1 for r in results)
    if spread:
        print(f"median of {len(results[0].rates)} runs per fleet size (by messages/s); all runs' rates in 'range'\n")
    print(
        "| procs | messages | seconds | messages/s |"
        + (" range |" if spread else "")
        + " p50 ms | p90 ms | p99 ms | max ms | errors | check |"
    )
    print("|---:|---:|---:|---:|" + ("---|" if spread else "") + "---:|---:|---:|---:|---:|---|")
    for r in results:
        rng = f" {'/'.join(f'{x:.0f}' for x in r.rates)} |" if spread else ""
        print(
            f"| {r.procs} | {r.messages} | {r.seconds:.2f} | {r.rate:.0f} |{rng} {r.p50:.0f} | {r.p90:.0f} "
            f"| {r.p99:.0f} | {r.max:.0f} | {r.errors} | {r.check} |"
        )
    print(
        "\nCPU during the measured window (ms of CPU per message; busy = share of all "
        f"{CORES} cores; procs > {CORES} oversubscribe the cores):\n"
    )
    print("| procs | machine busy | fleet | postgres | redis | bench | other | total |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        c, n = r.cpu, max(1, r.responses_seen + r.errors)
        if not c:
            continue

        def ms(name: str, c: dict[str, float] = c, n: int = n) -> str:
            return f"{1000 * c.get(name, 0.0) / n:.2f}"

        busy = 100 * c["machine"] / c["wall_cores"]
        print(
            f"| {r.procs} | {busy:.0f}% | {ms('fleet')} | {ms('postgres')} | {ms('redis')} | {ms('bench')} "
            f"| {ms('other')} | {ms('machine')} |"
        )
    for r in results:
        for p in r.problems:
            print(f"procs {r.procs}: MISMATCH: {p}")
    for r in results:
        if r.profile:
            print(f"\n### py-spy, procs {r.procs}\n\n{r.profile}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2,4,8", help="comma-separated fleet sizes (default 1,2,4,8)")
    parser.add_argument("--threads", type=int, default=1, help="consumer threads per worker (default 1)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per run (default 2000)")
    parser.add_argument(
        "--tool", action=argparse.BooleanOptionalAction, default=False, help='"list my models" (a platform tool)'
    )
    parser.add_argument("--warmup", type=int, default=100, help="messages answered before each measured run")
    parser.add_argument(
        "--conversations",
        type=int,
        default=0,
        help="spread the measured messages round-robin over this many existing conversations (instanceId set, "
        "history loaded); 0 (default): no instanceId, a new conversation per message",
    )
    parser.add_argument("--batch", type=int, default=100, help="messages per pipelined LPUSH batch (default 100)")
    parser.add_argument(
        "--closed-loop", type=int, default=200, help="closed-loop single messages with 1 worker (0: skip)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per fleet size; the table shows the median run (default 1)"
    )
    parser.add_argument("--stall", type=float, default=60.0, help="give up after this many seconds without a reply")
    parser.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    parser.add_argument(
        "--py-spy",
        dest="py_spy",
        metavar="PREFIX",
        help="sample the workers with py-spy during each measured run (writes PREFIX-procsN.txt, prints a summary; "
        "the sampler costs CPU: take throughput figures from runs without it)",
    )
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",") if p.strip()]
    if not procs or min(procs) < 1 or args.messages < 1:
        parser.error("--procs needs positive integers and --messages at least 1")

    print(f"machine: {machine_line()}")
    print(f"code: {code_version()}")
    if max(procs) > CORES:
        print(f"note: {CORES} cores: runs with more than {CORES} worker processes oversubscribe the CPU")
    with servers() as srv:
        client = redis.Redis.from_url(srv.redis_url, decode_responses=True)
        if not srv.private:
            if client.exists(STATUS) or any(True for _ in client.scan_iter(NODE_PREFIX + "*")):
                print("refusing to run: another worker fleet is alive on this Redis (bot_worker:status is set)")
                return 2
            if client.llen(MESSAGES):
                print("refusing to run: bot_messages is not empty on this Redis")
                return 2
        created = migrate(srv.database_url)
        print(f"schema ready ({len(created)} objects created)")

        closed = None
        if args.closed_loop > 0:
            print(f"closed loop: {args.closed_loop} single messages, 1 worker ...", flush=True)
            closed = closed_loop(srv, client, args)
        results: list[Result] = []
        every: list[Result] = []
        for n in procs:
            runs = []
            for k in range(args.repeat):
                label = f" (run {k + 1} of {args.repeat})" if args.repeat > 1 else ""
                print(
                    f"run: procs {n}, {args.messages} messages, tool {'on' if args.tool else 'off'}{label} ...",
                    flush=True,
                )
                r = run_once(srv, client, n, args)
                print(
                    f"  {r.seconds:.2f}s, {r.rate:.0f} msg/s, p50 {r.p50:.0f} ms, p99 {r.p99:.0f} ms, "
                    f"errors {r.errors}, {r.check}",
                    flush=True,
                )
                runs.append(r)
            every += runs
            median = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
            median.rates = sorted(r.rate for r in runs)
            median.check = "OK" if all(r.check == "OK" for r in runs) else "MISMATCH"
            median.problems = [p for r in runs for p in r.problems]
            results.append(median)
        if client.llen(DEAD) or client.scard(PROCESSING_SET):
            print(f"note: {client.llen(DEAD)} dead letter(s), {client.scard(PROCESSING_SET)} processing list(s) left")
        print_table(results, closed, args.tool, args.conversations)
        if args.json_out:
            out = {
                "machine": machine_line(),
                "code": code_version(),
                "tool": args.tool,
                "closed_loop": closed,
                "runs": [asdict(r) for r in every],
            }
            Path(args.json_out).write_text(json.dumps(out, indent=2))
        client.close()
    return 0 if all(r.check == "OK" for r in every) else 1


if __name__ == "__main__":
    sys.exit(main())
