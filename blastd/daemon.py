"""The top of the daemon: run() opens the resources and owns every task; serve() wires signals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import signal
from collections.abc import Awaitable, Callable

import structlog

from blastd import admin, campaigns, health, intake, lease, reconcile, watchdog
from blastd.config import Settings
from blastd.errors import DrainTimeoutError
from blastd.resources import Dependencies, open_dependencies
from blastd.shutdown import Shutdown
from blastd.video import poller as video_poller

log = structlog.get_logger()


async def run(settings: Settings, shutdown: Shutdown) -> None:
    """Run the daemon until shutdown; raises DrainTimeoutError if the drain was cut short."""
    token = secrets.token_hex(8)
    status = watchdog.StatusLine()
    ping_interval_s = watchdog.ping_interval_s(os.environ, os.getpid())
    async with watchdog.pinging(ping_interval_s), contextlib.AsyncExitStack() as stack:
        deps = await shutdown.unless_requested(open_dependencies(stack, settings, status.set))
        if deps is None:
            return
        status.set("starting: waiting for the instance lease")
        if not await lease.claim_instance_id(deps, token, shutdown):
            return
        status.set("starting: recovering")
        await lease.recover_instance(deps, settings.instance_id)
        await admin.start(stack, deps)
        watchdog.notify("READY=1")
        log.info("daemon_ready", instance=settings.instance_id, accounts=sorted(deps.senders))
        try:
            await _serve(deps, token, shutdown, status)
        except TimeoutError:
            log.error("drain_cut_short", timeout_s=settings.drain_timeout_s)
            raise DrainTimeoutError from None
        await deps.redis_call(
            deps.redis.delete, lease.instance_key(settings.redis_prefix, settings.instance_id)
        )
        log.info("drain_finished")


async def _serve(
    deps: Dependencies, token: str, shutdown: Shutdown, status: watchdog.StatusLine
) -> None:
    async with shutdown.deadline(deps.settings.drain_timeout_s), asyncio.TaskGroup() as outer:
        work_done = asyncio.Event()
        writers = [
            outer.create_task(deps.outcomes.run(), name="outcomes"),
            outer.create_task(deps.receipts.run(), name="receipts"),
        ]
        outer.create_task(lease.keep_instance_alive(deps, token, work_done), name="heartbeat")
        outer.create_task(health.watch_dependencies(deps, status, work_done), name="health")
        async with asyncio.TaskGroup() as producers:
            producers.create_task(intake.run(deps, shutdown), name="intake")
            producers.create_task(campaigns.run(deps, shutdown), name="campaigns")
            producers.create_task(reconcile.run(deps, shutdown), name="reconcile")
            if deps.video_accounts:
                producers.create_task(video_poller.run(deps, shutdown), name="video-poller")
            await _watch_for_drain(deps, shutdown, status)
        deps.outcomes.close()  # producers are done: write the last batch, then return
        deps.receipts.close()
        await asyncio.gather(*writers)
        work_done.set()


async def _watch_for_drain(
    deps: Dependencies, shutdown: Shutdown, status: watchdog.StatusLine
) -> None:
    await shutdown.wait(None, None)
    deps.is_draining = True
    watchdog.notify("STOPPING=1")
    status.set("draining")
    log.info("drain_started")


# Every send allocates a handful of short-lived objects (request, response, outcome), so the
# default gen-0 threshold of 700 runs a collection every few sends, each walking the objects
# the imports left behind. Freezing those and collecting less often cut the daemon's CPU per
# message by about a fifth (bench/throughput.py: 272 -> 212 us). Cycles are still collected.
GC_GEN0_THRESHOLD = 50_000


def _tune_garbage_collector() -> None:
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def serve(settings: Settings) -> int:
    """Run the daemon in a new event loop, SIGTERM/SIGINT wired to a drain; return the exit code."""
    try:
        import uvloop

        runner: Callable[[Awaitable[None]], None] = uvloop.run  # type: ignore[assignment]
    except ImportError:
        runner = asyncio.run  # type: ignore[assignment]

    async def main() -> None:
        _tune_garbage_collector()
        shutdown = Shutdown()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown.request)
        try:
            await run(settings, shutdown)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    try:
        runner(main())
    except DrainTimeoutError:
        return 1
    return 0
