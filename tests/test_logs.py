"""Log output: JSON lines off a terminal, console lines on one, numbers masked, secrets scrubbed."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions
import structlog
import structlog.testing

from blastd import controls, ledger, logs, outages
from blastd.embedded import free_port
from blastd.resources import wait_out_outage
from tests.harness import (
    ACCOUNT,
    TOKEN,
    SandboxHandle,
    Servers,
    campaign_state,
    daemon_env,
    daemon_process,
    is_done,
    is_ready,
    make_settings,
    running_daemon,
    wait_until,
)

NUMBERS = [f"+62812{n:08d}" for n in range(40_000_000, 40_000_000 + 5)]
MISTAKEN_ACCOUNT = "+6281240000099"  # a producer put a number where the account goes
CAMPAIGN_EVENTS = {"campaign_created", "campaign_batch_sent", "campaign_finished"}


class TerminalStream(io.StringIO):
    """What logs.configure sees when stdout is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    """logs.configure changes the process-wide structlog setup; put the test session's back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def blast(job_id: str, numbers: list[str], account: str = ACCOUNT) -> bytes:
    return orjson.dumps(
        {
            "type": "blast",
            "id": job_id,
            "account": account,
            "message": {"text": "Halo {name}"},
            "recipients": [{"to": n, "vars": {"name": f"N{i}"}} for i, n in enumerate(numbers)],
        }
    )


async def run_daemon_on_jobs(
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
) -> tuple[list[str], str]:
    """A real daemon (stdout a file, so not a tty) sends one campaign and dead-letters one job."""
    await redis.lpush("blastd:jobs", blast("logs-1", NUMBERS))
    await redis.lpush("blastd:jobs", blast("logs-2", NUMBERS[:1], account=MISTAKEN_ACCOUNT))
    admin_port = free_port()
    env = daemon_env(servers, sandbox.url, admin_port, BLASTD_LOG_FORMAT="auto")
    stdout_path, stderr_path = tmp_path / "daemon.out", tmp_path / "daemon.err"
    async with daemon_process(env, stdout_path, stderr_path) as process:
        await wait_until(lambda: is_ready(admin_port))
        await wait_until(lambda: is_done(pool, "logs-1"))
        await wait_until(lambda: redis.llen("blastd:dead"))
    assert process.returncode == 0, stderr_path.read_text()
    return stdout_path.read_text().splitlines(), stderr_path.read_text()


async def test_logs_are_json_lines_with_event_level_and_timestamp_off_a_terminal(
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
) -> None:
    lines, stderr = await run_daemon_on_jobs(servers, sandbox, redis, pool, tmp_path)

    events = [orjson.loads(line) for line in lines]
    for event in events:
        assert {"event", "level", "timestamp"} <= event.keys(), event
    names = {event["event"] for event in events}
    assert {"daemon_ready", "job_dead_lettered", "drain_finished"} | CAMPAIGN_EVENTS <= names
    assert stderr == ""


async def test_every_campaign_line_names_its_campaign_and_account(
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
) -> None:
    lines, _ = await run_daemon_on_jobs(servers, sandbox, redis, pool, tmp_path)

    events = [orjson.loads(line) for line in lines]
    campaign_lines = [e for e in events if e["event"].startswith("campaign_")]
    assert {e["event"] for e in campaign_lines} >= CAMPAIGN_EVENTS
    for event in campaign_lines:
        assert (event["campaign_id"], event["account"]) == ("logs-1", ACCOUNT), event
    [batch] = [e for e in events if e["event"] == "campaign_batch_sent"]
    assert batch["counts"] == {"sent": len(NUMBERS)}
    assert isinstance(batch["duration_ms"], int)


async def test_phone_numbers_are_masked_in_the_daemon_output(
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
) -> None:
    lines, stderr = await run_daemon_on_jobs(servers, sandbox, redis, pool, tmp_path)

    output = "\n".join(lines) + stderr
    for number in [*NUMBERS, MISTAKEN_ACCOUNT]:
        assert number.lstrip("+") not in output
    [dead] = [orjson.loads(line) for line in lines if "job_dead_lettered" in line]
    assert re.fullmatch(r"unknown account '\+\d{1,3}\*{4,8}0099'", dead["reason"]), dead


def test_logs_are_console_lines_on_a_terminal(restore_structlog: None) -> None:
    stream = TerminalStream()
    logs.configure(level="info", fmt="auto", stream=stream)

    structlog.get_logger().info("campaign_created", campaign_id="c1", pending=3)

    line = stream.getvalue().strip()
    assert "campaign_created" in line
    assert "c1" in line
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(line)


def test_log_format_json_wins_even_on_a_terminal(restore_structlog: None) -> None:
    stream = TerminalStream()
    logs.configure(fmt="json", stream=stream)

    structlog.get_logger().info("campaign_created", campaign_id="c1")

    assert orjson.loads(stream.getvalue())["event"] == "campaign_created"


def test_debug_lines_are_dropped_below_the_configured_level(restore_structlog: None) -> None:
    stream = io.StringIO()
    logs.configure(level="info", stream=stream)

    structlog.get_logger().debug("claim_polled")
    structlog.get_logger().info("campaign_created")

    assert [orjson.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "campaign_created"
    ]


def log_one_json_line(**fields: Any) -> dict[str, Any]:
    stream = io.StringIO()
    logs.configure(stream=stream, secrets=["s3cr3t-value"])
    structlog.get_logger().warning("send_failed", **fields)
    line: dict[str, Any] = orjson.loads(stream.getvalue())
    return line


def test_secrets_are_scrubbed_from_fields_at_any_depth(restore_structlog: None) -> None:
    line = log_one_json_line(
        reason="token s3cr3t-value rejected",
        response={"error": {"message": "bad token s3cr3t-value"}},
        attempts=["Bearer s3cr3t-value"],
    )
    assert "s3cr3t-value" not in orjson.dumps(line).decode()
    assert line["reason"] == "token [redacted] rejected"
    assert line["response"] == {"error": {"message": "bad token [redacted]"}}


def test_secrets_are_scrubbed_from_tracebacks(restore_structlog: None) -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, secrets=["s3cr3t-value"])
    try:
        raise ValueError("token s3cr3t-value is not valid")
    except ValueError:
        structlog.get_logger().exception("job_crashed")

    line = orjson.loads(stream.getvalue())
    assert "ValueError: token [redacted] is not valid" in line["exception"]
    assert "s3cr3t-value" not in stream.getvalue()


def test_phone_numbers_are_masked_at_any_depth(restore_structlog: None) -> None:
    line = log_one_json_line(reason="to +6281234567890", recipients=["6281234567891"])
    assert line["reason"] == "to +628******7890"
    assert "6281234567891" not in orjson.dumps(line).decode()


@pytest.mark.parametrize(
    ("written", "masked"),
    [
        ("+62 812-3456-7890", "+62 8**-****-7890"),
        ("(021) 555-1234", "(021) ***-1234"),
        ("0812 3456 7890", "081* **** 7890"),
        ("6281234567890", "628******7890"),
    ],
)
def test_numbers_are_masked_as_people_write_them(
    restore_structlog: None, written: str, masked: str
) -> None:
    line = log_one_json_line(reason=f"to {written}.")
    assert line["reason"] == f"to {masked}."


@pytest.mark.parametrize("text", ["2026-12-03", "10.0.0.1:6379", "sent 100 200 300", "1234567"])
def test_dates_addresses_and_counts_are_not_taken_for_numbers(
    restore_structlog: None, text: str
) -> None:
    assert log_one_json_line(reason=text)["reason"] == text


async def test_an_outage_logs_once_then_its_recovery_with_the_attempts() -> None:
    failures = [redis.exceptions.ConnectionError("Connection refused")] * 5

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "answered"

    with structlog.testing.capture_logs() as captured:
        assert await wait_out_outage(0.001, outages.on_redis, flaky) == "answered"

    events = [e for e in captured if e["event"].startswith("dependency_")]
    assert [e["event"] for e in events] == ["dependency_unavailable", "dependency_recovered"]
    assert events[0]["error"] == "ConnectionError: Connection refused"
    assert (events[1]["dependency"], events[1]["attempts"]) == ("redis", 5)
    assert isinstance(events[1]["down_s"], float)


async def test_debug_shows_each_request_with_status_and_masked_number(
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
) -> None:
    """A real daemon at level debug: configuring structlog in this process would leave the
    services' loggers bound to that set-up for every later test."""
    admin_port = free_port()
    env = daemon_env(servers, sandbox.url, admin_port, BLASTD_LOG_LEVEL="debug")
    stdout_path = tmp_path / "daemon.log"
    async with daemon_process(env, stdout_path, tmp_path / "daemon.err"):
        await wait_until(lambda: is_ready(admin_port), timeout_s=30)
        await redis.lpush("blastd:jobs", blast("debug-1", NUMBERS[:1]))
        await wait_until(lambda: is_done(pool, "debug-1"))

    output = stdout_path.read_text()
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    [request] = [e for e in lines if e["event"] == "provider_request"]
    assert (request["method"], request["status"]) == ("POST", 200)
    assert isinstance(request["duration_ms"], float)
    [sent] = [e for e in lines if e["event"] == "provider_sent"]
    assert (sent["account"], sent["to"]) == (ACCOUNT, ["+628******0000"])
    assert NUMBERS[0].lstrip("+") not in output
    assert TOKEN not in output


async def test_a_pause_from_the_cli_shows_in_the_daemon_log(
    servers: Servers,
    sandbox: SandboxHandle,
    redis: aioredis.Redis,
    pool: ledger.Pool,
) -> None:
    await sandbox.configure(latency_ms=200)
    with structlog.testing.capture_logs() as captured:
        settings = make_settings(servers, sandbox.url, account={"concurrency": 1})
        async with running_daemon(settings):
            await redis.lpush("blastd:jobs", blast("paused-1", NUMBERS))
            # Sending, so this daemon runs the campaign when the pause lands.
            await wait_until(lambda: _has_requests(sandbox))
            result = await controls.apply_control(pool, "paused-1", "pause")  # as the CLI does
            assert result is not None
            assert result.applied
            await wait_until(lambda: _event(captured, "campaign_paused_by_operator"))
            await controls.apply_control(pool, "paused-1", "resume")
            await wait_until(lambda: _event(captured, "campaign_resumed_by_operator"))

    [paused] = [e for e in captured if e["event"] == "campaign_paused_by_operator"]
    assert (paused["campaign_id"], paused["old_state"], paused["new_state"]) == (
        "paused-1",
        "running",
        "paused",
    )
    assert sum(paused["recipients"].values()) == len(NUMBERS)


async def _has_requests(sandbox: SandboxHandle) -> bool:
    return bool((await sandbox.stats())["requests"])


async def _is_done(pool: ledger.Pool, campaign_id: str) -> bool:
    return await campaign_state(pool, campaign_id) == "done"


def _event(captured: list[dict[str, Any]], name: str) -> bool:
    return any(e["event"] == name for e in captured)
