"""The one backoff every retry and re-poll waits by."""

from __future__ import annotations

from blastd.backoff import backoff_s


def test_backoff_doubles_from_the_initial_delay_up_to_the_maximum() -> None:
    """A status broadcast held by rate-limit answers: 1 s, then twice as long, at most 10 s."""
    assert [backoff_s(n, 1.0, 10.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_backoff_takes_another_factor() -> None:
    """A pair limit: 4^n seconds after the n-th request, at most an hour."""
    assert [backoff_s(n, 4.0, 3600.0, factor=4.0) for n in (1, 2, 5, 6, 7)] == [
        4.0,
        16.0,
        1024.0,
        3600.0,
        3600.0,
    ]
