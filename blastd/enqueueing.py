"""Builds a blast or video_blast job from a recipients file and pushes it onto Redis, as a
producer would."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from blastd.config import VIDEO_KINDS, Settings
from blastd.errors import BlastdError, InvalidJobError
from blastd.jobs import parse_job
from blastd.queues import jobs_key
from blastd.redis_client import RedisClient
from blastd.sources import read_recipients
from blastd.video.jobs import VIDEO_NAMES, VideoBlastJob, template_names

PUSH_PAGE = 5_000
# The video_blast fields the CLI's options fill, by the option's name.
RENDER_OVERRIDES = ("presenter_id", "source_url", "voice_id")
VIDEO_TEXTS = ("caption", "fallback_text", "failure_notice")
VIDEO_BLAST_OPTIONS = ("not_before", "progress_batch")


def recipients_list_key(prefix: str, job_id: str) -> str:
    return f"{prefix}recipients:{job_id}"


async def enqueue_file(
    redis: RedisClient, settings: Settings, path: Path, options: dict[str, Any]
) -> str:
    """Push the recipients to their own list, then the job that names it; return the job id."""
    raw = path.read_bytes() if path.suffix.lower() == ".json" else b""  # noqa: ASYNC240 (CLI: nothing else runs on this loop)
    if raw.lstrip().startswith(b"{"):
        return await _push_job_file(redis, settings, raw)
    job = build_job(settings, path, options)
    key = recipients_list_key(settings.redis_prefix, job["id"])
    if job["type"] == "video_blast":
        check_video_blast(settings, path, {**job, "recipients_key": key})
    await redis.delete(key)
    rows = read_recipients(path)
    while page := list(islice(rows, PUSH_PAGE)):
        await redis.rpush(key, *(orjson.dumps(row) for row in page))
    job["recipients_key"] = key
    await redis.lpush(jobs_key(settings.redis_prefix), orjson.dumps(job))
    return str(job["id"])


async def _push_job_file(redis: RedisClient, settings: Settings, raw: bytes) -> str:
    """A .json file holding a whole job object goes onto the queue as it is."""
    job = orjson.loads(raw)
    await redis.lpush(jobs_key(settings.redis_prefix), raw)
    return str(job.get("id"))


def build_job(settings: Settings, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The job object for a file and the CLI's message options: a video_blast when they give
    a video script, else a blast."""
    if options.get("video_script"):
        return build_video_blast(settings, path, options)
    return {
        "type": "blast",
        "id": options.get("job_id") or _default_job_id(path),
        "account": options.get("account") or _only_account(settings, video=False),
        "message": _message(options),
        "options": _given(options, ("rate_per_s", "not_before")),
    }


def build_video_blast(settings: Settings, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Seed 000's job: one clip per row from the script, each delivered through `account`."""
    return {
        "type": "video_blast",
        "id": options.get("job_id") or _default_job_id(path),
        "account": options.get("account") or _only_account(settings, video=False),
        "video": {
            "account": options.get("video_account") or _only_account(settings, video=True),
            "script": options["video_script"],
            "options": _given(options, RENDER_OVERRIDES),
        },
        "message": _given(options, VIDEO_TEXTS),
        "options": _given(options, VIDEO_BLAST_OPTIONS),
    }


def check_video_blast(settings: Settings, path: Path, job: dict[str, Any]) -> None:
    """Refuse, before anything is pushed, what the daemon would dead-letter, and a text whose
    placeholder no column fills (the daemon would skip every recipient for it)."""
    try:
        parsed = parse_job(
            orjson.dumps(job),
            max_bytes=settings.max_job_bytes,
            accounts=settings.accounts.keys(),
            max_inline_recipients=settings.max_inline_recipients,
            default_region=settings.default_region,
            video_accounts=_accounts_of(settings, video=True),
        )
    except InvalidJobError as exc:
        raise BlastdError(f"the daemon would refuse this job: {exc.reason}") from None
    assert isinstance(parsed, VideoBlastJob)  # the type is the one build_video_blast wrote
    _check_placeholders(path, parsed)


def _check_placeholders(path: Path, job: VideoBlastJob) -> None:
    """Each {name} of the texts must be a column that has a value in some row."""
    texts = {
        "--video-script": job.video.script,
        "--caption": job.message.caption,
        "--fallback-text": job.message.fallback_text,
        "--failure-notice": job.message.failure_notice,
    }
    # The pipeline fills the video's own names (and {caption} in the fallback) at delivery.
    used = {flag: template_names(text) - VIDEO_NAMES - {"caption"} for flag, text in texts.items()}
    if not any(used.values()):
        return  # nothing to check: spare the second read of the file
    columns = _variable_columns(path)
    for flag, names in used.items():
        if unknown := sorted(names - columns):
            placeholders = ", ".join(f"{{{name}}}" for name in unknown)
            listed = ", ".join(sorted(columns)) or "none"
            raise BlastdError(
                f"{flag} uses {placeholders}, which no column of {path.name} fills "
                f"(its columns: {listed})"
            )


def _variable_columns(path: Path) -> set[str]:
    """The variables some row of the file has a value for (the phone column is not one)."""
    columns: set[str] = set()
    for row in read_recipients(path):
        values = row["vars"]
        assert isinstance(values, dict)  # read_recipients always yields a dict here
        columns.update(values)
    return columns


def _given(options: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: options[name] for name in names if options.get(name) is not None}


def _message(options: dict[str, Any]) -> dict[str, Any]:
    if options.get("template"):
        return {
            "template": {
                "name": options["template"],
                "language": options["language"],
                "params": list(options.get("params") or ()),
            }
        }
    if options.get("video"):
        video = {"link": options["video"]}
        if options.get("caption"):
            video["caption"] = options["caption"]
        return {"video": video}
    if options.get("text"):
        return {"text": options["text"]}
    raise BlastdError("say what to send: --text, --template or --video (or --video-script)")


def _only_account(settings: Settings, *, video: bool) -> str:
    """The one messaging (or video) account, the default when the option is not given."""
    names = _accounts_of(settings, video=video)
    option, what = ("--video-account", "video") if video else ("--account", "messaging")
    if not names:
        raise BlastdError(f"no {what} account is configured")
    if len(names) > 1:
        raise BlastdError(f"several {what} accounts: choose one with {option} ({', '.join(names)})")
    return names[0]


def _accounts_of(settings: Settings, *, video: bool) -> list[str]:
    """The names of the accounts that render videos, or of those that send messages."""
    return sorted(
        name
        for name, account in settings.accounts.items()
        if (account.kind in VIDEO_KINDS) == video
    )


def _default_job_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-") or "blast"
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
