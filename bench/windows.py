"""The largest number of events that any window of a given width holds, wherever it starts."""

from __future__ import annotations

from collections.abc import Sequence


def max_in_window(times: Sequence[float], width_s: float) -> int:
    """Most events in any half-open window [t, t + width_s); times must be sorted."""
    most = 0
    left = 0
    for right, time in enumerate(times):
        # Compare against times[left] + width_s, the same sum a limiter computes for its
        # earliest next release, so float rounding cannot count a legal release twice.
        while time >= times[left] + width_s:
            left += 1
        most = max(most, right - left + 1)
    return most
