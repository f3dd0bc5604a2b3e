"""The exponential backoff: how long to wait after the n-th failure in a row."""

from __future__ import annotations


def backoff_s(attempt: int, initial_s: float, max_s: float, factor: float = 2.0) -> float:
    """`initial_s` after the first failure (attempt 1), `factor` times as long after each
    further one, never more than `max_s`."""
    delay_s: float = min(initial_s * factor ** (attempt - 1), max_s)
    return delay_s
