"""systemd/blastd.service and what blastd tells systemd.

Three levels: the unit file itself (settings, `systemd-analyze security` exposure); a real
`blastd run` talking to a stand-in notify socket (READY, STATUS, WATCHDOG, STOPPING); and the
unit under a real systemd booted in systemd-nspawn (start, watchdog restart, clean stop).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.config import Settings
from blastd.embedded import free_port
from blastd.watchdog import ping_interval_s
from tests.harness import (
    ACCOUNT,
    APP_SECRET,
    PHONE_NUMBER_ID,
    TOKEN,
    SandboxHandle,
    Servers,
    blast_job,
    campaign_state,
    daemon_env,
    daemon_process,
    numbers_from,
    recipient_rows,
    wait_until,
)
from tests.systemd import nspawn
from tests.systemd.notify import NotifySocket

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "blastd.service"
MAX_EXPOSURE = 1.5
EXPOSURE = re.compile(r"Overall exposure level for blastd\.service: (\d+\.\d+)")


def _unit_settings() -> dict[str, list[str]]:
    """Key -> every value given for it in the unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_unit_declares_notify_watchdog_restart_policy_and_secrets() -> None:
    unit = _unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RestartPreventExitStatus"] == ["78"]  # a config error: restarts cannot help
    assert unit["EnvironmentFile"] == ["/etc/blastd/blastd.env"]
    assert {v.split(":")[0] for v in unit["LoadCredential"]} >= {f"{ACCOUNT}.token"}
    # Stop waits for the whole drain, plus room (Sidekiq's N + 5 rule), before SIGKILL.
    drain_timeout_s = Settings.model_fields["drain_timeout_s"].default
    assert int(unit["TimeoutStopSec"][0]) >= drain_timeout_s + 5
    assert int(unit["WatchdogSec"][0]) > 0


def _systemd_analyze() -> str:
    """The systemd-analyze binary, installing Debian's systemd package when it is missing."""
    found = shutil.which("systemd-analyze")
    if found:
        return found
    if nspawn.cannot_boot_reason() is not None or not shutil.which("apt-get"):
        pytest.fail(
            "systemd-analyze is missing and installing it needs root and apt-get; "
            f"{nspawn.LEAVE_OUT}"
        )
    subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "systemd"], check=True, capture_output=True)
    return "systemd-analyze"


@pytest.mark.systemd
def test_unit_exposure_is_at_most_1_5() -> None:
    result = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        check=True,
    )
    found = EXPOSURE.search(result.stdout)
    assert found, result.stdout[-2000:]
    exposure = float(found.group(1))
    print(f"\nsystemd-analyze security --offline=true {UNIT.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE


def test_watchdog_pings_at_half_the_interval_for_this_process_only() -> None:
    assert ping_interval_s({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert ping_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert ping_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert ping_interval_s({}, 42) is None


async def test_daemon_tells_systemd_ready_status_watchdog_and_stopping(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    env = daemon_env(
        servers, sandbox.url, free_port(), BLASTD_HEALTH_CHECK_INTERVAL_S="0.1", **notify.env
    )
    try:
        async with daemon_process(env, tmp_path / "out.log", tmp_path / "err.log") as process:
            await wait_until(lambda: "READY=1" in notify.receive(), timeout_s=30)
            await wait_until(lambda: "idle: no running campaign" in notify.statuses())
            job = blast_job("notify", numbers_from(40_000_000, 100), options={"rate_per_s": 20})
            await redis.lpush("blastd:jobs", job)
            await wait_until(lambda: "sending: 1 campaign" in notify.statuses())
            pings = notify.count("WATCHDOG=1")
            await wait_until(lambda: notify.count("WATCHDOG=1") >= pings + 3)
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        lines, statuses = notify.receive(), notify.statuses()
    finally:
        notify.close()
    assert statuses[:2] == ["starting: waiting for redis", "starting: waiting for postgres"]
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert statuses[-1] == "draining"
    assert lines.index("WATCHDOG=1") < lines.index("READY=1"), "pings start with the process"


# --- Under a real systemd ------------------------------------------------------------------

WATCHDOG_SEC = 3  # the unit's 30 s, shortened: the stall below must outlast it
UNIT_DROP_IN = f"""[Service]
# The test stalls the daemon for longer than this; 30 s would make it wait that long.
WatchdogSec={WATCHDOG_SEC}
"""


def _container_env(servers: Servers, sandbox_url: str) -> str:
    """The EnvironmentFile: the host's test servers and sandbox, no secrets (credentials)."""
    account = {
        "kind": "cloud_api",
        "base_url": sandbox_url,
        "phone_number_id": PHONE_NUMBER_ID,
        "rate_per_s": 0,
        "concurrency": 20,
    }
    settings = {
        "BLASTD_REDIS_URL": servers.redis_url,
        "BLASTD_DATABASE_URL": servers.database_url,
        "BLASTD_ACCOUNTS": "'" + orjson.dumps({ACCOUNT: account}).decode() + "'",
        "BLASTD_ADMIN__PORT": str(free_port()),
        "BLASTD_INSTANCE_ID": "nspawn-test",
        "BLASTD_INSTANCE_TTL_S": "1",
        "BLASTD_HEARTBEAT_INTERVAL_S": "0.25",
        "BLASTD_HEALTH_CHECK_INTERVAL_S": "0.2",
        "BLASTD_LOG_FORMAT": "json",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


async def _build_wheel(source: Path, out_dir: Path) -> None:
    """blastd's wheel from this checkout, built from a copy so the tree gets no build/."""
    repo = nspawn.REPO
    shutil.copytree(
        repo / "blastd", source / "blastd", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, source / name)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--quiet",
        "--no-deps",
        "-w",
        str(out_dir),
        str(source),
    )
    assert await process.wait() == 0, "pip wheel failed"


def _payload(tmp_path: Path, servers: Servers, sandbox_url: str) -> Path:
    """Files for the container, bound read-only at /mnt/payload."""
    payload = tmp_path / "payload"
    credentials = payload / "credentials"
    credentials.mkdir(parents=True)
    (credentials / f"{ACCOUNT}.token").write_text(TOKEN)
    (credentials / f"{ACCOUNT}.app_secret").write_text(APP_SECRET)
    (payload / "blastd.env").write_text(_container_env(servers, sandbox_url))
    (payload / "test.conf").write_text(UNIT_DROP_IN)
    shutil.copy(UNIT, payload / "blastd.service")
    return payload


# Inside the container: this checkout's wheel replaces the blastd in the root's venv (its
# dependencies are there already: build_root.sh), then the unit goes in as an operator's would.
INSTALL = """
set -e
/opt/blastd/.venv/bin/pip install --quiet --no-deps --no-index --force-reinstall \\
    /mnt/payload/wheel/blastd-*.whl
mkdir -p /etc/blastd/credentials /etc/systemd/system/blastd.service.d
cp /mnt/payload/blastd.env /etc/blastd/
cp /mnt/payload/credentials/* /etc/blastd/credentials/
chmod 0600 /etc/blastd/credentials/*
cp /mnt/payload/blastd.service /etc/systemd/system/
cp /mnt/payload/test.conf /etc/systemd/system/blastd.service.d/
systemctl daemon-reload
"""


@pytest.mark.slow
@pytest.mark.systemd
@pytest.mark.timeout(900)  # the first run builds the root with debootstrap (about 2 minutes)
async def test_unit_under_real_systemd_starts_survives_a_stall_and_stops_cleanly(
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    sandbox: SandboxHandle,
    tmp_path: Path,
) -> None:
    """READY after the dependencies; a stalled event loop misses its watchdog pings and
    systemd restarts it; `systemctl stop` mid-campaign drains and exits 0."""
    reason = nspawn.cannot_boot_reason()
    if reason is not None:
        pytest.fail(f"{reason}; {nspawn.LEAVE_OUT}")
    await nspawn.build_root()
    payload = _payload(tmp_path, servers, sandbox.url)
    await _build_wheel(tmp_path / "source", payload / "wheel")
    async with nspawn.booted(
        {payload: "/mnt/payload"}, name=f"blastd-test-{free_port()}"
    ) as container:
        await container.run("sh", "-c", INSTALL)
        await _systemctl(container, "start", "blastd")  # returns once READY=1 arrived
        first = await _wait_for_status(container, "idle: no running campaign")
        print(f"\nstarted: {first}")
        assert first["NRestarts"] == "0"
        assert first["WatchdogUSec"] == f"{WATCHDOG_SEC}s"

        await container.run("systemctl", "kill", "--kill-who=main", "--signal=STOP", "blastd")
        restarted = await _wait_for_restart(container, first["MainPID"])
        journal = await _journal(container)
        assert "Watchdog timeout" in journal, journal[-3000:]
        print(f"after the stall: {restarted}")

        await sandbox.configure(latency_ms=200)
        job = blast_job("nspawn", numbers_from(50_000_000, 200), options={"rate_per_s": 40})
        await redis.lpush("blastd:jobs", job)
        await _wait_for_status(container, "sending: 1 campaign")
        await wait_until(lambda: _accepted_at_least(sandbox, 10))
        await _systemctl(container, "stop", "blastd")
        stopped = await container.show("blastd", "ActiveState", "Result", "ExecMainStatus")
        journal = await _journal(container)
    print(f"stopped: {stopped}")
    # 'success' and status 0: it exited by itself, neither a signal nor TimeoutStopSec ended it.
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    print("\n".join(line for line in journal.splitlines() if not line.startswith("{")))
    events = [e.get("event") for e in _json_lines(journal)]
    assert events.index("drain_started") < events.index("drain_finished")
    received = await sandbox.recipients()
    rows = await recipient_rows(pool, "nspawn")
    states = {(r["state"], received.get(r["phone"].lstrip("+"), 0)) for r in rows}
    assert states == {("sent", 1), ("pending", 0)}, states
    assert await campaign_state(pool, "nspawn") == "running"


async def _journal(container: nspawn.Container) -> str:
    return await container.run("journalctl", "-u", "blastd", "--no-pager", "-o", "cat")


async def _systemctl(container: nspawn.Container, *args: str) -> None:
    """systemctl in the container; on failure, the unit's journal says why."""
    try:
        await container.run("systemctl", *args)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{(await _journal(container))[-4000:]}") from None


async def _accepted_at_least(sandbox: SandboxHandle, count: int) -> bool:
    return sum((await sandbox.recipients()).values()) >= count


def _json_lines(text: str) -> list[dict[str, Any]]:
    """blastd's log lines in journal output; systemd's own lines are not JSON."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(orjson.loads(line))
    return lines


async def _wait_for_status(container: nspawn.Container, text: str) -> dict[str, str]:
    async def shows_status() -> dict[str, str] | None:
        shown = await container.show(
            "blastd", "ActiveState", "StatusText", "MainPID", "NRestarts", "WatchdogUSec"
        )
        return shown if shown["StatusText"] == text and shown["ActiveState"] == "active" else None

    result: dict[str, str] = await wait_until(shows_status, timeout_s=30, interval_s=0.2)
    return result


async def _wait_for_restart(container: nspawn.Container, stalled_pid: str) -> dict[str, str]:
    async def is_restarted() -> dict[str, str] | None:
        shown = await container.show("blastd", "ActiveState", "MainPID", "NRestarts")
        is_new = shown["MainPID"] not in ("0", stalled_pid) and shown["ActiveState"] == "active"
        return shown if is_new and shown["NRestarts"] == "1" else None

    result: dict[str, str] = await wait_until(is_restarted, timeout_s=60, interval_s=0.2)
    return result
