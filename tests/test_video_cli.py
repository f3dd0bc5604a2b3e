"""`blastd enqueue --video-script` and `blastd retry --scope` as real processes (a
1,000-row report becomes a video_blast; failed renders and failed deliveries retried apart)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openpyxl
import orjson
import pytest
import redis.asyncio as aioredis

from blastd import ledger
from blastd.jobs import parse_job
from blastd.video.jobs import VideoBlastJob
from tests.conftest import Servers
from tests.harness import (
    ACCOUNT,
    TOKEN,
    SandboxHandle,
    daemon_env,
    is_done,
    numbers_from,
    recipient_rows,
    run_cli,
    running_daemon,
    wait_until,
)
from tests.video_harness import DID_ACCOUNT, PRESENTER, make_video_settings, video_sandbox

JOBS = "blastd:jobs"
ROWS = 1_000
SCRIPT = "Halo {nama}, ini laporan {kode} Anda."
NOT_BEFORE = "2026-11-22T09:00:00+07:00"
VIDEO_URL = "https://d-id.example/clips/1.mp4"


@pytest.fixture
def video_cli_env(servers: Servers, sandbox: SandboxHandle) -> dict[str, str]:
    """The CLI's environment with a messaging account and a D-ID account (neither is called)."""
    env = daemon_env(servers, sandbox.url, 0)
    accounts = orjson.loads(env["BLASTD_ACCOUNTS"])
    accounts[DID_ACCOUNT] = {"kind": "did", "base_url": sandbox.url + "/did", "token": TOKEN}
    env["BLASTD_ACCOUNTS"] = orjson.dumps(accounts).decode()
    return env


def write_report(path: Path, count: int = ROWS) -> list[str]:
    """A report as producers write it: a phone column (numbers as Excel stores them), a name
    and a code."""
    numbers = numbers_from(40_000_000, count)
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(["No HP", "Nama", "Kode"])
    for i, number in enumerate(numbers):
        sheet.append([float(number.removeprefix("+")), f"Nama {i}", f"K{i:04d}"])
    workbook.save(path)
    return numbers


async def nothing_pushed(redis: aioredis.Redis) -> bool:
    return await redis.llen(JOBS) == 0 and await redis.keys("blastd:recipients:*") == []


async def test_enqueue_with_a_video_script_pushes_one_video_blast_of_1000_recipients(
    video_cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "report.xlsx"
    numbers = write_report(path)

    result = await run_cli(
        video_cli_env,
        "enqueue",
        str(path),
        "--id",
        "report-1000",
        "--video-script",
        SCRIPT,
        "--caption",
        "Video untuk {nama}",
        "--fallback-text",
        "{caption}: {video_url}",
        "--failure-notice",
        "Maaf {nama}, video gagal: {reason}",
        "--presenter-id",
        PRESENTER,
        "--source-url",
        "https://example.com/amber.jpg",
        "--voice-id",
        "id-ID-GadisNeural",
        "--progress-batch",
        "50",
        "--not-before",
        NOT_BEFORE,
    )

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "report-1000"
    [raw] = await redis.lrange(JOBS, 0, -1)
    assert orjson.loads(raw) == {
        "type": "video_blast",
        "id": "report-1000",
        "account": ACCOUNT,  # the only messaging account: the D-ID one renders
        "video": {
            "account": DID_ACCOUNT,
            "script": SCRIPT,
            "options": {
                "presenter_id": PRESENTER,
                "source_url": "https://example.com/amber.jpg",
                "voice_id": "id-ID-GadisNeural",
            },
        },
        "message": {
            "caption": "Video untuk {nama}",
            "fallback_text": "{caption}: {video_url}",
            "failure_notice": "Maaf {nama}, video gagal: {reason}",
        },
        "options": {"not_before": NOT_BEFORE, "progress_batch": 50},
        "recipients_key": "blastd:recipients:report-1000",
    }
    job = parse_job(
        raw,
        max_bytes=1_048_576,
        accounts=(ACCOUNT, DID_ACCOUNT),
        max_inline_recipients=10_000,
        default_region="ID",
        video_accounts=(DID_ACCOUNT,),
    )
    assert isinstance(job, VideoBlastJob)
    assert job.options.progress_batch == 50
    rows = [orjson.loads(r) for r in await redis.lrange("blastd:recipients:report-1000", 0, -1)]
    assert len(rows) == ROWS
    assert rows[0] == {
        "to": numbers[0].removeprefix("+"),
        "vars": {"nama": "Nama 0", "kode": "K0000"},
    }
    assert [r["to"] for r in rows] == [n.removeprefix("+") for n in numbers]
    assert job.missing_variables(rows[-1]["vars"]) == frozenset()


async def test_an_enqueued_video_blast_is_rendered_and_delivered_by_the_daemon(
    video_cli_env: dict[str, str],
    servers: Servers,
    redis: aioredis.Redis,
    pool: ledger.Pool,
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.xlsx"
    numbers = write_report(path, 5)

    result = await run_cli(
        video_cli_env, "enqueue", str(path), "--id", "report-5", "--video-script", SCRIPT
    )

    assert result.code == 0, result.stderr
    async with video_sandbox() as sandbox:
        async with running_daemon(make_video_settings(servers, sandbox)):
            await wait_until(lambda: is_done(pool, "report-5"), timeout_s=60)
        did_stats = await sandbox.did.stats()
        delivered = await sandbox.cloud.recipients()
    assert await ledger.count_states(pool, "report-5") == {"sent": 5}
    assert (did_stats["created"], did_stats["duplicates"]) == (5, {})
    assert delivered == {n.removeprefix("+"): 1 for n in numbers}


USAGE_ERRORS = {
    "with --text": (["--video-script", SCRIPT, "--text", "Halo"], "combined with --text"),
    "with --template": (["--video-script", SCRIPT, "--template", "promo"], "with --template"),
    "with --video": (["--video-script", SCRIPT, "--video", "https://x.test/v.mp4"], "--video:"),
    "with --rate": (["--video-script", SCRIPT, "--rate", "5"], "--rate does not apply"),
    "video option alone": (["--text", "Halo", "--presenter-id", "p"], "needs --video-script"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
async def test_options_that_do_not_fit_a_video_blast_are_usage_errors_and_push_nothing(
    case: str, video_cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "report.xlsx"
    write_report(path, 3)
    options, named = USAGE_ERRORS[case]

    result = await run_cli(video_cli_env, "enqueue", str(path), *options)

    assert result.code == 2, result.stderr
    assert named in result.stderr
    assert await nothing_pushed(redis)


async def test_a_script_placeholder_that_is_not_a_column_fails_naming_it_and_the_columns(
    video_cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "report.xlsx"
    write_report(path, 3)

    result = await run_cli(
        video_cli_env, "enqueue", str(path), "--video-script", "Halo {nama_lengkap}, {kode}"
    )

    assert result.code == 2  # refused as the daemon would refuse it
    assert "--video-script uses {nama_lengkap}" in result.stderr
    assert "report.xlsx" in result.stderr
    assert "(its columns: kode, nama)" in result.stderr
    assert await nothing_pushed(redis)


async def test_a_messaging_account_as_video_account_is_refused_before_anything_is_pushed(
    video_cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "report.xlsx"
    write_report(path, 3)

    result = await run_cli(
        video_cli_env, "enqueue", str(path), "--video-script", SCRIPT, "--video-account", ACCOUNT
    )

    assert result.code == 2  # refused as the daemon would refuse it
    assert f"account '{ACCOUNT}' is not a video account" in result.stderr
    assert await nothing_pushed(redis)


async def test_a_text_blast_defaults_to_the_messaging_account_beside_a_video_account(
    video_cli_env: dict[str, str], redis: aioredis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "report.xlsx"
    write_report(path, 3)

    result = await run_cli(video_cli_env, "enqueue", str(path), "--text", "Halo {nama}")

    assert result.code == 0, result.stderr
    job = orjson.loads(await redis.lindex(JOBS, 0))
    assert (job["type"], job["account"]) == ("blast", ACCOUNT)


# --- retry --scope ---------------------------------------------------------------------------


@pytest.fixture
async def finished_video_blast(pool: ledger.Pool) -> str:
    """A done video_blast as the pipeline leaves it: seq 0 sent, seq 1's render failed, seq 2's
    video rendered but its delivery failed (transient, attempts used up)."""
    campaign_id = "vb-cli"

    async def pages() -> AsyncIterator[list[ledger.StagedRecipient]]:
        numbers = numbers_from(41_000_000, 3)
        yield [ledger.StagedRecipient(i, n, {"nama": f"N{i}"}, None) for i, n in enumerate(numbers)]

    message = {"video": {"account": DID_ACCOUNT, "script": SCRIPT}, "message": {}}
    campaign = ledger.NewCampaign(campaign_id, "video_blast", ACCOUNT, message, {})
    async with ledger.transaction(pool) as conn:
        await ledger.insert_campaign(conn, campaign, pages())
    # Each row walks the moves the pipeline makes (the ledger refuses any other).
    outcomes = [
        (0, ("rendering", "rendered", "sending", "sent"), VIDEO_URL, None, None),
        (1, ("rendering", "video_failed"), None, "permanent", "FaceError"),
        (2, ("rendering", "rendered", "sending", "failed"), VIDEO_URL, "transient", "131000"),
    ]
    for seq, states, url, error_class, code in outcomes:
        for state in states:
            await pool.execute(
                "UPDATE recipients SET state = $3, video_url = $4, error_class = $5, "
                "error_code = $6, renders = 1 WHERE campaign_id = $1 AND seq = $2",
                campaign_id,
                seq,
                state,
                url,
                error_class,
                code,
            )
    await pool.execute("UPDATE campaigns SET state = 'done' WHERE id = $1", campaign_id)
    return campaign_id


async def states_by_seq(pool: ledger.Pool, campaign_id: str) -> list[str]:
    return [row["state"] for row in await recipient_rows(pool, campaign_id)]


async def test_retry_scope_videos_sends_only_failed_renders_back_to_pending(
    video_cli_env: dict[str, str], pool: ledger.Pool, finished_video_blast: str
) -> None:
    result = await run_cli(video_cli_env, "retry", finished_video_blast, "--scope", "videos")

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == (
        f"{finished_video_blast}: 1 recipients back to pending: rendered again; campaign running"
    )
    assert await states_by_seq(pool, finished_video_blast) == ["sent", "pending", "failed"]
    campaign = await ledger.load_campaign(pool, finished_video_blast)
    assert campaign is not None
    assert campaign.state == "running"


async def test_retry_scope_messages_sends_only_failed_deliveries_back_to_rendered(
    video_cli_env: dict[str, str], pool: ledger.Pool, finished_video_blast: str
) -> None:
    result = await run_cli(video_cli_env, "retry", finished_video_blast, "--scope", "messages")

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == (
        f"{finished_video_blast}: 1 recipients back to rendered: sent again; campaign running"
    )
    rows = await recipient_rows(pool, finished_video_blast)
    assert [row["state"] for row in rows] == ["sent", "video_failed", "rendered"]
    assert rows[2]["video_url"] == VIDEO_URL  # sent again with the video it has


async def test_retry_scope_videos_with_a_class_is_a_usage_error_and_changes_nothing(
    video_cli_env: dict[str, str], pool: ledger.Pool, finished_video_blast: str
) -> None:
    result = await run_cli(
        video_cli_env, "retry", finished_video_blast, "--scope", "videos", "--class", "transient"
    )

    assert result.code == 2
    assert "--class applies to --scope messages" in result.stderr
    assert await states_by_seq(pool, finished_video_blast) == ["sent", "video_failed", "failed"]
