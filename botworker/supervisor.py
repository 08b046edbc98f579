"""The supervisor: forks N worker processes and keeps them alive, as gunicorn's arbiter does.

Main loop (one iteration every TICK, half a second, or sooner when a signal arrives)::

    spawn missing workers ─▶ wait on the self-pipe ─▶ handle recorded signals ─▶ reap dead children
      ─▶ kill workers whose heartbeat is older than WORKER_TIMEOUT ─▶ refresh status keys, recover orphans

- A dead worker's processing list is requeued at once (head of the line), then the worker is respawned, with
  back-off if it keeps dying. At the node's first boot, a worker that exits with the boot-failure code
  (Redis/PostgreSQL unreachable for BOOT_TIMEOUT) stops the whole supervisor with EXIT_BOOT instead of a respawn
  loop; once a worker has booted, a respawned one waits for the servers as long as it takes (an outage must not
  turn one restart into a stopped fleet).
- SIGTERM/SIGINT: warm stop (workers finish their message, bounded by GRACEFUL_TIMEOUT, then exit 0; the messages
  of workers that could not finish are requeued as soon as Redis answers, within the same period); a second
  one, or SIGQUIT: cold stop (kill now; the in-flight messages are requeued). SIGHUP: reload the configuration and
  replace the workers gracefully. SIGTTIN/SIGTTOU: one worker more/fewer.
- Signal handlers only record the signal; ``set_wakeup_fd`` wakes the loop. Signals are blocked around ``fork`` so
  a child never runs the supervisor's handlers.
- ``bot_worker:node:<node>`` (expires after NODE_TTL) says this node is alive; ``bot_worker:status`` (expires after
  STATUS_TTL) that some fleet is. Any supervisor requeues the processing lists of nodes whose key expired (it
  looks every RECOVER_EVERY).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import redis

from . import errors, metrics
from .config import Config
from .errors import ConfigError
from .logs import set_role, set_title, setup_logging
from .notify import Notifier
from .queue import (
    connect,
    processing_key,
    publish_node,
    queue_depths,
    recover_orphans,
    requeue_list,
    trim_dead_letters,
    withdraw_node,
)
from .worker import Heartbeat, Worker

log = logging.getLogger(__name__)

TICK = 0.5  # the main loop's longest sleep (a signal wakes it at once): the finest step of the timers below
REFRESH_EVERY = 2.0  # status and node keys (more often when NODE_TTL is short: see _maintain)
# Orphaned processing lists of dead nodes. A dead node's key was last set before it died, so it expires at most
# NODE_TTL after the death; a scan every TICK puts the node's messages back in line within NODE_TTL + about half a
# second (the target is NODE_TTL + 1 s; a scan every 5 s made it up to NODE_TTL + 5 s). A scan is one SMEMBERS and
# one MGET: every host can afford two a second.
RECOVER_EVERY = TICK
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1


def _redis_fields(cfg: Config) -> list[Field[Any]]:
    return [f for f in fields(cfg) if f.name.startswith("redis_")]


def _redis_settings(cfg: Config) -> tuple[object, ...]:
    return tuple(getattr(cfg, f.name) for f in _redis_fields(cfg))


@dataclass
class Slot:
    """One forked worker as the supervisor sees it."""

    wid: int
    pid: int
    heartbeat: Heartbeat
    started: float
    threads: int = 1
    retiring: bool = False
    retire_deadline: float = 0.0
    killed: bool = False


@dataclass
class Backoff:
    """Respawn delay per worker id: grows while a worker keeps dying young, resets once one lives."""

    failures: dict[int, int] = field(default_factory=dict)
    not_before: dict[int, float] = field(default_factory=dict)

    def died(self, wid: int, lived: float) -> float:
        n = 0 if lived > 30 else self.failures.get(wid, 0) + 1
        self.failures[wid] = n
        delay = 0.0 if n == 0 else min(0.25 * 2 ** (n - 1), 30.0)
        self.not_before[wid] = time.monotonic() + delay
        return delay

    def ready(self, wid: int) -> bool:
        return time.monotonic() >= self.not_before.get(wid, 0.0)


class Supervisor:
    """Forks and watches the workers of one node. ``run()`` returns the process's exit code."""

    def __init__(self, cfg: Config, reload: Callable[[], Config]) -> None:
        self.cfg = cfg
        self.reload = reload
        self.node_id = f"{cfg.node_name.replace(':', '_')}-{os.getpid()}"
        self.target = cfg.procs
        self.slots: dict[int, Slot] = {}
        self.signals: list[int] = []
        self.state = "running"  # running -> warm -> cold
        self.deadline = 0.0  # end of the warm stop
        self.exit_code = errors.EXIT_OK
        self.backoff = Backoff()
        self.pending: set[str] = set()  # processing lists of dead workers not yet requeued (Redis was down)
        self.redis: redis.Redis | None = None
        self._pipe_r = self._pipe_w = -1
        self._next_refresh = self._next_recover = 0.0
        self._redis_failing = False
        self.sandbox: dict[str, object] = {}  # the start-up probe's report, shown by `botworker status`
        self.notify = Notifier.from_environment()  # systemd (Type=notify); does nothing without NOTIFY_SOCKET
        self._told_ready = False
        self._booted_once = False  # some worker has opened its connections: BOOT_TIMEOUT no longer applies
        self.unclean: set[str] = set()  # pending lists of workers that did not finish their messages
        self.exporter: metrics.Exporter | None = None  # METRICS_PORT's endpoint
        self.restarts: dict[str, int] = {}  # workers replaced, by reason (for the metrics)
        self._depths: tuple[int, int] | None = None  # queued and dead, as of the last refresh (None: Redis down)

    # ---- main loop -----------------------------------------------------------------------------------------

    def run(self) -> int:
        set_role("supervisor")
        self._install_signals()
        self.redis = connect(
            self.cfg, socket_timeout=self.cfg.redis_timeout, socket_connect_timeout=self.cfg.redis_timeout
        )
        log.info("supervisor %s starting %d worker(s); config %s", self.node_id, self.target, self.cfg.redacted())
        for warning in self.cfg.warnings():
            log.warning("%s", warning)
        try:
            # Before the fork, once: a broken plugin stops us here, not per message; the sandbox's layers are known.
            self.sandbox = Worker.preload(self.cfg)
            self._open_metrics(self.cfg)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return errors.EXIT_CONFIG
        self._maintain(force=True)
        while True:
            if self.state == "running":
                self._spawn_missing()
            self._wait(TICK)
            self._handle_signals()
            self._reap()
            self._booted_once = self._booted_once or any(s.heartbeat.ready for s in self.slots.values())
            self._murder_hung()
            self._maintain()
            self._tell_systemd()
            if self.state != "running" and not self.slots:
                self._requeue_before(self.deadline)
                break
            if self.state == "warm" and time.monotonic() > self.deadline:
                log.warning("graceful timeout: killing %d worker(s) still busy", len(self.slots))
                self._stop("cold")
        self._unregister()
        if self.exporter is not None:
            self.exporter.close()
        log.info("supervisor %s stopped (exit %d)", self.node_id, self.exit_code)
        return self.exit_code

    def _install_signals(self) -> None:
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._pipe_w, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    def _wait(self, timeout: float) -> None:
        if self.signals:
            return
        exporter = self.exporter
        readers = [self._pipe_r, *(exporter.readers() if exporter else ())]
        try:
            ready, writable, _ = select.select(readers, exporter.writers() if exporter else [], [], timeout)
            if exporter is not None:
                exporter.serve(ready, writable)  # (never blocks: scrapers are served a little every iteration)
            if self._pipe_r in ready:
                while os.read(self._pipe_r, 512):
                    pass
        except InterruptedError:
            pass
        except BlockingIOError:
            pass

    def _handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGCHLD:
                continue  # reaping happens every iteration
            log.info("supervisor received %s", signal.Signals(sig).name)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self._stop("warm" if self.state == "running" else "cold")
            elif sig == signal.SIGQUIT:
                self._stop("cold")
            elif sig == signal.SIGHUP and self.state == "running":
                self._reload()
            elif sig == signal.SIGTTIN and self.state == "running":
                self.target += 1
                log.info("scaling up to %d worker(s)", self.target)
            elif sig == signal.SIGTTOU and self.state == "running":
                self.target = max(1, self.target - 1)
                log.info("scaling down to %d worker(s)", self.target)
                for slot in sorted(self._active(), key=lambda s: s.wid)[self.target :]:
                    self._retire(slot)

    # ---- workers -------------------------------------------------------------------------------------------

    def _active(self) -> list[Slot]:
        return [s for s in self.slots.values() if not s.retiring]

    def _spawn_missing(self) -> None:
        used = {s.wid for s in self._active()}
        for wid in range(self.target):
            if wid not in used and self.backoff.ready(wid):
                self._spawn(wid)

    def _spawn(self, wid: int) -> None:
        heartbeat = Heartbeat(self.cfg.worker_threads)
        # Block our signals across fork: the child must not run the supervisor's handlers before it installs its own.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = errors.EXIT_ERROR
            try:
                self._become_worker(wid)
                code = Worker(self.cfg, wid, self.node_id, heartbeat, first_boot=not self._booted_once).run()
            except BaseException:
                log.exception("worker %s crashed", wid)
            finally:
                logging.shutdown()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self.slots[pid] = Slot(wid, pid, heartbeat, time.monotonic(), self.cfg.worker_threads)
        log.info("spawned worker %d (pid %d)", wid, pid)

    def _become_worker(self, wid: int) -> None:
        """Child side of the fork: drop the supervisor's wiring before the worker opens its own."""
        set_role(f"w{wid}")
        set_title(f"worker {wid} starting")
        signal.set_wakeup_fd(-1)
        os.close(self._pipe_r)
        os.close(self._pipe_w)
        if self.exporter is not None:
            self.exporter.close_in_child()
            self.exporter = None
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        self.redis = None  # the supervisor's connection stays unused here; the worker opens its own
        # Die with the supervisor (a warm stop: the worker finishes its message), even if it is SIGKILLed.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    def _retire(self, slot: Slot) -> None:
        slot.retiring = True
        slot.retire_deadline = time.monotonic() + self.cfg.graceful_timeout
        self._kill(slot.pid, signal.SIGTERM)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.slots.pop(pid, None)
            if slot is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            lived = time.monotonic() - slot.started
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            recycles = self.cfg.max_requests or self.cfg.max_worker_memory
            clean = code == 0 and (slot.retiring or self.state != "running" or bool(recycles))
            (log.info if clean else log.warning)("worker %d (pid %d) %s after %.1fs", slot.wid, pid, how, lived)
            if not slot.retiring and self.state == "running":
                reason = "hung" if slot.killed else "killed" if code < 0 else "recycled" if clean else "crashed"
                self.restarts[reason] = self.restarts.get(reason, 0) + 1
            if self.exporter is not None:
                self.exporter.worker_gone(pid)
            lists = {processing_key(self.node_id, slot.wid, pid, t) for t in range(slot.threads)}
            self.pending |= lists
            # A worker that exits 0 finished every message it took, and one that could not boot took none: their
            # lists are empty, and a stop need not wait for Redis to say so.
            if code not in (errors.EXIT_OK, errors.EXIT_WORKER_BOOT):
                self.unclean |= lists
            self._drain_pending()
            if code == errors.EXIT_WORKER_BOOT and self.state == "running" and not self._booted_once:
                log.error("a worker could not boot (Redis or PostgreSQL unreachable): stopping")
                self.exit_code = errors.EXIT_BOOT
                self._stop("warm")
            elif not slot.retiring and self.state == "running" and not clean:
                delay = self.backoff.died(slot.wid, lived)
                if delay:
                    log.warning("respawning worker %d in %.2fs", slot.wid, delay)

    def _murder_hung(self) -> None:
        now = time.monotonic()
        for slot in list(self.slots.values()):
            if slot.killed:
                continue  # already sent SIGKILL; waiting to reap it
            if slot.heartbeat.age() > self.cfg.worker_timeout:
                log.error(
                    "worker %d (pid %d) silent for %.0fs (busy for %.0fs): killing it",
                    slot.wid,
                    slot.pid,
                    slot.heartbeat.age(),
                    slot.heartbeat.busy_for,
                )
                self._kill(slot.pid, signal.SIGKILL)
                slot.killed = True
            elif slot.retiring and now > slot.retire_deadline:
                log.warning("worker %d (pid %d) did not stop in time: killing it", slot.wid, slot.pid)
                self._kill(slot.pid, signal.SIGKILL)
                slot.killed = True

    def _requeue_before(self, deadline: float) -> None:
        """At the end of a warm stop during a Redis outage: keep trying to requeue the messages of workers that did
        not finish them, until Redis answers or the grace period ends (a second signal ends it at once)."""
        while self.pending & self.unclean and self.state == "warm" and time.monotonic() < deadline:
            self._wait(0.5)
            self._handle_signals()
            self._drain_pending()

    def _tell_systemd(self) -> None:
        """READY=1 once every worker has booted (again after a reload), STATUS= as it changes, and the watchdog
        fed only while the fleet is healthy."""
        if self.state == "running":
            active = self._active()
            booted = len(active) >= self.target and all(s.heartbeat.ready for s in active)
            if not self._told_ready and booted:
                self.notify.ready(self._status_line())
                self._told_ready = True
            elif self._told_ready:
                self.notify.status(self._status_line())
        if self._healthy():
            self.notify.watchdog()

    def _status_line(self) -> str:
        slots = self._active()
        busy = sum(s.heartbeat.busy_threads for s in slots)
        threads = sum(s.threads for s in slots)
        handled = sum(s.heartbeat.processed for s in slots)
        return f"{len(slots)} worker(s), {busy}/{threads} threads busy, {handled} message(s) handled"

    def _healthy(self) -> bool:
        """Some worker alive and none silent past WORKER_TIMEOUT (a silent one is being replaced). While stopping,
        systemd's stop timeout governs instead."""
        if self.state != "running":
            return True
        live = [s for s in self.slots.values() if not s.killed]
        return bool(live) and all(s.heartbeat.age() <= self.cfg.worker_timeout for s in live)

    def _stop(self, how: str) -> None:
        if how == "warm" and self.state == "running":
            self.state, self.deadline = "warm", time.monotonic() + self.cfg.graceful_timeout
            self.notify.stopping(f"warm stop: {len(self.slots)} worker(s) finishing their messages")
            log.info(
                "warm stop: %d worker(s) finish their current message (up to %gs)",
                len(self.slots),
                self.cfg.graceful_timeout,
            )
            for slot in self.slots.values():
                self._kill(slot.pid, signal.SIGTERM)
        elif how == "cold" and self.state != "cold":
            self.state = "cold"
            self.notify.stopping(f"cold stop: killing {len(self.slots)} worker(s)")
            log.info("cold stop: killing %d worker(s); their messages are requeued", len(self.slots))
            for slot in self.slots.values():
                self._kill(slot.pid, signal.SIGKILL)

    def _reload(self) -> None:
        self.notify.reloading()
        self._told_ready = False  # READY=1 again once the workers of the new configuration are up
        try:
            cfg = self.reload()
            sandbox = Worker.preload(cfg)
        except ConfigError as exc:
            log.error("SIGHUP: new configuration is invalid, keeping the old one: %s", exc)
            return
        if (cfg.metrics_addr, cfg.metrics_port) != (self.cfg.metrics_addr, self.cfg.metrics_port):
            try:
                self._open_metrics(cfg)
            except ConfigError as exc:
                log.error("SIGHUP: %s: the metrics stay where they were", exc)
                cfg = replace(cfg, metrics_addr=self.cfg.metrics_addr, metrics_port=self.cfg.metrics_port)
        if _redis_settings(cfg) != _redis_settings(self.cfg):
            # The node's processing lists, heartbeats and recovery live on one Redis: moving them while retiring
            # workers still hold messages there would let them be recovered twice or stranded. A restart (a warm
            # stop, then a start) moves a node cleanly.
            log.warning("SIGHUP: the REDIS_* settings changed: they take effect at the next restart")
            cfg = replace(cfg, **{f.name: getattr(self.cfg, f.name) for f in _redis_fields(cfg)})
        self.cfg, self.sandbox = cfg, sandbox
        self.target = cfg.procs
        setup_logging(cfg.log_level, cfg.log_format)
        log.info("SIGHUP: configuration reloaded; replacing %d worker(s)", len(self._active()))
        for warning in cfg.warnings():
            log.warning("%s", warning)
        for slot in self._active():
            self._retire(slot)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    # ---- Redis bookkeeping ---------------------------------------------------------------------------------

    def _drain_pending(self) -> None:
        for name in sorted(self.pending):
            if self._guard(lambda name=name: requeue_list(self.redis, name)) is not None:
                self.pending.discard(name)
                self.unclean.discard(name)

    def _maintain(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_refresh:
            # At least three refreshes per NODE_TTL: a live node whose key lapsed between two would look dead, and
            # another host would take its messages again (their tools run twice).
            self._next_refresh = now + min(REFRESH_EVERY, self.cfg.node_ttl / 3)
            self._guard(self._refresh)
            self._drain_pending()
            if self.cfg.dead_letter_days:  # (with the refresh: no need to trim at every recovery scan)
                cutoff = datetime.now(UTC) - timedelta(days=self.cfg.dead_letter_days)
                self._guard(lambda: trim_dead_letters(self.redis, cutoff.isoformat()))
            if self.exporter is not None:
                self._depths = self._guard(lambda: queue_depths(self.redis))  # type: ignore[assignment]
        if force or now >= self._next_recover:
            self._next_recover = now + RECOVER_EVERY
            self._guard(lambda: recover_orphans(self.redis))

    def _refresh(self) -> None:
        set_title(f"supervisor {self.node_id} ({self.state}): {self._status_line()}")
        node = {
            "node": self.node_id,
            "host": self.cfg.node_name,
            "pid": os.getpid(),
            "state": self.state,
            "target": self.target,
            "updatedAt": time.time(),
            "sandbox": self.sandbox,
            "workers": [
                {
                    "wid": s.wid,
                    "pid": s.pid,
                    "processed": s.heartbeat.processed,
                    "busyFor": round(s.heartbeat.busy_for, 1),
                    "threads": s.threads,
                    "busyThreads": s.heartbeat.busy_threads,
                    "eachThread": s.heartbeat.each(),
                    "beatAge": round(s.heartbeat.age(), 1),
                    "retiring": s.retiring,
                }
                for s in sorted(self.slots.values(), key=lambda s: s.wid)
            ],
        }
        publish_node(self.redis, node, self.cfg.node_ttl)

    # ---- metrics -------------------------------------------------------------------------------------------

    def _open_metrics(self, cfg: Config) -> None:
        """Serve METRICS_PORT (or stop serving), keeping the workers' metrics directory across a reload. When the
        new address cannot be bound, the old endpoint stays (ConfigError)."""
        old = self.exporter
        if not cfg.metrics_port:
            if old is not None:
                old.close()
                log.info("metrics: no longer served")
            self.exporter = None
            return
        directory = old.directory if old is not None else None
        if old is not None and old.port == cfg.metrics_port:
            old.close(keep_files=True)  # same port, another address: the old endpoint holds it
            self.exporter = None
        try:
            new = metrics.Exporter(cfg.metrics_addr, cfg.metrics_port, self._fleet, directory)
        except OSError as exc:
            if old is not None and self.exporter is None:  # put the old endpoint back
                try:
                    self.exporter = metrics.Exporter(old.addr, old.port, self._fleet, directory)
                except OSError as again:
                    log.error("metrics: cannot listen on %s:%d again either: %s", old.addr, old.port, again)
            raise ConfigError(f"METRICS_PORT: cannot listen on {cfg.metrics_addr}:{cfg.metrics_port}: {exc}") from None
        if self.exporter is not None:
            self.exporter.close(keep_files=True)
        self.exporter = new
        log.info("metrics: serving %s", new.address)

    def _fleet(self) -> metrics.Fleet:
        active = self._active()
        queued, dead = self._depths if self._depths else (None, None)
        return metrics.Fleet(
            queued=queued,
            dead=dead,
            in_flight=sum(s.heartbeat.busy_threads for s in self.slots.values()),
            threads=sum(s.threads for s in active),
            workers={s.wid: s.pid for s in sorted(self.slots.values(), key=lambda s: s.started)},
            restarts=dict(self.restarts),
        )

    def _unregister(self) -> None:
        """Last words: requeue what is left, drop our node key, and clear the status if no other node is alive."""
        self._drain_pending()
        if self.pending:
            log.error(
                "could not requeue %s: Redis unavailable; another node recovers them after NODE_TTL",
                sorted(self.pending),
            )

        self._guard(lambda: withdraw_node(self.redis, self.node_id))

    def _guard(self, step: Callable[[], object]) -> object | None:
        """Run a bookkeeping step; a Redis failure is logged once per outage and retried on the next tick."""
        try:
            result = step()
        except redis.RedisError as exc:
            if not self._redis_failing:
                log.error("supervisor: Redis unavailable (%s); will keep retrying", exc)
            self._redis_failing = True
            return None
        if self._redis_failing:
            log.info("supervisor: Redis is back")
        self._redis_failing = False
        return True if result is None else result
