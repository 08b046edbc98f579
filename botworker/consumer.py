"""One consumer thread of a worker process: pop one message into a processing list of its own, process it, settle it.

A worker process runs WORKER_THREADS consumers over what it shares (one Redis client, one PostgreSQL pool, one
sandbox, one pipeline). Each consumer keeps what it holds in ``bot_messages:processing:<node>:<wid>:<pid>:<thread>``
and pops only when it is free: no prefetch. It holds one message; when a backlog has built (and replies do not
wait on a model), the few queued behind it too, up to WORKER_BATCH, handled together with one round trip per step
(``process_batch``). (A popped message may wait a moment for one of the process's CPU slots, ``slots.py``, while
another thread does CPU work.)

``process(raw)`` is the message boundary: whatever happens inside, the message ends in exactly one of
- ``finish``: the reply and/or error events pushed and the message acked, atomically;
- ``release``: put back at the head of the line after a transient failure (database down), once it answers again;
- ``dead_letter``: after ``max_attempts`` attempts (crashes included), with a ``bot_errors`` event.
A Redis failure at any step is retried with back-off until Redis answers; the message waits in this consumer's
processing list meanwhile, where the supervisor finds it if the worker dies. After such a failure, the consumer's
next pop first puts back what its list still holds (``reclaim``): a pop whose reply was lost, or, after a Sentinel
failover, a message whose ack the new master never received.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from . import errors, metrics
from .errors import MessageError, TransientError
from .logs import about
from .message import Envelope, Ids, error_event, read, reply_events
from .pipeline import Outcome, Pipeline, utcnow
from .queue import ERRORS, RESPONSES, ReliableQueue, Settled, node_of
from .slots import CpuSlots

if TYPE_CHECKING:  # (the worker imports this module; only its type is needed here)
    from .worker import Heartbeat

log = logging.getLogger(__name__)

# Seconds between two tries of a server that is down (Redis or PostgreSQL): work resumes within about this much of
# its return, however long the outage was.
SERVER_POLL = 1.0
T = TypeVar("T")
# A settled message's outcome in the metrics, by the stats field it counts under in Redis.
OUTCOMES = {"processed": "answered", "errors": "failed", "duplicates": "duplicate"}


class Consumer:
    """One thread's loop. ``stopping()`` says when to stop taking messages (the worker's warm stop)."""

    def __init__(
        self,
        worker_id: str,
        queue: ReliableQueue,
        pipeline: Pipeline,
        heartbeat: Heartbeat,
        stopping: Callable[[], bool],
        slots: CpuSlots,
    ) -> None:
        self.worker_id = worker_id  # "<wid>" or "<wid>.<thread>", for log lines
        self.queue = queue
        self.pipeline = pipeline
        self.cfg = pipeline.cfg
        self.store = pipeline.store
        self.heartbeat = heartbeat
        self.stopping = stopping
        self.slots = slots
        self.handled = 0
        self.current: str | None = None  # the id of the message in hand (the process title shows it)
        self._redis_down = 0.0  # current back-off while Redis is unreachable between messages
        self._reclaim = False  # a Redis connection broke: our list may hold a message whose pop we never saw
        self._connections = queue.connections_made()  # the process's Redis connections made, as last reclaimed
        self._popped = time.monotonic()  # when the message(s) in hand were popped (metrics)
        self._queued_at: dict[str, float] = {}  # producers' queuedAt of the messages in hand (metrics)

    def run(self, should_stop: Callable[[], bool]) -> None:
        """Take messages until ``should_stop()``; the message in hand is always finished first."""
        while not should_stop():
            self.run_once()

    def run_once(self) -> bool:
        """Wait up to pop_timeout for one message and process it; when a backlog has built and replies do not wait
        on a model, take up to WORKER_BATCH - 1 more at once and process them together (one load and one save
        round trip for all). True if a message was processed."""
        self.heartbeat.beat()
        try:
            made = self.queue.connections_made()  # (a connection made anew: Redis may have lost our ack)
            if self._reclaim or made != self._connections:  # (we hold nothing here: what our list holds is orphaned)
                self.queue.reclaim()
                self._reclaim, self._connections = False, made
            raw = self.queue.pop(self.cfg.pop_timeout)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            # Nothing is in flight yet: back off and let the loop notice a stop request meanwhile.
            self._reclaim = True
            self._redis_down = min(self._redis_down * 2 or 0.1, SERVER_POLL)
            log.warning("worker %s: Redis unavailable (%s); retrying in %.1fs", self.worker_id, exc, self._redis_down)
            self._sleep(self._redis_down)
            return False
        self._redis_down = 0.0
        if raw is None:
            return False
        self._popped = time.monotonic()
        batch = [raw]
        if self.cfg.worker_batch > 1 and not self.pipeline.responder.waits:
            batch += self._redis(lambda: self.queue.take(self.cfg.worker_batch - 1))
        self.heartbeat.busy(True)
        try:
            with self.slots.hold():
                if len(batch) == 1:
                    self.process(raw)
                else:
                    self.process_batch(batch)
        finally:
            self.heartbeat.busy(False)
            for _ in batch:
                self.heartbeat.count()
            self.handled += len(batch)
        return True

    def process(self, raw: bytes | str) -> None:
        """The message boundary: one popped payload in, one settled message out (begin -> handle -> settle). Every
        line logged meanwhile carries the message's id."""
        env = read(raw, self.cfg.max_message_bytes, utcnow())
        self.current = env.ids.message_id
        if env.queued_at is not None:
            self._queued(env.ids.message_id, env.queued_at)
        try:
            with about(env.ids.message_id, env.ids.bot_id):
                self._process(raw, env)
        finally:
            self.current = None

    def _process(self, raw: bytes | str, env: Envelope) -> None:
        mid = env.ids.message_id
        if not env.readable:  # not a JSON object: nothing to attempt again
            self._finish_all([self._failed(raw, env.ids, env.error)])
            return
        if env.rewritten is not None and self._redis(lambda: self.queue.replace(raw, env.rewritten)):
            raw = env.rewritten
        attempts, done = self._redis(lambda: self.queue.begin(mid))
        if done:
            log.info("message %s was already answered: duplicate dropped", mid)
            self._finish_all([Settled(raw, mid, [], "duplicates")])
            return
        if attempts > self.cfg.max_attempts:
            self._dead_letter(raw, env.ids, attempts, errors.INTERNAL_ERROR, "the worker died while processing it")
            return
        log.info('🤖 Processing message for bot %s: "%s"', env.ids.bot_id, env.preview)
        if env.message is None:
            self._finish_all([self._failed(raw, env.ids, env.error)])
            return
        try:
            result: Outcome | Exception = self.pipeline.handle(env.message)
        except Exception as exc:  # the one catch-all: what it means is decided in _settle
            result = exc
        settled = self._settle(result, raw, env, attempts)
        if settled is not None:
            self._finish_all([settled])

    def process_batch(self, raws: list[bytes]) -> None:
        """Several popped payloads: the plain ones (readable, valid, with their own id) begin together, are
        handled with one load and one save round trip, and are finished together; each keeps its own attempt
        count, exactly-once save and events. Any other goes through ``process`` on its own."""
        plain, later, ids = [], [], set()
        for raw in raws:
            env = read(raw, self.cfg.max_message_bytes, utcnow())
            if env.ids.message_id in ids:
                later.append(raw)  # a second copy: once the first is finished, it is a duplicate
            elif env.readable and env.rewritten is None and env.message is not None:
                plain.append((raw, env))
                ids.add(env.ids.message_id)
                if env.queued_at is not None:
                    self._queued(env.ids.message_id, env.queued_at)
            else:
                self.process(raw)
        begun = self._redis(lambda: self.queue.begin_many([env.ids.message_id for _, env in plain]))
        todo, finished = [], []
        for (raw, env), (attempts, done) in zip(plain, begun, strict=True):
            with about(env.ids.message_id, env.ids.bot_id):
                self._begun(raw, env, attempts, done, todo, finished)
        self.current = todo[0][1].ids.message_id if todo else None  # (the process title shows one of the batch)
        try:
            results = self.pipeline.handle_many([env.message for _, env, _ in todo])
        except Exception as exc:  # the catch-all, for the batch's own steps (its load: the database is down?)
            results = [exc] * len(todo)
        finally:
            self.current = None
        retries = []
        for (raw, env, attempts), result in zip(todo, results, strict=True):
            if isinstance(result, TransientError):
                retries.append((raw, env.ids, attempts, result))
                continue
            with about(env.ids.message_id, env.ids.bot_id):
                if (settled := self._settle(result, raw, env, attempts)) is not None:
                    finished.append(settled)
        self._finish_all(finished)
        self._retry_all(retries)
        for raw in later:
            self.process(raw)

    def _begun(
        self, raw: bytes, env: Envelope, attempts: int, done: bool, todo: list[Any], finished: list[Settled]
    ) -> None:
        """One message of a batch after its begin: a duplicate, out of attempts, or to handle."""
        if done:
            log.info("message %s was already answered: duplicate dropped", env.ids.message_id)
            finished.append(Settled(raw, env.ids.message_id, [], "duplicates"))
        elif attempts > self.cfg.max_attempts:
            self._dead_letter(raw, env.ids, attempts, errors.INTERNAL_ERROR, "the worker died while processing it")
        else:
            log.info('🤖 Processing message for bot %s: "%s"', env.ids.bot_id, env.preview)
            todo.append((raw, env, attempts))

    def _settle(self, result: Outcome | Exception, raw: bytes | str, env: Envelope, attempts: int) -> Settled | None:
        """What ends one handled message: its events to push, or (a transient failure) a retry, done here."""
        mid = env.ids.message_id
        if isinstance(result, TransientError):
            self._retry(raw, env.ids, attempts, result)
            return None
        if isinstance(result, MessageError):
            return self._failed(raw, env.ids, result)
        if isinstance(result, Exception):  # a bug ends this message with an event, not the worker
            log.error("❌ Error processing message %s: unexpected %s", mid, type(result).__name__, exc_info=result)
            error = f"internal error while processing the message ({type(result).__name__})"
            return Settled(raw, mid, [(ERRORS, error_event(env.ids, errors.INTERNAL_ERROR, error))], "errors")
        assert env.message is not None
        response, error_ev = reply_events(
            env.message, result.instance_id, result.user_row, result.bot_row, result.error_code, result.error or ""
        )
        if error_ev is not None:
            log.error("❌ Error processing message %s: %s", mid, result.error)
        took = result.bot_row.get("responseTime")
        log.info("✅ Bot message processed successfully (%s%s)", mid, ", replayed" if result.replayed else "",
                 extra={"stage": "answered", "duration_ms": took})  # fmt: skip
        return Settled(raw, mid, [(RESPONSES, response)] + ([(ERRORS, error_ev)] if error_ev else []), "processed")

    def _failed(self, raw: bytes | str, ids: Ids, exc: MessageError | None) -> Settled:
        """The message cannot be answered (bad input, unknown bot...): one error event."""
        assert exc is not None
        log.error("❌ Error processing message %s: %s (%s)", ids.message_id, exc.error, exc.code)
        return Settled(raw, ids.message_id, [(ERRORS, error_event(ids, exc.code, exc.error))], "errors")

    def _queued(self, message_id: str, queued_at: float) -> None:
        """The producer said when it queued this message: its wait in line, and later its end-to-end time."""
        self._queued_at[message_id] = queued_at
        metrics.stage("queue_wait", time.time() - queued_at)

    # ---- settling a message --------------------------------------------------------------------------------

    def _finish_all(self, settled: list[Settled]) -> None:
        """Push each message's events and ack it (one round trip for all)."""
        if not settled:
            return
        started = time.monotonic()
        finished = self._redis(lambda: self.queue.finish_many(settled))
        metrics.stage("publish", time.monotonic() - started, len(settled))
        for s, done in zip(settled, finished, strict=True):
            queued_at = self._queued_at.pop(s.message_id, None)
            if not done:
                log.warning("message %s was recovered by someone else while we processed it: events not pushed",
                            s.message_id)  # fmt: skip
                self._reclaim = True  # (or Redis forgot our pop: look at our list before the next one)
                continue
            code = next((event.get("code") for channel, event in s.events if channel == ERRORS), None)
            metrics.message(OUTCOMES[done], code if done == s.stat else None)
            metrics.settled(self._popped, queued_at, time.time())

    def _retry(self, raw: bytes | str, ids: Ids, attempts: int, exc: TransientError) -> None:
        self._retry_all([(raw, ids, attempts, exc)])

    def _retry_all(self, retries: list[tuple[bytes | str, Ids, int, TransientError]]) -> None:
        """Put messages back at the head of the line once the database answers (one wait for all of them), or
        dead-letter those out of attempts."""
        waiting = []
        for raw, ids, attempts, exc in retries:
            if attempts >= self.cfg.max_attempts:
                self._dead_letter(raw, ids, attempts, exc.code, exc.error)
            else:
                log.warning("attempt %d of message %s failed (%s): retrying when the database answers", attempts,
                            ids.message_id, exc.error)  # fmt: skip
                metrics.retried(exc.code)
                self._queued_at.pop(ids.message_id, None)
                waiting.append((raw, attempts))
        if waiting:
            self._wait_for_database(self.cfg.retry_delay * 2 ** (min(a for _, a in waiting) - 1))
            for raw, _ in waiting:
                self._redis(lambda raw=raw: self.queue.release(raw))

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
            "node": node_of(self.queue.processing),
        }
        event = error_event(ids, errors.DEAD_LETTERED, error)
        if self._redis(lambda: self.queue.dead_letter(raw, ids.message_id, entry, event)):
            metrics.message("dead_lettered", code)
        self._queued_at.pop(ids.message_id, None)

    def _wait_for_database(self, delay: float) -> None:
        """Back off, then wait until PostgreSQL answers (or we are told to stop), beating all along. The server is
        asked about once a second (each try bounded by DB_CONNECT_TIMEOUT), so work resumes within about a second
        of its return, not after a back-off that grew during a long outage."""
        self._sleep(delay)
        while not self.stopping():
            try:
                self.store.ping()
                return
            except TransientError as exc:
                log.warning("worker %s: database still unavailable: %s", self.worker_id, exc.error)
                self._sleep(SERVER_POLL)

    def _redis(self, call: Callable[[], T]) -> T:
        """Run one Redis step, retrying connection failures with back-off (the message waits in our list)."""
        delay = 0.1
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self._reclaim = True
                log.warning("worker %s: Redis unavailable (%s); retrying in %.1fs", self.worker_id, exc, delay)
                self._sleep(delay)
                delay = min(delay * 2, SERVER_POLL)

    def _sleep(self, seconds: float) -> None:
        """Sleep in short steps, beating, so the supervisor does not take a waiting thread for a stuck one."""
        end = time.monotonic() + seconds
        with self.slots.waiting():
            while (left := end - time.monotonic()) > 0:
                self.heartbeat.beat()
                time.sleep(min(left, 0.25))
