"""Back-off arithmetic shared by tool calls and the LLM client: exponential with half jitter, ``Retry-After``.

Pure functions (the randomness and the clock are parameters), so tests can pin them down.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime


def backoff(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): uniform in [base*2^(n-1)/2, base*2^(n-1)],
    at most ``cap``. Half-jitter keeps a floor, so retries from many workers spread out but never hammer."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return ceiling / 2 + rng() * ceiling / 2


def retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """A ``Retry-After`` header (delta-seconds or an HTTP date) in seconds from now; None if absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if re.fullmatch(r"[0-9]+", text):  # not str.isdigit(): that accepts "²", which float() refuses
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now())
