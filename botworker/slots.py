"""CPU slots: how many threads of a worker process run the CPU-bound part of a message at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class CpuSlots:
    """At most ``n`` threads of a worker run the CPU-bound part of a message at once; a thread gives its slot up while
    it waits (on the LLM, a tool, a back-off) and takes one again to go on.

    Threads are for waiting. Without this, T threads busy with CPU-bound messages (the offline responder, a backlog)
    would hand the GIL to one another at every round trip: measured, 16 threads cost 20-30 % of the throughput of
    one. A thread pops without a slot (a blocked pop is a wait) and takes one before it processes the message."""

    def __init__(self, n: int, beat: Callable[[], None]) -> None:
        self._slots = threading.Semaphore(n)
        self._beat = beat
        self._held = threading.local()

    @contextmanager
    def hold(self) -> Iterator[None]:
        self._take()
        try:
            yield
        finally:
            self._held.on = False
            self._slots.release()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a wait: the slot goes to another thread meanwhile (nothing to do when this thread holds none)."""
        if not getattr(self._held, "on", False):
            yield
            return
        self._held.on = False
        self._slots.release()
        try:
            yield
        finally:
            self._take()

    def _take(self) -> None:
        while not self._slots.acquire(timeout=0.25):
            self._beat()  # waiting for a slot is not being stuck
        self._held.on = True
