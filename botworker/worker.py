"""One worker process: connect after the fork, then ``run_once()`` in a loop until told to stop.

``process(raw)`` is the message boundary: whatever happens inside, the message ends in exactly one of
- ``finish``: the reply and/or error events pushed and the message acked, atomically;
- ``release``: put back at the head of the line after a transient failure (database down), once it answers again;
- ``dead_letter``: after ``max_attempts`` attempts (crashes included), with a ``bot_errors`` event.
A Redis failure at any step is retried with back-off until Redis answers; the message waits in this worker's
processing list meanwhile, where the supervisor finds it if the worker dies.

Signals: SIGTERM asks for a warm stop (finish the current message, then exit 0); SIGINT, SIGHUP, SIGTTIN and
SIGTTOU are the supervisor's, ignored here. Handlers only record.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.sharedctypes import RawArray
from typing import Any, TypeVar

import redis

from sandbox.client import SandboxClient, SandboxError

from . import errors
from .config import Config
from .errors import BootError, MessageError, TransientError
from .llm import make_responder
from .message import Ids, error_event, read, reply_events
from .pipeline import Pipeline, utcnow
from .queue import ERRORS, RESPONSES, ReliableQueue, processing_key
from .store import Store
from .tools import registry

log = logging.getLogger(__name__)

DATABASE_POLL = 1.0  # seconds between two probes of a database that is down
T = TypeVar("T")

_BEAT, _PROCESSED, _BUSY_SINCE = 0, 1, 2


class Heartbeat:
    """A few shared doubles the worker writes and the supervisor reads: last beat, messages done, busy since.

    Created by the supervisor just before the fork (anonymous shared memory, not a connection). CLOCK_MONOTONIC
    is system-wide on Linux, so both sides compare the same clock.
    """

    def __init__(self) -> None:
        self._cells = RawArray("d", 3)
        self.beat()

    def beat(self) -> None:
        self._cells[_BEAT] = time.monotonic()

    def age(self) -> float:
        return time.monotonic() - self._cells[_BEAT]

    def count(self) -> None:
        self._cells[_PROCESSED] += 1

    @property
    def processed(self) -> int:
        return int(self._cells[_PROCESSED])

    def busy(self, on: bool) -> None:
        self._cells[_BUSY_SINCE] = time.monotonic() if on else 0.0

    @property
    def busy_for(self) -> float:
        since = self._cells[_BUSY_SINCE]
        return time.monotonic() - since if since else 0.0


class Worker:
    """One worker process. ``run()`` returns the process's exit code."""

    def __init__(self, cfg: Config, wid: int, node_id: str, heartbeat: Heartbeat) -> None:
        self.cfg = cfg
        self.wid = wid
        self.node_id = node_id
        self.heartbeat = heartbeat
        self.ppid = os.getppid()
        self.stopping = False
        self.handled = 0
        self._redis_down = 0.0  # current back-off while Redis is unreachable between messages
        self.redis: redis.Redis
        self.queue: ReliableQueue
        self.store: Store
        self.pipeline: Pipeline
        self.sandbox: SandboxClient

    # ---- life cycle ----------------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        try:
            self.init_process()
        except BootError as exc:
            log.error("worker %s cannot boot: %s", self.wid, exc)
            return errors.EXIT_WORKER_BOOT
        log.info("worker %s ready (pid %d, list %s)", self.wid, os.getpid(), self.queue.processing)
        try:
            while not self.stopping:
                self.run_once()
                if self.cfg.max_requests and self.handled >= self.cfg.max_requests:
                    log.info("worker %s recycling after %d messages", self.wid, self.handled)
                    break
                if os.getppid() != self.ppid:
                    log.warning("worker %s: supervisor is gone, stopping", self.wid)
                    break
        finally:
            self._close()
        return errors.EXIT_OK

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
        """Open this process's own connections (never inherited across the fork), retrying up to boot_timeout."""
        self.redis = redis.Redis.from_url(
            self.cfg.redis_url,
            socket_timeout=self.cfg.pop_timeout + self.cfg.redis_timeout,
            socket_connect_timeout=self.cfg.redis_timeout,
            health_check_interval=30,
        )
        self.store = Store(self.cfg)
        deadline = time.monotonic() + self.cfg.boot_timeout
        delay = 0.2
        while True:
            try:
                self.redis.ping()
                self.store.ping()
                break
            except (redis.RedisError, TransientError) as exc:
                if time.monotonic() + delay > deadline or self.stopping:
                    raise BootError(f"Redis or PostgreSQL unreachable for {self.cfg.boot_timeout:g}s: {exc}") from exc
                log.warning("worker %s waiting for Redis/PostgreSQL: %s", self.wid, exc)
                self._sleep(delay)
                delay = min(delay * 2, 5.0)
        self.queue = ReliableQueue(self.redis, processing_key(self.node_id, self.wid, os.getpid()))
        self.queue.register()
        # Each worker has its own sandbox process and its own jail uid (so process limits are per worker).
        self.sandbox, _ = start_sandbox(self.cfg, self.cfg.sandbox_uid + self.wid, f"worker {self.wid}")
        self.pipeline = Pipeline(
            self.cfg, self.store, make_responder(self.cfg), tick=self.heartbeat.beat, sandbox=self.sandbox
        )

    def _close(self) -> None:
        try:
            self.queue.unregister()
        except redis.RedisError as exc:
            log.warning("worker %s could not unregister its processing list: %s", self.wid, exc)
        self.sandbox.close()
        self.pipeline.http.close()
        self.store.close()
        self.redis.close()

    # ---- the loop ------------------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Wait up to pop_timeout for one message and process it. True if a message was processed."""
        self.heartbeat.beat()
        try:
            raw = self.queue.pop(self.cfg.pop_timeout)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Nothing is in flight yet: back off and let the loop notice a stop request meanwhile.
            self._redis_down = min(self._redis_down * 2 or 0.1, 5.0)
            log.warning("worker %s: Redis unavailable (%s); retrying in %.1fs", self.wid, exc, self._redis_down)
            self._sleep(self._redis_down)
            return False
        self._redis_down = 0.0
        if raw is None:
            return False
        self.heartbeat.busy(True)
        try:
            self.process(raw)
        finally:
            self.heartbeat.busy(False)
            self.heartbeat.count()
            self.handled += 1
        return True

    def process(self, raw: bytes | str) -> None:
        """The message boundary: one popped payload in, one settled message out (begin -> handle -> settle)."""
        env = read(raw, self.cfg.max_message_bytes, utcnow())
        mid = env.ids.message_id
        if not env.readable:  # not a JSON object: nothing to attempt again
            self._fail(raw, env.ids, env.error)
            return
        if env.rewritten is not None and self._redis(lambda: self.queue.replace(raw, env.rewritten)):
            raw = env.rewritten
        attempts, done = self._redis(lambda: self.queue.begin(mid))
        if done:
            log.info("message %s was already answered: duplicate dropped", mid)
            self._finish(raw, mid, [], "duplicates")
            return
        if attempts > self.cfg.max_attempts:
            self._dead_letter(raw, env.ids, attempts, errors.INTERNAL_ERROR, "the worker died while processing it")
            return
        log.info('🤖 Processing message for bot %s: "%s"', env.ids.bot_id, env.preview)
        if env.message is None:
            self._fail(raw, env.ids, env.error)
            return
        try:
            outcome = self.pipeline.handle(env.message)
        except TransientError as exc:
            self._retry(raw, env.ids, attempts, exc)
            return
        except MessageError as exc:
            self._fail(raw, env.ids, exc)
            return
        except Exception as exc:  # the one catch-all: a bug ends this message with an event, not the worker
            log.exception("❌ Error processing message %s: unexpected %s", mid, type(exc).__name__)
            error = f"internal error while processing the message ({type(exc).__name__})"
            self._finish(raw, mid, [(ERRORS, error_event(env.ids, errors.INTERNAL_ERROR, error))], "errors")
            return
        response, error_ev = reply_events(
            env.message, outcome.instance_id, outcome.user_row, outcome.bot_row, outcome.error_code, outcome.error or ""
        )
        if error_ev is not None:
            log.error("❌ Error processing message %s: %s", mid, outcome.error)
        self._finish(raw, mid, [(RESPONSES, response)] + ([(ERRORS, error_ev)] if error_ev else []), "processed")
        log.info("✅ Bot message processed successfully (%s%s)", mid, ", replayed" if outcome.replayed else "")

    def _fail(self, raw: bytes | str, ids: Ids, exc: MessageError | None) -> None:
        """The message cannot be answered (bad input, unknown bot...): one error event, settled."""
        assert exc is not None
        log.error("❌ Error processing message %s: %s (%s)", ids.message_id, exc.error, exc.code)
        self._finish(raw, ids.message_id, [(ERRORS, error_event(ids, exc.code, exc.error))], "errors")

    # ---- settling a message --------------------------------------------------------------------------------

    def _finish(self, raw: bytes | str, mid: str, events: list[tuple[str, dict[str, Any]]], stat: str) -> None:
        if not self._redis(lambda: self.queue.finish(raw, mid, events, stat)):
            log.warning("message %s was recovered by someone else while we processed it: events not pushed", mid)

    def _retry(self, raw: bytes | str, ids: Ids, attempts: int, exc: TransientError) -> None:
        if attempts >= self.cfg.max_attempts:
            self._dead_letter(raw, ids, attempts, exc.code, exc.error)
            return
        log.warning(
            "attempt %d of message %s failed (%s): retrying when the database answers",
            attempts,
            ids.message_id,
            exc.error,
        )
        self._wait_for_database(self.cfg.retry_delay * 2 ** (attempts - 1))
        self._redis(lambda: self.queue.release(raw))

    def _dead_letter(self, raw: bytes | str, ids: Ids, attempts: int, code: str, reason: str) -> None:
        error = f"gave up after {attempts - (attempts > self.cfg.max_attempts)} attempt(s): {reason}"
        log.error("❌ Error processing message %s: %s; moved to the dead-letter list", ids.message_id, error)
        entry = {
            "message": raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw,
            "messageId": ids.message_id,
            "code": code,
            "error": error,
            "attempts": attempts,
            "failedAt": utcnow().isoformat(),
            "node": self.node_id,
        }
        event = error_event(ids, errors.DEAD_LETTERED, error)
        self._redis(lambda: self.queue.dead_letter(raw, ids.message_id, entry, event))

    def _wait_for_database(self, delay: float) -> None:
        """Back off, then wait until PostgreSQL answers (or we are told to stop), beating all along. The server is
        asked about once a second (each try bounded by DB_CONNECT_TIMEOUT), so work resumes within about a second
        of its return, not after a back-off that grew during a long outage."""
        self._sleep(delay)
        while not self.stopping:
            try:
                self.store.ping()
                return
            except TransientError as exc:
                log.warning("worker %s: database still unavailable: %s", self.wid, exc.error)
                self._sleep(DATABASE_POLL)

    def _redis(self, call: Callable[[], T]) -> T:
        """Run one Redis step, retrying connection failures with back-off (the message waits in our list)."""
        delay = 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("worker %s: Redis unavailable (%s); retrying in %.1fs", self.wid, exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, 5.0)

    def _sleep(self, seconds: float) -> None:
        """Sleep in short steps, beating, so the supervisor does not take a waiting worker for a stuck one."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.heartbeat.beat()
            time.sleep(min(left, 0.25))


def start_sandbox(cfg: Config, uid: int, who: str) -> tuple[SandboxClient, dict[str, Any]]:
    """A sandbox process for ``who``, and its greeting (which layers hold), logged. A sandbox that cannot start is
    reported, not raised: sandboxed tools then fail with the reason, and the client retries at the first one."""
    client = SandboxClient(cfg.sandbox_root, uid, cfg.sandbox_gid, cfg.sandbox_allow_weak)
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
