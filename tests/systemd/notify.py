"""A stand-in for systemd's notify socket: records what a daemon tells systemd (sd_notify)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

# Microseconds, as systemd puts it in $WATCHDOG_USEC: 0.2 s, so pings come every 0.1 s.
TEST_WATCHDOG_USEC = 200_000


class NotifySocket:
    """Bound like systemd's: the daemon finds it through $NOTIFY_SOCKET (see `env`). Read as
    datagrams arrive, like systemd does: a full queue would make the daemon drop messages.
    Create it inside the running loop."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock, self.receive)
        self.path = path
        self.lines: list[str] = []

    @property
    def env(self) -> dict[str, str]:
        """The variables systemd sets for a Type=notify service with WatchdogSec=."""
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(TEST_WATCHDOG_USEC)}

    def receive(self) -> list[str]:
        """Every line received so far ("READY=1", "STATUS=...", ...), oldest first."""
        while True:
            try:
                datagram = self._sock.recv(4096)
            except BlockingIOError:
                return self.lines
            self.lines.extend(datagram.decode().splitlines())

    def statuses(self) -> list[str]:
        """The STATUS= texts received so far, oldest first."""
        return [line.removeprefix("STATUS=") for line in self.receive() if line[:7] == "STATUS="]

    def count(self, line: str) -> int:
        return self.receive().count(line)

    def close(self) -> None:
        self._loop.remove_reader(self._sock)
        self._sock.close()
