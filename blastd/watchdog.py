"""sd_notify(3) from the event loop: readiness, the STATUS= line and the WATCHDOG=1 pings.

The pings come from a task on the daemon's own loop, so a loop that stalls (a blocking call, a
busy coroutine) stops them and systemd kills and restarts the process (`WatchdogSec=`). An
outage of Redis or PostgreSQL does not stop them: the services wait, the loop keeps turning.
Outside systemd (no $NOTIFY_SOCKET) every function here is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Mapping

US_PER_S = 1_000_000


def notify(message: str) -> None:
    """Send one sd_notify message ("READY=1", "STATUS=...", ...) to systemd, if it listens.

    Best effort, like sd_notify(3): a socket that is gone or full drops the message rather
    than block the loop or stop the daemon (systemd notices missing pings on its own)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.sendto(message.encode(), address)


class StatusLine:
    """The one-line STATUS= text `systemctl status` shows; sent only when it changes."""

    def __init__(self) -> None:
        self.text = ""

    def set(self, text: str) -> None:
        if text != self.text:
            self.text = text
            notify(f"STATUS={text}")


def ping_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """Half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when the watchdog is off
    or meant for another process ($WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC")
    owner = environ.get("WATCHDOG_PID")
    if not usec or (owner and owner != str(pid)):
        return None
    return int(usec) / US_PER_S / 2


@contextlib.asynccontextmanager
async def pinging(interval_s: float | None) -> AsyncIterator[None]:
    """Ping systemd's watchdog every `interval_s` while the block runs (not at all for None)."""
    if interval_s is None:
        yield
        return
    stopped = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(_ping_until(stopped, interval_s), name="watchdog")
        try:
            yield
        finally:
            stopped.set()


async def _ping_until(stopped: asyncio.Event, interval_s: float) -> None:
    while not stopped.is_set():
        notify("WATCHDOG=1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), interval_s)
