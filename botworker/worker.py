"""One worker process: connect after the fork, then run WORKER_THREADS consumer threads until told to stop.

What the threads share is opened here, once per process: one Redis client (its pool gives each blocked pop a
connection of its own), one PostgreSQL pool sized to the database work (a connection is held only while loading
or saving, never across an LLM or tool wait), one pipeline (one Gemini client, one HTTP session), and one sandbox
process serving up to SANDBOX_CONCURRENCY runs at a time, started at the first sandboxed run. What each thread
does with a message is in ``consumer.py``.

Signals: SIGTERM asks for a warm stop (every thread finishes its current message, then the process exits 0);
SIGINT, SIGHUP, SIGTTIN and SIGTTOU are the supervisor's, ignored here. Handlers only record. A consumer thread
that dies of a bug stops the process (exit 1, after the others finish): the supervisor requeues and respawns.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from multiprocessing.sharedctypes import RawArray, RawValue
from typing import Any

import redis

from sandbox.client import SandboxClient, SandboxError

from . import errors, metrics
from .config import Config
from .consumer import SERVER_POLL, Consumer
from .errors import BootError, TransientError
from .llm import make_responder
from .logs import set_title
from .pipeline import Pipeline
from .queue import Connections, ReliableQueue, certificate_refused, connect, processing_key
from .slots import CpuSlots
from .store import Store
from .tools import registry

log = logging.getLogger(__name__)

_BEAT, _PROCESSED, _BUSY_SINCE = 0, 1, 2
_CELLS = 3


def resident_mib() -> float:
    """This process's resident memory in MiB (its own: not its sandbox process's)."""
    return (metrics.resident_bytes() or 0) / (1 << 20)


class Heartbeat:
    """A few shared doubles per consumer thread that the worker writes and the supervisor reads: last beat,
    messages done, busy since.

    Created by the supervisor just before the fork (anonymous shared memory, not a connection). CLOCK_MONOTONIC
    is system-wide on Linux, so both sides compare the same clock. Each thread writes only its own cells: a thread
    says which they are once (``attach``); a thread that never did (the main one) writes thread 0's.
    """

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._cells = RawArray("d", _CELLS * threads)
        self._ready = RawValue("b", 0)  # set once the worker's connections are open
        self._local = threading.local()
        now = time.monotonic()
        for t in range(threads):
            self._cells[t * _CELLS + _BEAT] = now

    def attach(self, thread: int) -> None:
        """The calling thread writes the cells of consumer ``thread`` from now on."""
        self._local.base = thread * _CELLS

    def _base(self) -> int:
        return getattr(self._local, "base", 0)

    def mark_ready(self) -> None:
        self._ready.value = 1

    @property
    def ready(self) -> bool:
        return bool(self._ready.value)

    def beat(self) -> None:
        self._cells[self._base() + _BEAT] = time.monotonic()

    def count(self) -> None:
        self._cells[self._base() + _PROCESSED] += 1

    def busy(self, on: bool) -> None:
        self._cells[self._base() + _BUSY_SINCE] = time.monotonic() if on else 0.0

    def _column(self, cell: int) -> list[float]:
        return [self._cells[t * _CELLS + cell] for t in range(self.threads)]

    def age(self) -> float:
        """Seconds since the quietest thread last beat: one stuck thread makes the whole worker stuck."""
        return time.monotonic() - min(self._column(_BEAT))

    @property
    def processed(self) -> int:
        return int(sum(self._column(_PROCESSED)))

    @property
    def busy_for(self) -> float:
        """How long the longest-busy thread has held its message (0 when every thread is idle)."""
        since = [s for s in self._column(_BUSY_SINCE) if s]
        return time.monotonic() - min(since) if since else 0.0

    @property
    def busy_threads(self) -> int:
        return sum(1 for s in self._column(_BUSY_SINCE) if s)

    def each(self) -> list[dict[str, float]]:
        """Every thread's progress: messages done, seconds busy with the current one (0: idle), since its beat."""
        now = time.monotonic()
        cells = zip(self._column(_PROCESSED), self._column(_BUSY_SINCE), self._column(_BEAT), strict=True)
        return [
            {
                "processed": int(done),
                "busyFor": round(now - since, 1) if since else 0.0,
                "beatAge": round(now - beat, 1),
            }
            for done, since, beat in cells
        ]


class Worker:
    """One worker process. ``run()`` returns the process's exit code."""

    def __init__(self, cfg: Config, wid: int, node_id: str, heartbeat: Heartbeat, first_boot: bool = True) -> None:
        self.cfg = cfg
        self.wid = wid
        self.node_id = node_id
        self.heartbeat = heartbeat
        # This worker's own MAX_REQUESTS (0: none), with its jitter: workers started together recycle apart.
        self.request_limit = cfg.max_requests + random.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        self._memory_checked = 0.0
        # BOOT_TIMEOUT bounds the node's first boot only: a worker respawned later (one died during an outage,
        # say) waits for the servers as long as it takes, so that one respawn never stops the fleet.
        self.first_boot = first_boot
        self.ppid = os.getppid()
        self.stopping = False
        self.redis: redis.Redis
        self.store: Store
        self.pipeline: Pipeline
        self.sandbox: SandboxClient
        self.consumers: list[Consumer] = []
        self.connections = Connections()  # the Redis client's connections made: see queue.Connections
        self._recycling = threading.Lock()

    # ---- life cycle ----------------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if self.cfg.metrics_port:
            metrics.start_recording()
        try:
            self.init_process()
        except BootError as exc:
            if self.stopping:
                log.info("worker %s stopped before Redis and PostgreSQL answered", self.wid)
                return errors.EXIT_OK
            log.error("worker %s cannot boot: %s", self.wid, exc)
            return errors.EXIT_WORKER_BOOT
        self.heartbeat.mark_ready()
        if self.cfg.max_worker_memory and (rss := resident_mib()) > self.cfg.max_worker_memory:
            log.warning("worker %s starts at %.0f MiB, over MAX_WORKER_MEMORY=%d: it recycles after every message",
                        self.wid, rss, self.cfg.max_worker_memory)  # fmt: skip
        log.info("worker %s ready (pid %d, %d thread(s))", self.wid, os.getpid(), len(self.consumers))
        try:
            return self._serve()
        finally:
            self._close()

    def _serve(self) -> int:
        """Run the consumers in threads of their own; the main thread watches (signals are delivered to it)."""
        threads = [
            threading.Thread(target=self._consume, args=(n, c), name=f"consumer-{n}", daemon=True)
            for n, c in enumerate(self.consumers)
        ]
        for thread in threads:
            thread.start()
        code = errors.EXIT_OK
        while any(t.is_alive() for t in threads):
            next(t for t in threads if t.is_alive()).join(0.25)
            self._show_state()
            metrics.flush()
            if self._should_stop():
                continue
            if os.getppid() != self.ppid:
                log.warning("worker %s: supervisor is gone, stopping", self.wid)
                self.stopping = True
            elif not all(t.is_alive() for t in threads):
                log.error("worker %s: a consumer thread died; stopping the process", self.wid)
                self.stopping, code = True, errors.EXIT_ERROR
        return code

    def _show_state(self) -> None:
        """The process title: ``worker 2 idle (1204 handled)``, ``worker 2 busy <id>``, ``worker 2 busy 3/16 <id>``."""
        held = [c.current for c in self.consumers if c.current]
        if self.stopping:
            state = f"stopping, {len(held)} message(s) in hand"
        elif not held:
            state = f"idle ({self.handled} handled)"
        elif len(self.consumers) == 1:
            state = f"busy {held[0]}"
        else:
            state = f"busy {len(held)}/{len(self.consumers)} {held[0]}"
        set_title(f"worker {self.wid} {state}")

    def _should_stop(self) -> bool:
        """Asked by each consumer before it takes a message: a warm stop, or time to recycle: its MAX_REQUESTS
        (with jitter) reached, or its resident memory past MAX_WORKER_MEMORY (checked at most once a second, once it
        has handled a message). With T threads, up to T-1 messages more may be taken meanwhile: each finishes."""
        with self._recycling:
            if not self.stopping and self.request_limit and self.handled >= self.request_limit:
                log.info("worker %s recycling after %d messages", self.wid, self.handled)
                self.stopping = True
            # (Only after some work: a worker born over the limit would otherwise be replaced in a loop.)
            memory_due = time.monotonic() - self._memory_checked >= 1.0 and self.handled > 0
            if not self.stopping and self.cfg.max_worker_memory and memory_due:
                self._memory_checked = time.monotonic()
                rss = resident_mib()
                if rss > self.cfg.max_worker_memory:
                    log.info("worker %s recycling: %.0f MiB resident, over MAX_WORKER_MEMORY=%d", self.wid, rss,
                             self.cfg.max_worker_memory)  # fmt: skip
                    self.stopping = True
        return self.stopping

    def _consume(self, n: int, consumer: Consumer) -> None:
        self.heartbeat.attach(n)
        try:
            consumer.run(self._should_stop)
        except Exception:  # a bug outside the message boundary: logged; the main thread stops the process
            log.exception("worker %s thread %d crashed", self.wid, n)

    @property
    def handled(self) -> int:
        return sum(c.handled for c in self.consumers)

    @staticmethod
    def preload(cfg: Config) -> dict[str, Any]:
        """What every worker needs, done once in the supervisor before the fork (gunicorn's ``preload_app``):
        the tool families load (a broken plugin stops the start here, as ``ConfigError``), the Gemini client's
        module is imported when a key is set, and a sandbox is started once and closed, to report which
        confinement layers this machine gives. Nothing stays open. Returns the sandbox's report (ok, layers,
        weak, error, cgroup) for the host's heartbeat."""
        families = registry.default()
        log.info("tool types: %s", ", ".join(sorted(families)))
        if cfg.gemini_key:
            from .llm import gemini  # noqa: F401  (imported once here, shared by every forked worker)
        client, hello = start_sandbox(cfg, cfg.sandbox_uid, "this machine")
        client.close()
        return {k: hello.get(k) for k in ("ok", "layers", "weak", "error", "cgroup")}

    def _on_term(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def init_process(self) -> None:
        """Open this process's own connections (never inherited across the fork), retrying about once a second,
        beating: up to BOOT_TIMEOUT at the node's first boot, as long as it takes later (until told to stop)."""
        self.redis = connect(
            self.cfg,
            socket_timeout=self.cfg.pop_timeout + self.cfg.redis_timeout,
            socket_connect_timeout=self.cfg.redis_timeout,
            health_check_interval=30,
            retries=0,  # the consumers' loops retry, and reclaim what a broken connection may have left behind
            redis_connect_func=self.connections,  # (also when redis-py reconnects silently)
        )
        self.store = Store(self.cfg)
        started = time.monotonic()
        deadline = started + self.cfg.boot_timeout if self.first_boot else float("inf")
        delay = 0.2
        while True:
            try:
                self.redis.ping()
                self.store.ping()
                break
            except (redis.RedisError, TransientError) as exc:
                refused = certificate_refused(exc) if self.first_boot else None
                if refused:  # (a certificate does not change by waiting; a respawned worker waits all the same)
                    raise BootError(refused) from exc
                if time.monotonic() + delay > deadline or self.stopping:
                    waited = time.monotonic() - started
                    raise BootError(f"Redis or PostgreSQL unreachable for {waited:.0f}s: {exc}") from exc
                log.warning("worker %s waiting for Redis/PostgreSQL: %s", self.wid, exc)
                time.sleep(delay)
                self.heartbeat.beat()
                delay = min(delay * 2, SERVER_POLL)
        # Each worker has its own sandbox process, and its runs uids of their own (so that one worker's runs
        # cannot reach another's processes): SANDBOX_CONCURRENCY of them from SANDBOX_UID + wid * that. It starts
        # at the worker's first sandboxed run (the supervisor's probe already said which layers this machine
        # gives): a worker whose bots run no shell, script or file tool never pays its memory (6-7 MiB a process).
        uid = self.cfg.sandbox_uid + self.wid * self.cfg.sandbox_concurrency
        self.sandbox = SandboxClient(
            self.cfg.sandbox_root, uid, self.cfg.sandbox_gid, self.cfg.sandbox_allow_weak, self.cfg.sandbox_concurrency
        )
        self.pipeline = Pipeline(
            self.cfg,
            self.store,
            make_responder(self.cfg),
            tick=self.heartbeat.beat,
            sandbox=self.sandbox,
            slots=CpuSlots(self.cfg.cpu_slots, self.heartbeat.beat),
        )
        pid = os.getpid()
        slots = self.pipeline.slots
        for n in range(self.heartbeat.threads):
            queue = ReliableQueue(
                self.redis, processing_key(self.node_id, self.wid, pid, n), self.cfg.dead_letter_max, self.connections
            )
            queue.register()
            name = f"{self.wid}" if self.heartbeat.threads == 1 else f"{self.wid}.{n}"
            self.consumers.append(Consumer(name, queue, self.pipeline, self.heartbeat, lambda: self.stopping, slots))

    def _close(self) -> None:
        metrics.flush()
        for consumer in self.consumers:
            try:
                consumer.queue.unregister()
            except redis.RedisError as exc:
                log.warning("worker %s could not unregister %s: %s", self.wid, consumer.queue.processing, exc)
        self.sandbox.close()
        self.pipeline.http.close()
        self.store.close()
        self.redis.close()

    # ---- driving one consumer in-process (tests, benchmarks) ------------------------------------------------

    @property
    def queue(self) -> ReliableQueue:
        """The first consumer's queue."""
        return self.consumers[0].queue

    def run_once(self) -> bool:
        """One message through the first consumer, in the calling thread."""
        return self.consumers[0].run_once()


def start_sandbox(cfg: Config, uid: int, who: str) -> tuple[SandboxClient, dict[str, Any]]:
    """A sandbox process for ``who``, and its greeting (which layers hold), logged. A sandbox that cannot start is
    reported, not raised: sandboxed tools then fail with the reason, and the client retries at the first one."""
    client = SandboxClient(cfg.sandbox_root, uid, cfg.sandbox_gid, cfg.sandbox_allow_weak, cfg.sandbox_concurrency)
    try:
        hello = client.start()
    except SandboxError as exc:
        hello = {"ok": False, "error": str(exc), "layers": {}, "weak": False}
    layers = ", ".join(f"{name} {'yes' if on else 'NO'}" for name, on in (hello.get("layers") or {}).items())
    if not hello.get("ok"):
        log.error("%s: sandbox unavailable, shell/script/file tools will fail: %s", who, hello.get("error"))
    elif hello.get("weak"):
        log.warning("%s: SANDBOX IN WEAK MODE (SANDBOX_ALLOW_WEAK): not for production: %s", who, layers)
    else:
        log.info("%s: sandbox ready (cgroup %s): %s", who, hello.get("cgroup"), layers)
    return client, hello
