"""Shutdown: the state a signal changes, and the drain deadline every service honours."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Shutdown:
    """Signals only change this state; services poll `is_requested` and wait on `wait()`."""

    def __init__(self) -> None:
        self._requested = asyncio.Event()
        self._scope: asyncio.Timeout | None = None
        self._drain_timeout_s = 0.0

    @property
    def is_requested(self) -> bool:
        return self._requested.is_set()

    def request(self) -> None:
        """First call: drain until now + drain timeout. Second call: stop now."""
        loop = asyncio.get_running_loop()
        if self._scope is not None:
            extra_s = 0.0 if self.is_requested else self._drain_timeout_s
            self._scope.reschedule(loop.time() + extra_s)
        self._requested.set()

    @contextlib.asynccontextmanager
    async def deadline(self, drain_timeout_s: float) -> AsyncIterator[None]:
        """Bound the drain: once requested, the block is cancelled after `drain_timeout_s`."""
        self._drain_timeout_s = drain_timeout_s
        async with asyncio.timeout(None) as scope:
            self._scope = scope
            if self.is_requested:
                scope.reschedule(asyncio.get_running_loop().time() + drain_timeout_s)
            try:
                yield
            finally:
                self._scope = None  # a signal after the block must not reschedule a spent timer

    async def unless_requested(self, work: Coroutine[Any, Any, T]) -> T | None:
        """Run `work` to its end, or cancel it and return None once shutdown is requested:
        waiting for Redis or PostgreSQL at start-up must not make SIGTERM wait too."""
        task = asyncio.ensure_future(work)
        requested = asyncio.ensure_future(self._requested.wait())
        try:
            await asyncio.wait([task, requested], return_when=asyncio.FIRST_COMPLETED)
        finally:
            requested.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
        return task.result()

    async def wait(self, event: asyncio.Event | None, timeout_s: float | None) -> None:
        """Sleep until `event` is set, shutdown is requested, or `timeout_s` passes."""
        waiters = [asyncio.ensure_future(self._requested.wait())]
        if event is not None:
            waiters.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
