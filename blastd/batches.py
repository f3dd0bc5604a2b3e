"""Group writes into batches: one ledger statement per flush, never one round trip per message."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import structlog

from blastd.errors import UnavailableError

T = TypeVar("T")
log = structlog.get_logger()


class BatchWriter(Generic[T]):
    """Collects items and writes them with `write` when `flush_rows` pile up or `flush_interval_s`
    passes. A failed write is retried until it succeeds: outcomes are never dropped, and the
    provider already acted on them."""

    def __init__(
        self,
        name: str,
        write: Callable[[Sequence[T]], Awaitable[object]],
        *,
        flush_rows: int,
        flush_interval_s: float,
        retry_s: float,
    ) -> None:
        self.name = name
        self._write = write
        self._flush_rows = flush_rows
        self._flush_interval_s = flush_interval_s
        self._retry_s = retry_s
        self._items: list[T] = []
        loop = asyncio.get_running_loop()
        self._next_flush: asyncio.Future[None] = loop.create_future()  # covers self._items
        self._writing: asyncio.Future[None] | None = None  # covers the batch being written
        self._has_items = asyncio.Event()  # a flush is due now
        self._first_item = asyncio.Event()  # the queue is no longer empty
        self._is_closed = False

    def add(self, item: T) -> None:
        """Queue one item for the next flush."""
        self._items.append(item)
        if len(self._items) == 1:
            self._first_item.set()
        if len(self._items) >= self._flush_rows:
            self._has_items.set()

    async def add_durably(self, items: Sequence[T]) -> None:
        """Queue items and return once the flush that carries them has committed."""
        self._items.extend(items)
        self._first_item.set()
        self._has_items.set()
        await self.synced()

    async def synced(self) -> None:
        """Return once every item added before this call has been written."""
        if self._items:
            await asyncio.shield(self._next_flush)
        elif self._writing is not None and not self._writing.done():
            await asyncio.shield(self._writing)

    def close(self) -> None:
        """Write what is left, then let run() return."""
        self._is_closed = True
        self._first_item.set()
        self._has_items.set()

    async def run(self) -> None:
        """Flush until closed and empty."""
        while not (self._is_closed and not self._items):
            if not self._items or len(self._items) < self._flush_rows:
                await self._wait_for_rows()
            if self._items:
                await self._flush()

    async def _wait_for_rows(self) -> None:
        self._has_items.clear()
        if self._is_closed:
            return
        if not self._items:
            # Asleep until the first item, not ticking every interval: an idle daemon has two
            # writers. The interval runs from that item, so none waits longer than before.
            self._first_item.clear()
            await self._first_item.wait()
            if self._has_items.is_set():
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._has_items.wait(), self._flush_interval_s)

    async def _flush(self) -> None:
        batch, self._items = self._items, []
        done = self._writing = self._next_flush
        self._next_flush = asyncio.get_running_loop().create_future()
        while True:
            try:
                # Shielded: a cancelled drain must not abandon outcomes the provider acted on.
                await asyncio.shield(self._write(batch))
                break
            except UnavailableError as exc:
                log.warning(
                    "batch_write_retried", writer=self.name, rows=len(batch), error=repr(exc)
                )
                await asyncio.sleep(self._retry_s)
        done.set_result(None)
