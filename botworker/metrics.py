"""Prometheus metrics: what the workers count as they go, and the endpoint the supervisor serves on METRICS_PORT.

Off unless METRICS_PORT is set (every ``record``-side function is then a no-op that costs one global read). On:

- The supervisor makes a private directory (under systemd's RuntimeDirectory when there is one) and names it in
  ``PROMETHEUS_MULTIPROC_DIR`` before it forks a worker. Each worker counts into files of its own there: the
  official client's multi-process mode (one memory-mapped file per metric type and process, no locks between
  processes, nothing sent anywhere). A worker's threads add to sums in memory; its main thread writes them to the
  files four times a second (``flush``).
- The supervisor serves ``GET /metrics`` itself, from its main loop, without a thread (it forks): the listening
  socket and the scrapers' connections are more descriptors in the loop's ``select``, read and written without
  blocking, each connection cut off 2 s after it was made. A scrape merges every worker's files
  (``MultiProcessCollector``) and adds what the supervisor knows: the queue's depth and the dead letters as of its
  last refresh, messages in hand, workers, restarts, memory per worker.
- When a worker exits, the supervisor folds its counters and histograms into one ``*_archive.db`` file and removes
  its files: totals survive restarts (counters never go back), and the directory holds the live workers' files
  plus one archive, however many workers were recycled.

Only this module imports ``prometheus_client``, lazily: the client picks its multi-process mode from the
environment when first imported, so the import happens after the directory is named.
"""

from __future__ import annotations

import bisect
import glob
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
SCRAPE_TIMEOUT = 2.0  # seconds a scraper has to send its request and read the answer, in all
MAX_REQUEST = 8192  # bytes of a request's head: a GET from Prometheus is a few hundred
MAX_CLIENTS = 16  # connections served at once (a Prometheus or two, a curl)
ARCHIVE = "archive"  # the "pid" part of the files that hold the totals of workers gone

# Seconds. Stages are mostly milliseconds (a load, a save); a reply waits on a model for seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STAGES = ("queue_wait", "load", "tools", "llm", "save", "publish")


# What the workers count: attribute, type, name (after ``botworker_``), help, labels. The names as scraped get the
# client's suffixes: ``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms.
WORKER_METRICS = (
    ("messages", "counter", "messages",
     "messages settled, by outcome (answered, failed, duplicate, dead_lettered) and error code", ("outcome", "code")),
    ("retries", "counter", "message_retries", "messages put back in line after a transient failure, by code",
     ("code",)),
    ("processing", "histogram", "processing_seconds", "from the pop to the events published, per message", ()),
    ("end_to_end", "histogram", "end_to_end_seconds",
     "from the producer's queuedAt to the events published (messages that carry queuedAt)", ()),
    ("stages", "histogram", "stage_seconds", "time per message in each stage: " + ", ".join(STAGES), ("stage",)),
    ("tools", "counter", "tool_calls", "tool calls, by type, outcome (ok, failed) and error code",
     ("type", "outcome", "code")),
    ("tool_seconds", "histogram", "tool_seconds", "duration of one tool call (its retries included), by type",
     ("type",)),
    ("sandbox_runs", "counter", "sandbox_runs",
     "sandboxed runs, by kind (shell, script, file) and outcome (ok, failed, killed, unavailable)",
     ("kind", "outcome")),
    ("sandbox_kills", "counter", "sandbox_kills",
     "sandboxed runs killed at a limit, by kind and reason (wall_time, cpu_time, memory)", ("kind", "reason")),
    ("llm_requests", "counter", "llm_requests", "requests to the language model, by outcome (ok, or the error code)",
     ("outcome",)),
    ("llm_seconds", "histogram", "llm_request_seconds", "duration of one request to the language model", ()),
    ("llm_retries", "counter", "llm_retries", "requests to the language model retried, by the failure's code",
     ("code",)),
    ("llm_tokens", "counter", "llm_tokens",
     "tokens of the language model's responses, by kind (prompt, output, thoughts; estimated: none reported)",
     ("kind",)),
)  # fmt: skip


class _Recorder:
    """The metric objects of one worker process, created after the fork and registered nowhere (the supervisor's
    collector reads their files), and what its threads recorded since the last ``flush``.

    Recording adds to plain dicts under one lock (under a microsecond); ``flush`` writes the sums to the files,
    one write per counter child and histogram bucket touched. Writing each observation through the client costs
    a lock, a ``getpid`` and a file write per value: about 2 us per histogram observation, some 25 us per message.
    """

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram, values

        if not getattr(values.ValueClass, "_multiprocess", False):
            # The client was imported before the directory was named (metrics turned on by a reload): switch this
            # process to files now, before any metric exists.
            values.ValueClass = values.MultiProcessValue()
        self.metrics: dict[str, Any] = {}
        for attr, kind, name, help_text, labels in WORKER_METRICS:
            if kind == "counter":
                self.metrics[attr] = Counter("botworker_" + name, help_text, labels, registry=None)
            else:
                self.metrics[attr] = Histogram("botworker_" + name, help_text, labels, registry=None, buckets=BUCKETS)
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, tuple[str, ...]], float] = {}
        # Per histogram child: an observation count per bucket (BUCKETS, then +Inf), then the sum.
        self.observed: dict[tuple[str, tuple[str, ...]], list[float]] = {}

    def add(self, attr: str, labels: tuple[str, ...], amount: float = 1.0) -> None:
        key = (attr, labels)
        with self.lock:
            self.counts[key] = self.counts.get(key, 0.0) + amount

    def observe(self, attr: str, labels: tuple[str, ...], seconds: float, times: int = 1) -> None:
        seconds = max(0.0, seconds)
        bucket = bisect.bisect_left(BUCKETS, seconds)  # the first bound >= the value, as the client's observe()
        key = (attr, labels)
        with self.lock:
            cell = self.observed.get(key)
            if cell is None:
                cell = self.observed[key] = [0.0] * (len(BUCKETS) + 2)
            cell[bucket] += times
            cell[-1] += seconds * times

    def flush(self) -> None:
        with self.lock:
            counts, self.counts = self.counts, {}
            observed, self.observed = self.observed, {}
        for (attr, labels), amount in counts.items():
            metric = self.metrics[attr]
            (metric.labels(*labels) if labels else metric).inc(amount)
        for (attr, labels), cell in observed.items():
            metric = self.metrics[attr]
            child = metric.labels(*labels) if labels else metric
            # (The client has no call to add several observations at once: its bucket and sum values, which its
            # observe() writes one at a time, are written here with the totals.)
            for bucket, n in enumerate(cell[:-1]):
                if n:
                    child._buckets[bucket].inc(n)
            child._sum.inc(cell[-1])


_recorder: _Recorder | None = None


def start_recording() -> None:
    """In a worker, after the fork: count from now on (when the supervisor named a metrics directory)."""
    global _recorder
    if os.environ.get(DIR_ENV) and _recorder is None:
        _recorder = _Recorder()


def flush() -> None:
    """Write what was recorded to this process's files (the worker's main thread, 4 times a second, and at exit):
    a scrape sees a message's counts within a quarter of a second; a worker SIGKILLed loses at most that much."""
    if _recorder is not None:
        _recorder.flush()


def message(outcome: str, code: str | None = None) -> None:
    if _recorder is not None:
        _recorder.add("messages", (outcome, code or ""))


def retried(code: str) -> None:
    if _recorder is not None:
        _recorder.add("retries", (code,))


def settled(popped: float, queued_at: float | None, now_wall: float) -> None:
    """One message's events are published: ``popped`` (monotonic) and ``queued_at`` (epoch) to now."""
    if _recorder is not None:
        _recorder.observe("processing", (), time.monotonic() - popped)
        if queued_at is not None:
            _recorder.observe("end_to_end", (), now_wall - queued_at)


def stage(name: str, seconds: float, messages: int = 1) -> None:
    """Time spent in one stage, by each of ``messages`` messages (a batch's load is every one's load)."""
    if _recorder is not None and messages > 0:
        _recorder.observe("stages", (name,), seconds, messages)


def tool(kind: str, ok: bool, code: str | None, seconds: float) -> None:
    if _recorder is not None:
        _recorder.add("tools", (kind, "ok" if ok else "failed", code or ""))
        _recorder.observe("tool_seconds", (kind,), seconds)


def sandbox_run(kind: str, outcome: str, killed: str | None = None) -> None:
    if _recorder is not None:
        _recorder.add("sandbox_runs", (kind, outcome))
        if killed:
            _recorder.add("sandbox_kills", (kind, killed))


def llm_request(outcome: str, seconds: float) -> None:
    if _recorder is not None:
        _recorder.add("llm_requests", (outcome,))
        _recorder.observe("llm_seconds", (), seconds)


def llm_retry(code: str) -> None:
    if _recorder is not None:
        _recorder.add("llm_retries", (code,))


def llm_tokens(**by_kind: int) -> None:
    """Tokens of one response, by kind: prompt, output, thoughts; or ``estimated`` when it reported none."""
    if _recorder is not None:
        for kind, n in by_kind.items():
            if n > 0:
                _recorder.add("llm_tokens", (kind,), n)


# ---- the supervisor's side -----------------------------------------------------------------------------------


@dataclass
class Fleet:
    """What the supervisor knows that no worker does, as of a scrape."""

    queued: int | None  # None: Redis did not answer at the last refresh
    dead: int | None
    in_flight: int
    threads: int
    workers: dict[int, int]  # worker id -> pid
    restarts: dict[str, int] = field(default_factory=dict)  # reason -> count


def resident_bytes(pid: int | str = "self") -> int | None:
    """A process's resident memory (its own, not its children's), from /proc/<pid>/statm; None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _FleetCollector:
    def __init__(self, fleet: Callable[[], Fleet]) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        f = self.fleet()
        c = "botworker_"
        if f.queued is not None:
            yield GaugeMetricFamily(c + "queue_depth", "messages waiting in bot_messages", value=f.queued)
        if f.dead is not None:
            yield GaugeMetricFamily(c + "dead_letters", "messages in bot_messages:dead", value=f.dead)
        yield GaugeMetricFamily(c + "redis_up", "1 if Redis answered the supervisor's last refresh",
                                value=int(f.queued is not None))  # fmt: skip
        yield GaugeMetricFamily(c + "in_flight", "messages in hand on this host (busy consumer threads)",
                                value=f.in_flight)  # fmt: skip
        yield GaugeMetricFamily(c + "threads", "consumer threads on this host", value=f.threads)
        yield GaugeMetricFamily(c + "workers", "live worker processes on this host", value=len(f.workers))
        restarts = CounterMetricFamily(
            c + "worker_restarts", "workers replaced, by reason (crashed, killed, hung, recycled)", labels=["reason"]
        )
        for reason, n in sorted(f.restarts.items()):
            restarts.add_metric([reason], n)
        yield restarts
        memory = GaugeMetricFamily(c + "worker_resident_bytes", "resident memory of each worker process",
                                   labels=["worker"])  # fmt: skip
        for wid, pid in sorted(f.workers.items()):
            rss = resident_bytes(pid)
            if rss is not None:
                memory.add_metric([str(wid)], rss)
        yield memory


def _listen(addr: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def metrics_directory() -> str:
    """A fresh private directory for the workers' files: under systemd's RuntimeDirectory (a tmpfs) if any."""
    parent = (os.environ.get("RUNTIME_DIRECTORY") or "").split(":")[0] or None
    return tempfile.mkdtemp(prefix="botworker-metrics-", dir=parent)


@dataclass
class _Client:
    """One scraper's connection: its request as read so far, then what is left of the answer to send."""

    sock: socket.socket
    deadline: float
    request: bytes = b""
    reply: bytes = b""


class Exporter:
    """The supervisor's metrics endpoint and the workers' metrics directory.

    A small non-blocking HTTP server driven by the supervisor's loop: ``readers()``/``writers()`` go into its
    ``select``, ``serve()`` takes what is ready. Nothing here blocks: a scraper that is slow, idle or gone costs
    the loop nothing, and is cut off SCRAPE_TIMEOUT after it connected. (Not ``http.server``: it reads and writes
    one client at a time, blocking, with a time limit per read, so a client dripping a byte a second could hold
    the loop for minutes.)"""

    def __init__(self, addr: str, port: int, fleet: Callable[[], Fleet], directory: str | None = None) -> None:
        self.addr, self.port = addr, port
        self.directory = directory or metrics_directory()
        try:
            self.sock = _listen(addr, port)
        except OSError:
            if directory is None:  # (made here for nothing)
                shutil.rmtree(self.directory, ignore_errors=True)
            raise
        os.environ[DIR_ENV] = self.directory  # before any worker is forked, and before the client is imported
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(self.registry, self.directory)
        self.registry.register(_FleetCollector(fleet))  # type: ignore[arg-type]
        self.address = f"http://{addr}:{self.sock.getsockname()[1]}/metrics"
        self.clients: dict[int, _Client] = {}
        self._paused_until = 0.0  # accept() failing (out of descriptors): leave the listening socket alone a while

    def readers(self) -> list[int]:
        fds = [fd for fd, c in self.clients.items() if not c.reply]
        if len(self.clients) < MAX_CLIENTS and time.monotonic() >= self._paused_until:
            fds.append(self.sock.fileno())  # (beyond MAX_CLIENTS, the kernel's backlog holds the others)
        return fds

    def writers(self) -> list[int]:
        return [fd for fd, c in self.clients.items() if c.reply]

    def serve(self, readable: list[int], writable: list[int]) -> None:
        """Accept, read, answer and send what ``select`` said is ready; drop clients past their deadline. Never
        raises: a failing client is dropped and logged."""
        now = time.monotonic()
        if self.sock.fileno() in readable:
            self._accept(now)
        for fd, client in list(self.clients.items()):
            try:
                if fd in readable and not client.reply:
                    self._read(fd, client)
                elif fd in writable and client.reply:
                    client.reply = client.reply[client.sock.send(client.reply) :]
                    if not client.reply:
                        self._drop(fd)
            except (BlockingIOError, InterruptedError):
                pass
            except Exception as exc:  # a broken scrape must not take the supervisor down
                log.warning("metrics: a request failed: %s", exc)
                self._drop(fd)
        for fd, client in list(self.clients.items()):
            if now > client.deadline:
                self._drop(fd)

    def _accept(self, now: float) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE, ENOBUFS, or a network error accept() reports: try again in a second
            log.warning("metrics: cannot accept a connection: %s", exc)
            self._paused_until = now + 1.0
            return
        conn.setblocking(False)
        self.clients[conn.fileno()] = _Client(conn, now + SCRAPE_TIMEOUT)

    def _read(self, fd: int, client: _Client) -> None:
        chunk = client.sock.recv(4096)
        if not chunk:
            self._drop(fd)
            return
        client.request += chunk
        if b"\r\n\r\n" in client.request:
            client.reply = self._answer(client.request.split(b"\r\n", 1)[0])
        elif len(client.request) > MAX_REQUEST:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd, None)
        if client is not None:
            client.sock.close()

    def _answer(self, request_line: bytes) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        method, _, rest = request_line.decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, kind, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        elif path not in ("/metrics", "/"):
            status, kind, body = "404 Not Found", "text/plain", b"GET /metrics\n"
        else:
            status, kind, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        return head.encode() + b"\r\n" + (b"" if method == "HEAD" else body)

    def worker_gone(self, pid: int) -> None:
        """Fold a dead worker's counters and histograms into the archive and remove its files. A failure is
        logged (the worker's counts are then lost to the metrics), never raised into the supervisor's loop."""
        from prometheus_client.mmap_dict import MmapedDict

        for path in glob.glob(os.path.join(self.directory, f"*_{pid}.db")):
            kind = os.path.basename(path)[: -len(f"_{pid}.db")]
            try:
                if kind in ("counter", "histogram"):
                    archive = MmapedDict(os.path.join(self.directory, f"{kind}_{ARCHIVE}.db"))
                    try:
                        for key, value, stamp, _ in MmapedDict.read_all_values_from_file(path):
                            archive.write_value(key, archive.read_value(key)[0] + value, stamp)
                    finally:
                        archive.close()
                os.remove(path)  # (workers keep no gauges: the supervisor's numbers are collected at scrape time)
            except (OSError, ValueError) as exc:
                log.error("metrics: could not fold %s into the totals: %s", path, exc)

    def close_in_child(self) -> None:
        """In a forked worker: let go of the sockets (the port must close with the supervisor)."""
        for client in self.clients.values():
            client.sock.close()
        self.sock.close()

    def close(self, keep_files: bool = False) -> None:
        for fd in list(self.clients):
            self._drop(fd)
        self.sock.close()
        if not keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)
