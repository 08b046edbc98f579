#!/usr/bin/env python3
"""Chaos: a steady stream of messages through real fleets while workers, whole hosts, Redis and PostgreSQL are
killed in turn; then every message is checked by id: answered once, its two rows saved once.

    .venv/bin/python bench/chaos.py [--messages 3000] [--rate 30] [--only workers,tree,host,redis,postgres]
        [--procs 2] [--threads 8] [--delay 0.2] [--node-ttl 20] [--seed 1] [--keep]

It starts its own PostgreSQL, Redis (append-only file, ``appendfsync everysec``, as production should run it) and a
local server speaking Gemini's REST API that answers after --delay seconds (so workers always hold messages), all
on 127.0.0.1, then host A (``python -m botworker run``, ``NODE_NAME=host-a``, INFO logs in files: the trail of every
message id). A producer pushes --messages messages at --rate per second (a third run a platform tool) for as long as
the phases last, while, in turn (``--only`` picks phases):

1. ``workers``: a random worker of A (one holding messages, when there is one) is frozen, its processing lists read,
   and SIGKILLed, --worker-kills times: times to its messages back in line and answered;
2. ``tree``: A's whole tree (supervisor, workers, sandboxes) is frozen and SIGKILLed while it holds messages (so no
   worker can hand them back), and started again --tree-down seconds later; the new supervisor is a new node, so
   the old node's messages come back when its key expires (NODE_TTL);
3. ``host``: host B joins, and while it holds messages its whole tree dies for good; A puts them back in line once
   B's node key expires: times against NODE_TTL;
4. ``redis``: SIGKILLed and restarted at once (what the kernel had of the append-only file survives); SIGKILLed,
   the last --power-loss seconds of the append-only file dropped (a power loss with ``everysec``: what was
   acknowledged but not yet fsynced is gone) and restarted --redis-down seconds later; frozen (SIGSTOP) for
   --freeze seconds; the power loss again, restarted at once (last: no later outage may hide what it leaves).
   Times from the server answering again to the next reply (polling the reply lists);
5. ``postgres``: restarted (fast shutdown, --pg-down seconds down), and --pg-terminations times its workers'
   backends terminated (``pg_terminate_backend`` of every ``application_name`` botworker/botworker-tool).

The producer is a careful API server: after a broken connection it checks, once Redis answers again, that each push
acknowledged in the --confirm-window seconds before the break is still somewhere (the queue, a processing list,
the dead letters, a done key), and pushes the missing ones again with the same messageId (the worker drops a second
copy). Redis 7.0 has no WAITAOF (7.2+), which would confirm each push's fsync instead.

At the end (once every message has an event, or nothing moved for --stall seconds) it reads what is still in any
list while the fleet runs: those messages are stuck, not lost, so the fleet is stopped (its workers hand them back)
and a fresh host C answers them. Then it prints sent, answered, errored, dead-lettered, lost and doubled (by
messageId, in the event lists and in chat_messages rows; also what a live subscriber saw), the stuck ones, per phase
a table of recovery waits, the longest, the fleet's worker restarts, and the log trail of every lost, doubled or stuck
message. Exit status 1 if any was lost, doubled or stuck. Add --keep to keep the logs and data.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis
from host_failover import Host, held_by, wait
from llm_bound import SlowGemini
from redis.backoff import NoBackoff
from redis.retry import Retry

from botworker.demo import seed
from botworker.devservers import Server, start_postgres, start_redis
from botworker.queue import (
    DEAD,
    DONE_PREFIX,
    ERRORS,
    MESSAGES,
    NODE_PREFIX,
    PROCESSING_SET,
    RESPONSES,
    STATS,
    Connections,
)
from botworker.schema import migrate

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("workers", "tree", "host", "redis", "postgres")
NAN = float("nan")


def fast_client(url: str, decode: bool = True) -> redis.Redis:
    """The bench's own Redis client: fails fast (no silent retries) so that its loops see an outage as one."""
    return redis.Redis.from_url(url, decode_responses=decode, socket_timeout=1, socket_connect_timeout=1,
                                retry=Retry(NoBackoff(), 0))  # fmt: skip


# ---- what a live gateway sees: the pub/sub channels ------------------------------------------------------------


class Deliveries(threading.Thread):
    """Subscribed to bot_responses and bot_errors before anything is pushed; subscribes again whenever Redis comes
    back (events published meanwhile are missed: the lists are the record, this is the live view and its times)."""

    def __init__(self, url: str) -> None:
        super().__init__(name="deliveries", daemon=True)
        self.url = url
        self.cond = threading.Condition()
        self.first: dict[str, float] = {}  # message id -> first delivery (perf_counter)
        self.last: dict[str, float] = {}  # message id -> latest delivery
        self.count: Counter[tuple[str, str]] = Counter()  # (channel, message id) -> deliveries
        self.times: list[float] = []  # every delivery, in arrival order
        self.resubscribed = 0
        self._halt = threading.Event()
        self.pubsub = self._subscribe()

    def _subscribe(self) -> Any:
        pubsub = fast_client(self.url, decode=True).pubsub()
        pubsub.subscribe(RESPONSES, ERRORS)
        confirmed, deadline = 0, time.monotonic() + 5
        while confirmed < 2:  # both subscriptions confirmed: nothing published after this is missed
            msg = pubsub.get_message(timeout=0.5)
            confirmed += bool(msg and msg["type"] == "subscribe")
            if time.monotonic() > deadline:
                raise redis.ConnectionError("could not subscribe")
        return pubsub

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                msg = self.pubsub.get_message(timeout=0.2)
            except (redis.RedisError, OSError):
                with contextlib.suppress(Exception):
                    self.pubsub.close()
                while not self._halt.is_set():
                    try:
                        self.pubsub = self._subscribe()
                        self.resubscribed += 1
                        break
                    except (redis.RedisError, OSError):
                        time.sleep(0.05)
                continue
            if msg is None or msg["type"] != "message":
                continue
            now = time.perf_counter()
            try:
                mid = str(json.loads(msg["data"])["messageId"])
            except (ValueError, KeyError, TypeError):
                continue
            with self.cond:
                self.count[(msg["channel"], mid)] += 1
                self.first.setdefault(mid, now)
                self.last[mid] = now
                self.times.append(now)
                self.cond.notify_all()

    def next_after(self, t: float, timeout: float = 60.0) -> float:
        """Seconds from ``t`` to the first delivery after it (NaN if none within ``timeout``)."""
        with self.cond:
            self.cond.wait_for(lambda: bool(self.times) and self.times[-1] > t, timeout)
            i = bisect.bisect_right(self.times, t)
            return self.times[i] - t if i < len(self.times) else NAN

    def all_answered(self, ids: set[str], timeout: float) -> float:
        """Wait until each id has had a delivery; the latest first delivery among them (NaN on timeout)."""
        with self.cond:
            if not self.cond.wait_for(lambda: ids <= self.first.keys(), timeout):
                return NAN
            return max((self.first[m] for m in ids), default=NAN)

    def close(self) -> None:
        self._halt.set()
        self.join(5)


# ---- the producer: a steady stream, and a careful API server's check after Redis comes back --------------------


@dataclass
class Check:
    broken_at: float  # the first failed push
    candidates: int  # pushes acknowledged in the window before it
    missing: list[str]  # of those, found nowhere once Redis answered again: pushed again


class Producer(threading.Thread):
    """LPUSHes message i at ``start + i / rate`` (catching up after an outage); stops once ``done`` is set and at
    least ``total`` were sent."""

    def __init__(self, url: str, user_id: str, bot_id: str, rate: float, total: int, window: float) -> None:
        super().__init__(name="producer", daemon=True)
        # Counts its connections: redis-py replaces a dead pooled connection silently, so a Redis that restarted
        # between two pushes (and lost the last second of them) raises nothing; a new connection says it.
        self.connections = Connections()
        self.client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=1, socket_connect_timeout=1,
                                           retry=Retry(NoBackoff(), 0), redis_connect_func=self.connections)  # fmt: skip
        self.user_id, self.bot_id, self.rate, self.total, self.window = user_id, bot_id, rate, total, window
        self.bodies: dict[str, str] = {}
        self.pushed_at: dict[str, float] = {}  # message id -> its (first) push acknowledged
        self.checks: list[Check] = []
        self.push_failures = 0
        self.done = threading.Event()
        self.halt = threading.Event()

    def body(self, i: int) -> tuple[str, str]:
        mid = str(uuid.uuid4())
        text = f"list my models (#{i})" if i % 3 == 0 else f"hello from the chaos run, #{i}"
        return mid, json.dumps({"botId": self.bot_id, "userId": self.user_id, "message": text, "messageId": mid})

    def run(self) -> None:
        start = time.perf_counter()
        i, last_ok, broken_at = 0, start, None
        mid, body = self.body(0)
        self.client.ping()
        connections = self.connections.made
        while not (self.done.is_set() and i >= self.total) and not self.halt.is_set():
            delay = start + i / self.rate - time.perf_counter()
            if delay > 0:
                self.halt.wait(delay)
            try:
                self.client.lpush(MESSAGES, body)
            except redis.RedisError:
                # (Possibly executed, its reply lost: pushing it again may leave two copies, which the worker
                # must answer once.)
                self.push_failures += 1
                if broken_at is None:
                    broken_at, suspect_from = time.perf_counter(), last_ok - self.window
                self.halt.wait(0.05)
                continue
            now = time.perf_counter()
            if self.connections.made != connections and broken_at is None:  # reconnected without an error
                broken_at, suspect_from = last_ok + 1e-6, last_ok - self.window
            connections = self.connections.made
            self.bodies[mid], self.pushed_at[mid] = body, now
            last_ok, i = now, i + 1
            mid, body = self.body(i)
            if broken_at is not None:
                with contextlib.suppress(redis.RedisError):  # (Redis gone again: checked after the next push)
                    self._check(broken_at, suspect_from)
                    broken_at = None

    def _check(self, broken_at: float, since: float) -> None:
        """Which pushes acknowledged shortly before the break survived? Push the others again, same messageId."""
        ids = [m for m, t in self.pushed_at.items() if since <= t < broken_at]
        found = present(self.client, ids)
        missing = [m for m in ids if m not in found]
        if missing:
            pipe = self.client.pipeline(transaction=False)
            for m in missing:
                pipe.lpush(MESSAGES, self.bodies[m])
            pipe.execute()
        self.checks.append(Check(broken_at, len(ids), missing))


def present(client: redis.Redis, ids: list[str]) -> set[str]:
    """The ids found, in one MULTI snapshot, in the queue, a processing list, the dead letters, or as done."""
    if not ids:
        return set()
    names = sorted(client.smembers(PROCESSING_SET))
    pipe = client.pipeline(transaction=True)
    for name in [MESSAGES, DEAD, *names]:
        pipe.lrange(name, 0, -1)
    for mid in ids:
        pipe.exists(DONE_PREFIX + mid)
    replies = pipe.execute()
    lists, done = replies[: len(names) + 2], replies[len(names) + 2 :]
    blob = "\n".join(raw for entries in lists for raw in entries)
    return {m for m, d in zip(ids, done, strict=True) if d or m in blob}


# ---- disruptions ---------------------------------------------------------------------------------------------


@dataclass
class Disruption:
    phase: str
    what: str
    at: float  # perf_counter of the kill / stop / termination
    waits: dict[str, float] = field(default_factory=dict)  # label -> seconds (NaN: did not happen in time)
    notes: dict[str, Any] = field(default_factory=dict)
    recovery: str = ""  # the label of the wait that counts as this disruption's recovery


class AofTail(threading.Thread):
    """Samples the size of Redis's append-only file (the incremental file the manifest names) every 20 ms, so
    that a simulated power loss can drop exactly what was written in its last seconds."""

    def __init__(self, redis_dir: Path) -> None:
        super().__init__(name="aof-tail", daemon=True)
        self.dir = redis_dir / "appendonlydir"
        self.samples: list[tuple[float, str, int]] = []
        self.lock = threading.Lock()
        self._halt = threading.Event()

    def current(self) -> Path | None:
        try:
            manifest = (self.dir / "appendonly.aof.manifest").read_text().splitlines()
        except OSError:
            return None
        incr = [line.split()[1] for line in manifest if line.endswith("type i")]
        return self.dir / incr[-1] if incr else None

    def run(self) -> None:
        while not self._halt.wait(0.02):
            path = self.current()
            with contextlib.suppress(OSError):
                if path is not None:
                    size = path.stat().st_size
                    with self.lock:
                        self.samples.append((time.perf_counter(), str(path), size))
                        del self.samples[:-1000]

    def drop_since(self, t: float) -> tuple[int, float]:
        """Truncate the file to its size at ``t`` (Redis is dead): the bytes dropped, and the time of the sample
        cut to (what Redis wrote after it is gone)."""
        with self.lock:
            before = [s for s in self.samples if s[0] <= t]
        if not before:
            return 0, t
        at, path, size = before[-1]
        now = os.stat(path).st_size
        if now > size:
            os.truncate(path, size)  # (mid-command: Redis's aof-load-truncated loads up to the last whole one)
        return max(0, now - size), at

    def close(self) -> None:
        self._halt.set()
        self.join(2)


@dataclass
class Chaos:
    """Everything the phases share."""

    args: argparse.Namespace
    work: Path
    env: dict[str, str]
    client: redis.Redis
    pg: Server
    rs: Server
    deliveries: Deliveries
    producer: Producer
    aof: AofTail
    rng: random.Random
    hosts: list[tuple[str, Host, Path]] = field(default_factory=list)  # every tree started: label, host, log
    main: Host | None = None
    main_node: str = ""
    disruptions: list[Disruption] = field(default_factory=list)
    redis_kills: list[tuple[float, float]] = field(default_factory=list)  # (kill, dropped-since) of each kill

    def start_host(self, label: str, name: str) -> tuple[Host, str]:
        log = self.work / f"{label}.log"
        host = Host(name, self.args, self.env, log)
        self.hosts.append((label, host, log))
        node = host.wait_ready(self.client)
        return host, node

    def holding(self, node: str, at_least: int = 1, timeout: float = 10.0) -> bool:
        return wait(lambda: sum(map(len, held_by(self.client, node).values())) >= at_least, timeout, 0.02)

    def lists_empty(self, names: list[str], timeout: float) -> bool:
        def empty() -> bool:
            try:
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.llen(name)
                return not any(pipe.execute())
            except redis.RedisError:
                return False

        return wait(empty, timeout, 0.005)

    def watch_empty(self, names: list[str], since: float, timeout: float) -> tuple[threading.Thread, list[float]]:
        """In the background (so that restarting a tree meanwhile does not delay the reading): seconds from
        ``since`` until the lists are empty, in the returned list once the thread is done."""
        out: list[float] = []

        def watch() -> None:
            out.append(time.perf_counter() - since if self.lists_empty(names, timeout) else NAN)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread, out

    def settle(self, seconds: float = 2.0) -> None:
        time.sleep(seconds)


def worker_pids(client: redis.Redis, node: str) -> list[int]:
    """The node's live workers (its key, refreshed every 2 s, may still name one killed a moment ago)."""
    raw = client.get(NODE_PREFIX + node)
    return [w["pid"] for w in json.loads(raw or "{}").get("workers", []) if alive(w["pid"])]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def busy_workers(c: Chaos) -> list[int]:
    """Pids of host A's workers with a processing list holding a message right now."""
    lists = held_by(c.client, c.main_node)
    return [p for p in worker_pids(c.client, c.main_node) if any(m for n, m in lists.items() if f":{p}:" in n)]


def phase_workers(c: Chaos) -> None:
    """Random workers of A SIGKILLed, preferring one that holds messages."""
    for k in range(c.args.worker_kills):
        time.sleep(c.rng.uniform(1.0, 2.0))
        wait(lambda: bool(busy_workers(c)), 3.0, 0.02)
        pids = busy_workers(c) or worker_pids(c.client, c.main_node)
        victim = c.rng.choice(pids)
        try:
            os.kill(victim, signal.SIGSTOP)  # frozen: it can neither ack nor hand back what we count now
        except ProcessLookupError:
            print(f"  kill {k + 1}: worker pid {victim} gone before the kill: skipped", flush=True)
            continue
        lists = {n: m for n, m in held_by(c.client, c.main_node).items() if f":{victim}:" in n}
        held = {m for mids in lists.values() for m in mids}
        os.kill(victim, signal.SIGKILL)
        d = Disruption("workers", f"kill {k + 1}: worker pid {victim}", time.perf_counter(), recovery="back in line")
        d.notes["held"] = len(held)
        if held:
            d.waits["back in line"] = time.perf_counter() - d.at if c.lists_empty(list(lists), 30) else NAN
            d.waits["last held answered"] = c.deliveries.all_answered(held, 60) - d.at
        c.disruptions.append(d)
        print(f"  {d.what}: held {len(held)}, {fmt_waits(d)}", flush=True)


def kill_tree_holding(c: Chaos, host: Host, node: str) -> tuple[float, dict[str, list[str]]]:
    """Once ``host`` holds messages and at a random point of its node key's refresh cycle: its whole tree frozen
    and SIGKILLed. The kill's time, and what its processing lists held."""
    c.holding(node)
    time.sleep(c.rng.uniform(0.0, 2.0))
    c.holding(node)
    host.kill_tree()
    at = time.perf_counter()
    time.sleep(0.3)  # a pop Redis was serving when the tree died lands in its lists: count it too
    return at, {n: m for n, m in held_by(c.client, node).items() if m}


def phase_tree(c: Chaos) -> None:
    """A's whole tree SIGKILLed and started again."""
    assert c.main is not None
    old = c.main_node
    at, lists = kill_tree_holding(c, c.main, old)
    held = {m for mids in lists.values() for m in mids}
    d = Disruption("tree", "host A's tree SIGKILLed, restarted", at, recovery="back in line")
    d.notes["held"] = len(held)
    watcher, back = c.watch_empty(list(lists), at, c.args.node_ttl + 30)
    time.sleep(max(0.0, c.args.tree_down - (time.perf_counter() - at)))
    restarted = time.perf_counter()
    c.main, c.main_node = c.start_host(f"host-a-{len(c.hosts) + 1}", "host-a")
    d.waits["new tree's workers all ready"] = time.perf_counter() - at
    d.waits["first answer"] = restarted - at + c.deliveries.next_after(restarted)
    watcher.join()
    d.waits["back in line"] = back[0]
    d.waits["last held answered"] = c.deliveries.all_answered(held, 60) - at if held else NAN
    c.disruptions.append(d)
    print(f"  {d.what}: held {len(held)}, {fmt_waits(d)} (NODE_TTL {c.args.node_ttl:g}s)", flush=True)


def phase_host(c: Chaos) -> None:
    """Host B joins, then dies for good while holding messages; A takes them over."""
    b, node_b = c.start_host("host-b", "host-b")
    at, lists = kill_tree_holding(c, b, node_b)
    held = {m for mids in lists.values() for m in mids}
    d = Disruption("host", "host B's tree SIGKILLed for good", at, recovery="back in line")
    d.notes["held"] = len(held)
    d.waits["back in line"] = time.perf_counter() - at if c.lists_empty(list(lists), c.args.node_ttl + 30) else NAN
    d.waits["last held answered"] = c.deliveries.all_answered(held, 60) - at if held else NAN
    c.disruptions.append(d)
    print(f"  {d.what}: held {len(held)}, {fmt_waits(d)} (NODE_TTL {c.args.node_ttl:g}s)", flush=True)


def replies(client: redis.Redis) -> int:
    try:
        pipe = client.pipeline(transaction=False)
        pipe.llen(RESPONSES)
        pipe.llen(ERRORS)
        return sum(pipe.execute())
    except redis.RedisError:
        return -1


def next_reply(client: redis.Redis, timeout: float = 60.0) -> float:
    """Seconds until the reply lists grow (polled every 5 ms: the subscriber may still be reconnecting)."""
    started = time.perf_counter()
    count = -1
    while count < 0 and time.perf_counter() - started < timeout:
        count = replies(client)
    while time.perf_counter() - started < timeout:
        if replies(client) > count:
            return time.perf_counter() - started
        time.sleep(0.005)
    return NAN


def phase_redis(c: Chaos) -> None:
    """Redis SIGKILLed and restarted at once; SIGKILLed with a power loss's tail dropped, restarted at once and
    after --redis-down seconds; frozen."""
    c.aof.start()
    time.sleep(max(2.0, c.args.power_loss + 1))  # (samples reaching back past the window)
    loss = c.args.power_loss
    # (what, seconds of AOF dropped, seconds down; None: frozen instead of killed)
    kinds: list[tuple[str, float, float | None]] = [
        ("SIGKILL, restarted at once", 0.0, 0.0),
        (f"SIGKILL, last {loss:g}s of AOF dropped, {c.args.redis_down:g}s down", loss, c.args.redis_down),
        (f"frozen (SIGSTOP) {c.args.freeze:g}s", 0.0, None),
        # Last: a consumer that saw no error at all (a pooled connection silently re-opened) does not look for a
        # lost ack in its list, and no later Redis outage must hide that.
        (f"SIGKILL, last {loss:g}s of AOF dropped, restarted at once", loss, 0.0),
    ]
    for what, drop, down in kinds:
        c.rs.proc.send_signal(signal.SIGSTOP)  # nothing more written from here: what we drop is exact
        at = time.perf_counter()
        d = Disruption("redis", what, at, recovery="back → next answer")
        if down is None:
            time.sleep(c.args.freeze)
            c.rs.proc.send_signal(signal.SIGCONT)
        else:
            c.rs.proc.kill()
            c.rs.proc.wait()
            dropped, cut = c.aof.drop_since(at - drop) if drop else (0, at)
            d.notes["AOF bytes dropped"] = dropped
            c.redis_kills.append((at, cut))
            time.sleep(down)
            c.rs.start_again()
        back = time.perf_counter()
        d.waits["down"] = back - at
        d.waits["back → next answer"] = next_reply(c.client)
        c.disruptions.append(d)
        print(f"  {d.what}: {fmt_waits(d)} {d.notes or ''}", flush=True)
        c.settle(3.0)
    c.aof.close()


def phase_postgres(c: Chaos) -> None:
    """PostgreSQL restarted; then its workers' backends terminated, a few times."""
    at = time.perf_counter()
    c.pg.stop()
    time.sleep(c.args.pg_down)
    c.pg.start_again()
    back = time.perf_counter()
    d = Disruption("postgres", f"restarted ({c.args.pg_down:g}s down)", at, recovery="back → next answer")
    d.waits["down"] = back - at
    d.waits["back → next answer"] = c.deliveries.next_after(back)
    c.disruptions.append(d)
    print(f"  {d.what}: {fmt_waits(d)}", flush=True)
    for k in range(c.args.pg_terminations):
        c.settle(3.0)
        with psycopg.connect(c.pg.url, autocommit=True) as conn:
            at = time.perf_counter()
            row = conn.execute("""SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity
                                  WHERE application_name IN ('botworker', 'botworker-tool')
                                    AND pid <> pg_backend_pid()) t WHERE ok""").fetchone()  # fmt: skip
        d = Disruption("postgres", f"backends terminated ({k + 1})", at, recovery="→ next answer")
        d.notes["backends"] = row[0] if row else 0
        d.waits["→ next answer"] = c.deliveries.next_after(at)
        c.disruptions.append(d)
        print(f"  {d.what}: {d.notes['backends']} backends, {fmt_waits(d)}", flush=True)


RUN = {"workers": phase_workers, "tree": phase_tree, "host": phase_host, "redis": phase_redis,
       "postgres": phase_postgres}  # fmt: skip


def fmt_waits(d: Disruption) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in d.waits.items())


# ---- the verdict ---------------------------------------------------------------------------------------------


def log_lines(c: Chaos) -> list[tuple[str, str]]:
    out = []
    for label, _, path in c.hosts:
        with contextlib.suppress(OSError):
            out += [(label, line.rstrip()) for line in path.read_text(errors="replace").splitlines()]
    return out


def restarts(c: Chaos) -> tuple[int, Counter[str]]:
    """Workers respawned by their supervisor (spawned beyond the first --procs of each tree), and why they died."""
    spawned, reasons = 0, Counter[str]()
    for _, _, path in c.hosts:
        text = path.read_text(errors="replace") if path.exists() else ""
        spawned += max(0, text.count("spawned worker") - c.args.procs)
        for how in re.findall(r"worker \d+ \(pid \d+\) (killed by \w+|exited with status [1-9]\d*) after", text):
            reasons[how] += 1
        reasons["silent: killed as hung"] += text.count("silent for")
    return spawned, reasons


def trail(lines: list[tuple[str, str]], mid: str, limit: int = 20) -> list[str]:
    hits = [f"    {label}: {line[:220]}" for label, line in lines if mid in line]
    return hits[:limit] + ([f"    ... {len(hits) - limit} more"] if len(hits) > limit else [])


def verdict(c: Chaos, user_id: str, leftovers: dict[str, list[str]]) -> bool:
    p = c.producer
    sent = set(p.pushed_at)
    client = c.client
    responses = Counter(json.loads(e)["messageId"] for e in client.lrange(RESPONSES, 0, -1))
    error_events = [json.loads(e) for e in client.lrange(ERRORS, 0, -1)]
    errors = Counter(e["messageId"] for e in error_events)
    codes = Counter(e.get("code") for e in error_events)
    dead = {json.loads(e).get("messageId") for e in client.lrange(DEAD, 0, -1)}
    with psycopg.connect(c.pg.url) as conn:
        rows = conn.execute("""SELECT metadata->>'messageId', role::text, count(*) FROM chat_messages
                               WHERE "userId" = %s GROUP BY 1, 2""", (user_id,)).fetchall()  # fmt: skip
    per_id: dict[str, Counter[str]] = {}
    for mid, role, n in rows:
        per_id.setdefault(mid, Counter())[role] += n
    answered = {m for m in sent if responses[m]}
    errored = {m for m in sent if errors[m] and m not in dead}
    no_event = sorted(m for m in sent if not responses[m] and not errors[m])
    none: Counter[str] = Counter()
    rows_missing = sorted(m for m in answered if per_id.get(m, none)["user"] < 1 or per_id.get(m, none)["bot"] < 1)
    doubled_events = sorted(m for m in sent if responses[m] > 1 or errors[m] > 1)
    doubled_rows = sorted(m for m in sent if any(n > 1 for n in per_id.get(m, none).values()))
    strangers = sorted(set(per_id) - sent)
    live_twice = sorted({m for (_, m), n in c.deliveries.count.items() if n > 1})
    stats = client.hgetall(STATS)
    lines = log_lines(c)

    def count(pattern: str) -> int:
        return sum(1 for _, line in lines if pattern in line)

    print(f"\nsent {len(sent)} (distinct messageIds; pushes that failed and were retried: {p.push_failures}), "
          f"answered {len(answered)}, errored {len(errored)} {dict(codes) if codes else ''}, "
          f"dead-lettered {len(dead & sent)}")  # fmt: skip
    print(f"lost {len(no_event) + len(rows_missing)} (no event: {len(no_event)}; an event but not its 2 rows: "
          f"{len(rows_missing)}), doubled {len(set(doubled_events) | set(doubled_rows))} (events: "
          f"{len(doubled_events)}; rows: {len(doubled_rows)}); rows of unknown ids: {len(strangers)}")  # fmt: skip
    stuck = sorted({m for ids in leftovers.values() for m in ids})
    print(f"still in a list once everything else was answered (the fleet running): {len(stuck)}", end="")
    print(f" {leftovers}; answered after the fleet's stop handed them back: {sum(1 for m in stuck if responses[m])}"
          if stuck else "")  # fmt: skip
    for chk in p.checks:
        print(f"producer after a break: {chk.candidates} pushes of the {c.args.confirm_window:g}s before it "
              f"checked, {len(chk.missing)} missing and pushed again")  # fmt: skip
    print(f"live (pub/sub) view: {len(live_twice)} ids delivered more than once, {c.deliveries.resubscribed} "
          f"re-subscriptions; stats {stats}")  # fmt: skip
    print(f"fleet logs: {count(', replayed)')} answers replayed from saved rows, {count('duplicate dropped')} "
          f"copies dropped as already answered, {count('recovered by someone else')} settles refused (no longer "
          f"in the list), {count('after a lost connection')} lists reclaimed after a lost connection, "
          f"{count('retrying when the database answers')} attempts retried for the database")  # fmt: skip

    # Live duplicates: a reply published, then its ack lost with the append-only file's tail, the message taken
    # again and its saved rows replayed (one event in the list, two on the channel). Count those that fit.
    in_tail = {m for m in live_twice if any(cut <= c.deliveries.first.get(m, NAN) <= k
                                            for k, cut in c.redis_kills)}  # fmt: skip
    if live_twice:
        print(f"  of those, first delivered inside the AOF tail a simulated power loss dropped: {len(in_tail)}")
    for m in stuck:
        kill = max((k for k, _ in c.redis_kills if k < c.deliveries.last.get(m, NAN)), default=NAN)
        print(f"  stuck {m}: answered in the list {c.deliveries.last.get(m, NAN) - kill:.1f}s after the last Redis "
              f"kill before it")  # fmt: skip

    for title, ids, most in (("stuck in a list", stuck, 8), ("no event", no_event, 8),
                             ("event without its rows", rows_missing, 8),
                             ("doubled event", doubled_events, 8), ("doubled rows", doubled_rows, 8),
                             ("delivered twice live, outside a dropped tail", sorted(set(live_twice) - in_tail), 8),
                             ("delivered twice live (first inside a dropped tail)", sorted(in_tail), 1)):  # fmt: skip
        for mid in ids[:most]:
            pushed = p.pushed_at.get(mid, NAN)
            near = [f"{pushed - k:+.2f}s from a Redis kill" for k, _ in c.redis_kills if abs(pushed - k) < 5]
            first = c.deliveries.first.get(mid)
            near_ans = [f"first delivered {first - k:+.2f}s from a Redis kill" for k, _ in c.redis_kills
                        if first is not None and abs(first - k) < 5]  # fmt: skip
            print(f"\n  {title}: {mid} (responses {responses[mid]}, errors {errors[mid]}, rows "
                  f"{dict(per_id.get(mid, {}))}; pushed {', '.join(near) or 'away from any Redis kill'}"
                  f"{'; ' + ', '.join(near_ans) if near_ans else ''})")  # fmt: skip
            print("\n".join(trail(lines, mid)))
        if len(ids) > most:
            print(f"  ... and {len(ids) - most} more {title}")
    return not (no_event or rows_missing or doubled_events or doubled_rows or leftovers)


def worst(item: tuple[float, Disruption]) -> float:
    """A recovery that did not happen in time (NaN) is the worst of all."""
    return float("inf") if item[0] != item[0] else item[0]


def report(c: Chaos) -> None:
    for phase in PHASES:
        ds = [d for d in c.disruptions if d.phase == phase]
        if not ds:
            continue
        labels = list(dict.fromkeys(k for d in ds for k in d.waits))
        notes = list(dict.fromkeys(k for d in ds for k in d.notes))
        print(f"\n{phase}:\n\n| disruption | {' | '.join(notes + [f'{k} (s)' for k in labels])} |")
        print(f"|---|{'---:|' * (len(notes) + len(labels))}")
        for d in ds:
            cells = [str(d.notes.get(k, "")) for k in notes] + [f"{d.waits[k]:.2f}" if k in d.waits else "" for k in
                                                                 labels]  # fmt: skip
            print(f"| {d.what} | {' | '.join(cells)} |")
    recov = [(d.waits.get(d.recovery, NAN), d) for d in c.disruptions if d.recovery in d.waits]
    if recov:
        print("\nlongest recovery wait per phase (seconds; what counts: workers/tree/host kill → back in line, "
              "redis/postgres → next answer):")  # fmt: skip
        for phase in PHASES:
            mine = [(v, d) for v, d in recov if d.phase == phase]
            if mine:
                v, d = max(mine, key=worst)
                print(f"  {phase}: {v:.2f} ({d.what})")
        v, d = max(recov, key=worst)
        print(f"  longest: {v:.2f}s ({d.phase}: {d.what}){' (nan: did not happen in time)' if v != v else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000, help="at least this many are sent")
    parser.add_argument("--rate", type=float, default=30.0, help="messages per second")
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases, comma-separated: {','.join(PHASES)}")
    parser.add_argument("--procs", type=int, default=2, help="worker processes per host")
    parser.add_argument("--threads", type=int, default=8, help="consumer threads per worker process")
    parser.add_argument("--delay", type=float, default=0.2, help="seconds each model reply takes (0: offline)")
    parser.add_argument("--node-ttl", type=float, default=20.0, help="NODE_TTL (production's default)")
    parser.add_argument("--max-attempts", type=int, default=3, help="MAX_ATTEMPTS (production's default)")
    parser.add_argument("--worker-kills", type=int, default=6)
    parser.add_argument("--tree-down", type=float, default=1.0, help="seconds before the killed tree restarts")
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays down after a power loss")
    parser.add_argument("--power-loss", type=float, default=1.0, help="seconds of AOF a power loss drops")
    parser.add_argument("--freeze", type=float, default=4.0, help="seconds Redis stays frozen")
    parser.add_argument("--pg-down", type=float, default=3.0)
    parser.add_argument("--pg-terminations", type=int, default=2)
    parser.add_argument("--confirm-window", type=float, default=2.0,
                        help="pushes this many seconds before a broken connection are checked")  # fmt: skip
    parser.add_argument("--stall", type=float, default=45.0, help="give up waiting once nothing moved this long")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = parser.parse_args()
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phase(s): {', '.join(sorted(unknown))}")

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="botworker-chaos-"))
    work.chmod(0o755)  # PostgreSQL runs as nobody when we are root
    pg = start_postgres(work)
    rs = start_redis(work, appendonly=True)
    gemini = SlowGemini(args.delay) if args.delay > 0 else None
    if gemini is not None:
        gemini.httpd.handle_error = lambda request, address: None  # (a killed tree hangs up mid-reply)
    c: Chaos | None = None
    ok = False
    try:
        migrate(pg.url)
        user_id, bot_id = seed(pg.url, str(uuid.uuid4()), str(uuid.uuid4()))
        env = {**os.environ, "REDIS_URL": rs.url, "DATABASE_URL": pg.url, "LOG_LEVEL": "INFO",
               "SANDBOX_ROOT": str(work / "sandbox"), "PYTHONPATH": str(ROOT), "NODE_TTL": f"{args.node_ttl:g}",
               "MAX_ATTEMPTS": str(args.max_attempts)}  # fmt: skip
        if gemini is not None:
            env |= {"GEMINI_KEY": "bench-key", "GEMINI_BASE_URL": gemini.url}
        client = fast_client(rs.url)
        deliveries = Deliveries(rs.url)
        deliveries.start()
        producer = Producer(rs.url, user_id, bot_id, args.rate, args.messages, args.confirm_window)
        c = Chaos(args, work, env, client, pg, rs, deliveries, producer, AofTail(work / "redis"),
                  random.Random(args.seed))  # fmt: skip
        c.main, c.main_node = c.start_host("host-a-1", "host-a")
        print(f"{args.procs} processes x {args.threads} threads per host, replies wait {args.delay:g}s on the model, "
              f"{args.rate:g} msgs/s (a third with a tool), NODE_TTL {args.node_ttl:g}s, MAX_ATTEMPTS "
              f"{args.max_attempts}; phases: {', '.join(phases)}; work dir {work}", flush=True)  # fmt: skip
        producer.start()
        wait(lambda: len(deliveries.first) >= 20, 30)
        for phase in PHASES:
            if phase in phases:
                print(f"{time.perf_counter() - began:6.1f}s phase {phase}", flush=True)
                RUN[phase](c)
                c.settle(2.0)
        producer.done.set()
        print(f"{time.perf_counter() - began:6.1f}s phases over; the producer finishes its {args.messages}", flush=True)
        producer.join()

        # Wait for every message to be settled (or for nothing to move for --stall seconds).
        sent = set(producer.pushed_at)
        last, moved = -1, time.perf_counter()
        while time.perf_counter() - moved < args.stall:
            seen = len(sent & deliveries.first.keys())
            idle = client.llen(MESSAGES) == 0 and not any(client.llen(n) for n in client.smembers(PROCESSING_SET))
            if seen == len(sent) and idle:
                break
            if seen != last:
                last, moved = seen, time.perf_counter()
            time.sleep(0.5)
        time.sleep(1.0)  # (a copy pushed twice may still be in hand)
        # What is left in any list while the fleet still runs (its stop would hand in-hand messages back).
        leftovers = {n: held for n in [MESSAGES, *sorted(client.smembers(PROCESSING_SET))]
                     if (held := [json.loads(r).get("messageId", "?") for r in client.lrange(n, 0, -1)])}  # fmt: skip
        for _, host, _ in c.hosts:
            host.stop()  # (a warm stop: each worker hands back what its lists still hold)
        if leftovers:
            # Not lost while the lists hold them: a fresh host answers them now, and the verdict says how long
            # they waited.
            stuck = {m for ids in leftovers.values() for m in ids}
            print(f"{time.perf_counter() - began:6.1f}s {len(stuck)} message(s) were still in lists while the fleet "
                  f"ran: {leftovers}; the fleet stopped (handing them back), host C answers them", flush=True)  # fmt: skip
            late, _ = c.start_host("host-c", "host-c")
            deliveries.all_answered(stuck, 60)
            late.stop()
        print(f"{time.perf_counter() - began:6.1f}s done", flush=True)
        ok = verdict(c, user_id, leftovers)
        report(c)
        spawned, reasons = restarts(c)
        trees = sum(1 for label, _, _ in c.hosts if label.startswith("host-a")) - 1
        print(f"\nworker restarts (respawned by their supervisor): {spawned} {dict(reasons)}; trees restarted by "
              f"the bench: {trees}; whole run {time.perf_counter() - began:.0f}s")  # fmt: skip
        return 0 if ok else 1
    finally:
        if c is not None:
            c.producer.halt.set()
            c.deliveries.close()
            for _, host, _ in c.hosts:
                with contextlib.suppress(Exception):
                    host.stop()
        if gemini is not None:
            gemini.close()
        rs.stop()
        pg.stop()
        if args.keep or not ok:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
