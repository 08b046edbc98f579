"""Prometheus metrics: a real fleet with METRICS_PORT set, scraped during traffic; every count checked against the
events the messages produced; totals kept across a worker's death; the queuedAt field the latency metric reads."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from botworker.devservers import free_port
from botworker.message import queued_at_of
from botworker.queue import ERRORS, RESPONSES

from conftest import Bot, Fleet, events, push, wait_for
from gemini_server import GeminiServer, error, text
from toolkit import add_tool

pytest_plugins = ["gemini_server"]
pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of one scrape: (name, sorted labels) -> value; the text must parse as Prometheus'."""
    reply = requests.get(url, timeout=5)
    reply.raise_for_status()
    assert reply.headers["Content-Type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(reply.text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def by_label(samples: Samples, name: str, *keys: str) -> Counter[tuple[str, ...]]:
    found: Counter[tuple[str, ...]] = Counter()
    for (n, ls), v in samples.items():
        if n == name and v:
            found[tuple(dict(ls)[k] for k in keys)] += int(v)
    return found


def test_queued_at_is_read_in_milliseconds_or_iso_and_ignored_when_unreadable() -> None:
    assert queued_at_of({"queuedAt": 1_700_000_000_123}) == pytest.approx(1_700_000_000.123)
    assert queued_at_of({"queuedAt": "2026-12-06T10:00:00Z"}) == pytest.approx(1_796_551_200.0)
    for bad in ("yesterday", "2026-12-06T10:00:00", True, -5, float("nan"), None, [1]):
        assert queued_at_of({"queuedAt": bad}) is None
    assert queued_at_of({}) is None


def test_a_scrape_during_traffic_counts_exactly_what_was_sent(
    r: redis.Redis,
    db: psycopg.Connection[Any],
    bot: Bot,
    gemini: GeminiServer,
    start_fleet: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    add_tool(db, bot, "spinner", "custom_script", {"script": "while True:\n    pass", "timeout": 1})
    # One transient failure of the model (retried), then answers with known token counts.
    gemini.script(error(503, "overloaded", "UNAVAILABLE"), then=text("Done.", prompt=20, output=5))
    port = free_port()
    fleet = start_fleet(
        2,
        args=("--threads", "4"),
        METRICS_PORT=str(port),
        RUNTIME_DIRECTORY=str(tmp_path),  # where systemd would put it: the metrics directory goes under it
        GEMINI_KEY="test-key",
        GEMINI_BASE_URL=gemini.url,
        LLM_RETRY_DELAY="0.05",
    )
    url = f"http://127.0.0.1:{port}/metrics"
    first = scrape(url)
    assert total(first, "botworker_workers") == 2 and total(first, "botworker_threads") == 8
    assert total(first, "botworker_messages_total") == 0

    now_ms = int(time.time() * 1000)
    sent = [bot.message(f"hello {i}", queuedAt=now_ms) for i in range(12)]
    sent += [bot.message('ask greeter to greet "Ada"') for _ in range(3)]
    sent += [bot.message("ask spinner to spin")]
    sent += [{**bot.message("who are you?"), "botId": str(uuid.uuid4())} for _ in range(2)]  # unknown bot

    seen: list[Samples] = []
    done = threading.Event()

    def scraper() -> None:  # scrapes all along: each must parse, and counters never go back
        while not done.is_set():
            seen.append(scrape(url))
            time.sleep(0.1)

    watcher = threading.Thread(target=scraper)
    watcher.start()
    try:
        for payload in sent:
            push(r, payload)
        wait_for(lambda: len({e["messageId"] for e in events(r, RESPONSES) + events(r, ERRORS)}) == len(sent), 60,
                 "every message settled")  # fmt: skip
        wait_for(lambda: total(scrape(url), "botworker_messages_total") == len(sent), 10, "the counts scraped")
    finally:
        done.set()
        watcher.join()
    assert len(seen) >= 3
    for earlier, later in itertools.pairwise(seen):
        assert total(later, "botworker_messages_total") >= total(earlier, "botworker_messages_total")

    # Messages by outcome and code: exactly what the events say.
    responses, errs = events(r, RESPONSES), events(r, ERRORS)
    error_code = {e["messageId"]: e["code"] for e in errs}
    answered = {e["messageId"] for e in responses}
    expected = Counter(("answered", error_code.get(mid, "")) for mid in answered)
    expected += Counter(("failed", e["code"]) for e in errs if e["messageId"] not in answered)
    samples = scrape(url)
    assert by_label(samples, "botworker_messages_total", "outcome", "code") == expected
    assert expected[("failed", "bot_not_found")] == 2 and len(answered) == 16

    # Latency: one observation per message and stage (queuedAt only where the producer set it).
    settled = len(sent)
    assert total(samples, "botworker_processing_seconds_count") == settled
    assert total(samples, "botworker_end_to_end_seconds_count") == 12
    assert total(samples, "botworker_stage_seconds_count", stage="queue_wait") == 12
    for stage in ("load", "tools", "llm", "save"):
        assert total(samples, "botworker_stage_seconds_count", stage=stage) == len(answered), stage
    assert total(samples, "botworker_stage_seconds_count", stage="publish") == settled
    assert total(samples, "botworker_stage_seconds_bucket", stage="llm", le="+Inf") == len(answered)

    # Tools and the sandbox: three greetings ran, one spinner was killed at its limit.
    assert by_label(samples, "botworker_tool_calls_total", "type", "outcome") == Counter(
        {("shell_command", "ok"): 3, ("custom_script", "failed"): 1}
    )
    assert by_label(samples, "botworker_sandbox_runs_total", "kind", "outcome") == Counter(
        {("shell", "ok"): 3, ("script", "killed"): 1}
    )
    [(kind, reason)] = by_label(samples, "botworker_sandbox_kills_total", "kind", "reason")
    assert kind == "script" and reason in ("wall_time", "cpu_time")

    # The model: every answered message's request, one 503 retried, tokens as the server reported them.
    assert total(samples, "botworker_llm_requests_total", outcome="ok") == len(answered)
    assert total(samples, "botworker_llm_requests_total") == len(answered) + 1
    assert total(samples, "botworker_llm_retries_total") == 1
    assert total(samples, "botworker_llm_tokens_total", kind="prompt") == 20 * len(answered)
    assert total(samples, "botworker_llm_tokens_total", kind="output") == 5 * len(answered)

    # What the supervisor knows.
    assert total(samples, "botworker_queue_depth") == 0 and total(samples, "botworker_redis_up") == 1
    assert total(samples, "botworker_dead_letters") == 0 and total(samples, "botworker_in_flight") == 0
    memory = by_label(samples, "botworker_worker_resident_bytes", "worker")
    assert set(memory) == {("0",), ("1",)} and all(v > 10 << 20 for v in memory.values())

    # A worker killed: its counts stay (folded into the archive), its files go, the restart is counted.
    [directory] = tmp_path.glob("botworker-metrics-*")
    victim = fleet.worker_pids()[0]
    assert list(directory.glob(f"*_{victim}.db"))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in fleet.worker_pids() and len(fleet.worker_pids()) == 2, 20, "a replacement")
    after = wait_for(lambda: (s := scrape(url)) and total(s, "botworker_worker_restarts_total") and s, 10, "restart")
    assert by_label(after, "botworker_worker_restarts_total", "reason") == Counter({("killed",): 1})
    assert by_label(after, "botworker_messages_total", "outcome", "code") == expected
    assert total(after, "botworker_stage_seconds_count", stage="llm") == len(answered)
    assert not list(directory.glob(f"*_{victim}.db"))
    assert {p.name for p in directory.glob("*_archive.db")} == {"counter_archive.db", "histogram_archive.db"}

    # A warm stop removes the directory.
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == 0
    assert not directory.exists()


def test_a_metrics_port_in_use_stops_the_start_with_a_clear_error(
    start_fleet: Callable[..., Fleet], tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fleet = start_fleet(1, wait=False, METRICS_PORT=str(taken.getsockname()[1]), RUNTIME_DIRECTORY=str(tmp_path))
        assert fleet.wait() == 3  # EXIT_CONFIG
    assert "METRICS_PORT: cannot listen on 127.0.0.1" in fleet.log()
    assert not list(tmp_path.glob("botworker-metrics-*"))  # nothing left behind


def test_a_reload_to_a_port_in_use_keeps_the_old_endpoint_and_tries_again_at_the_next(
    spawn: Callable[..., Fleet], tmp_path: Path
) -> None:
    env_file = tmp_path / "botworker.env"
    first = free_port()
    env_file.write_text(f"WORKER_PROCS=1\nMETRICS_PORT={first}\n")
    fleet = spawn([sys.executable, "-m", "botworker", "run", "--env-file", str(env_file)],
                  RUNTIME_DIRECTORY=str(tmp_path))  # fmt: skip
    fleet.wait_workers(1)
    assert total(scrape(f"http://127.0.0.1:{first}/metrics"), "botworker_workers") == 1
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    second = taken.getsockname()[1]
    env_file.write_text(f"WORKER_PROCS=1\nMETRICS_PORT={second}\n")
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: "the metrics stay where they were" in fleet.log(), 20, "the refused port")
    fleet.wait_workers(1)
    assert total(scrape(f"http://127.0.0.1:{first}/metrics"), "botworker_workers") == 1
    taken.close()
    fleet.signal(signal.SIGHUP)  # the same file: the port is free now
    wait_for(lambda: f"metrics: serving http://127.0.0.1:{second}" in fleet.log(), 20, "the new port")
    assert total(scrape(f"http://127.0.0.1:{second}/metrics"), "botworker_workers") >= 1
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{first}/metrics", timeout=5)
    fleet.signal(signal.SIGTERM)
    assert fleet.wait() == 0
    assert not list(tmp_path.glob("botworker-metrics-*"))


def test_a_slow_scraper_cannot_hold_the_supervisor(start_fleet: Callable[..., Fleet]) -> None:
    """A client dripping its request a byte at a time, and ten that send nothing, are cut off (2 s after they
    connected), and a scrape is answered meanwhile: the endpoint is served from the supervisor's loop, which must
    not stall."""
    port = free_port()
    start_fleet(1, METRICS_PORT=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    drip = socket.create_connection(("127.0.0.1", port))
    stop = threading.Event()

    def dripping() -> None:
        try:
            for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":  # 17 s at this pace, never a whole head
                if stop.wait(0.5):
                    return
                drip.send(bytes([byte]))
        except OSError:
            pass  # cut off: what must happen

    thread = threading.Thread(target=dripping)
    thread.start()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]  # connected, never a byte
    try:
        time.sleep(0.3)
        assert total(scrape(url), "botworker_workers") == 1  # (scrape gives up after 5 s)
        drip.settimeout(10)
        assert drip.recv(100) == b""  # closed without an answer
        for sock in idle:
            sock.settimeout(10)
            assert sock.recv(100) == b""
    finally:
        stop.set()
        thread.join()
        drip.close()
        for sock in idle:
            sock.close()
    assert requests.get(f"http://127.0.0.1:{port}/nothing", timeout=5).status_code == 404
    assert requests.post(url, timeout=5).status_code == 405
    head = requests.head(url, timeout=5)
    assert head.status_code == 200 and not head.content
