"""Unit tests of ``botworker.retry``: the bounds of the jittered exponential back-off, and reading a Retry-After header
(seconds or an HTTP date).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from botworker.retry import backoff, retry_after


@pytest.mark.parametrize("attempt", range(1, 11))
@pytest.mark.parametrize(("base", "cap"), [(0.5, 30.0), (1.0, 5.0), (0.0, 10.0), (2.0, 1000.0)])
def test_backoff_bounds(attempt: int, base: float, cap: float) -> None:
    ceiling = min(cap, base * 2 ** (attempt - 1))
    low = backoff(attempt, base, cap, rng=lambda: 0.0)
    high = backoff(attempt, base, cap, rng=lambda: 1.0)
    mid = backoff(attempt, base, cap, rng=lambda: 0.5)
    assert low == pytest.approx(ceiling / 2)
    assert high == pytest.approx(ceiling)
    assert low <= mid <= high <= cap
    assert high == pytest.approx(min(cap, base * 2 ** (attempt - 1)))


def test_backoff_grows_then_caps() -> None:
    highs = [backoff(n, 0.5, 10.0, rng=lambda: 1.0) for n in range(1, 11)]
    assert highs == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0, 10.0]
    assert backoff(0, 0.5, 10.0, rng=lambda: 1.0) == 0.5  # attempt < 1 counts as the first
    assert backoff(-3, 0.5, 10.0, rng=lambda: 0.0) == 0.25


def test_backoff_default_rng_in_range() -> None:
    for _ in range(200):
        assert 2.0 <= backoff(3, 1.0, 60.0) <= 4.0


NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        ("007", 7.0),
        (format_datetime(datetime(2024, 5, 1, 12, 0, 30, tzinfo=UTC), usegmt=True), 30.0),
        ("Wed, 01 May 2024 12:02:00 GMT", 120.0),
        ("Wed, 01 May 2024 14:02:00 +0200", 120.0),
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past: now
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("1e3", None),
        ("Wed, 99 Foo 2024 12:00:00 GMT", None),
        ("Wed, 01 May", None),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    got = retry_after(value, now=lambda: NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


@pytest.mark.parametrize("value", ["²", "1²", "³"])
def test_retry_after_unicode_digit_garbage_is_none(value: str) -> None:
    # str.isdigit() is True for superscripts (U+00B2 is in Latin-1, so a header can carry it) but float() refuses
    # them: the ValueError escapes instead of None ("unreadable").
    assert retry_after(value, now=lambda: NOW) is None
