"""A local HTTP server that speaks Gemini's REST API, for tests: it records every request and answers from a script.

    gemini.script(call("platform", {"operation": "list_models"}), text("You have 3 models."))
    ... point the worker at it: GEMINI_BASE_URL=gemini.url
    gemini.requests[0].body["contents"]  # exactly what the worker sent

Each request takes the next step of the script (``then`` answers once the script is used up; without it the
server answers 500 "script exhausted", so a test that sends more requests than it planned fails loudly). Steps:
``text``, ``call`` (functionCall parts), ``error`` (a Google error body, with headers such as Retry-After),
``blocked_prompt``/``blocked_answer``, ``raw`` (any bytes: malformed JSON), and ``slow(step, seconds)``.
Used as a pytest plugin (``pytest_plugins = ["gemini_server"]``): the ``gemini`` fixture is a started server.
PYTEST_DONT_REWRITE: there are no asserts here, and test modules import it before pytest loads it as a plugin.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

MODEL_VERSION = "gemini-2.5-flash-test-001"


@dataclass(frozen=True)
class Step:
    """One scripted answer: status, JSON body (or raw bytes), extra headers, and a delay before answering."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it; ``at`` is time.monotonic() on arrival."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


def usage(prompt: int, output: int) -> dict[str, int]:
    return {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output}


def answer(parts: list[dict[str, Any]], prompt: int, output: int, finish: str = "STOP") -> dict[str, Any]:
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}],
        "usageMetadata": usage(prompt, output),
        "modelVersion": MODEL_VERSION,
        "responseId": "test-response",
    }


def text(reply: str, prompt: int = 20, output: int = 5, finish: str = "STOP") -> Step:
    return Step(body=answer([{"text": reply}], prompt, output, finish))


def call(name: str, args: dict[str, Any] | None = None, *more: tuple[str, dict[str, Any]], prompt: int = 30) -> Step:
    """A response with one functionCall part per call, in order."""
    calls = [(name, args or {}), *more]
    parts = [{"functionCall": {"name": n, "args": a}} for n, a in calls]
    return Step(body=answer(parts, prompt, 10))


def error(status: int, message: str, name: str, details: list[dict[str, Any]] | None = None, **headers: str) -> Step:
    """A Google error body; keyword arguments become headers (``Retry_After="2"`` -> ``Retry-After: 2``)."""
    body: dict[str, Any] = {"error": {"code": status, "message": message, "status": name}}
    if details:
        body["error"]["details"] = details
    return Step(status, body, {k.replace("_", "-"): v for k, v in headers.items()})


def blocked_prompt(reason: str = "SAFETY") -> Step:
    return Step(body={"promptFeedback": {"blockReason": reason}, "usageMetadata": usage(12, 0)})


def blocked_answer(reason: str = "SAFETY") -> Step:
    return Step(body={"candidates": [{"finishReason": reason, "index": 0}], "usageMetadata": usage(12, 0)})


def raw(data: bytes, status: int = 200) -> Step:
    return Step(status, data)


def slow(step: Step, seconds: float) -> Step:
    return dataclasses.replace(step, delay=seconds)


class GeminiServer:
    """A ThreadingHTTPServer on 127.0.0.1 in a background thread."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.then: Step | None = None
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="gemini-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self) -> GeminiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, *steps: Step, then: Step | None = None) -> None:
        with self._lock:
            self.steps.extend(steps)
            self.then = then

    def bodies(self) -> list[Any]:
        return [r.body for r in self.requests]

    def _next(self, request: Recorded) -> Step:
        with self._lock:
            self.requests.append(request)
            if self.steps:
                return self.steps.pop(0)
            if self.then is not None:
                return self.then
        return error(500, "script exhausted: the test sent more requests than it planned", "INTERNAL")

    def _sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)


def _handler(server: GeminiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(length)
            try:
                body: Any = json.loads(data)
            except ValueError:
                body = data
            headers = {k.lower(): v for k, v in self.headers.items()}
            step = server._next(Recorded("POST", self.path, headers, body, time.monotonic()))
            server._sleep(step.delay)
            payload = step.body if isinstance(step.body, bytes) else json.dumps(step.body).encode()
            try:
                self.send_response(step.status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in step.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def gemini() -> Iterator[GeminiServer]:
    server = GeminiServer().start()
    yield server
    server.stop()
