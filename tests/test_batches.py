"""BatchWriter on a virtual clock: when it writes, and that an idle writer sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from blastd.batches import BatchWriter
from tests.test_pacing import run_on_virtual_clock, virtual_loop

FLUSH_INTERVAL_S = 0.05


async def writer_and_log(
    flush_interval_s: float = FLUSH_INTERVAL_S,
) -> tuple[BatchWriter[int], list[tuple[float, list[int]]]]:
    loop = virtual_loop()
    written: list[tuple[float, list[int]]] = []

    async def write(items: Sequence[int]) -> None:
        written.append((loop.time(), list(items)))

    writer = BatchWriter("test", write, flush_rows=3, flush_interval_s=flush_interval_s, retry_s=1)
    return writer, written


def test_an_idle_writer_sleeps_until_an_item_comes_and_writes_it_one_interval_later() -> None:
    async def main() -> tuple[int, list[tuple[float, list[int]]]]:
        writer, written = await writer_and_log()
        running = asyncio.create_task(writer.run())
        await asyncio.sleep(60)  # the only timer while the writer has nothing to write
        idle_jumps = virtual_loop().clock_jumps
        writer.add(1)
        await asyncio.sleep(0.01)
        writer.add(2)
        await writer.synced()
        writer.close()
        await running
        return idle_jumps, written

    idle_jumps, written = run_on_virtual_clock(main())

    assert idle_jumps == 1
    [(written_at, items)] = written
    assert written_at == pytest.approx(60 + FLUSH_INTERVAL_S)
    assert items == [1, 2]


def test_enough_rows_and_durable_items_are_written_at_once() -> None:
    async def main() -> list[tuple[float, list[int]]]:
        writer, written = await writer_and_log(flush_interval_s=3600)
        running = asyncio.create_task(writer.run())
        for item in (1, 2, 3):
            writer.add(item)
        await writer.synced()
        await writer.add_durably([4])
        writer.close()
        await running
        return written

    assert run_on_virtual_clock(main()) == [(0.0, [1, 2, 3]), (0.0, [4])]
