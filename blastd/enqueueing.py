"""Builds a blast job from a recipients file and pushes it onto Redis, as a producer would."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from blastd.config import Settings
from blastd.errors import BlastdError
from blastd.intake import jobs_key
from blastd.sources import read_recipients

PUSH_PAGE = 5_000


def recipients_list_key(prefix: str, job_id: str) -> str:
    return f"{prefix}recipients:{job_id}"


async def enqueue_file(
    redis: aioredis.Redis, settings: Settings, path: Path, options: dict[str, Any]
) -> str:
    """Push the recipients to their own list, then the job that names it; return the job id."""
    raw = path.read_bytes() if path.suffix.lower() == ".json" else b""  # noqa: ASYNC240 (CLI: nothing else runs on this loop)
    if raw.lstrip().startswith(b"{"):
        return await _push_job_file(redis, settings, raw)
    job = build_job(settings, path, options)
    key = recipients_list_key(settings.redis_prefix, job["id"])
    await redis.delete(key)
    rows = read_recipients(path)
    while page := list(islice(rows, PUSH_PAGE)):
        await redis.rpush(key, *(orjson.dumps(row) for row in page))
    job["recipients_key"] = key
    await redis.lpush(jobs_key(settings.redis_prefix), orjson.dumps(job))
    return str(job["id"])


async def _push_job_file(redis: aioredis.Redis, settings: Settings, raw: bytes) -> str:
    """A .json file holding a whole job object goes onto the queue as it is."""
    job = orjson.loads(raw)
    await redis.lpush(jobs_key(settings.redis_prefix), raw)
    return str(job.get("id"))


def build_job(settings: Settings, path: Path, options: dict[str, Any]) -> dict[str, Any]:
    """The job object for a file and the CLI's message options."""
    job_options = {
        key: value
        for key, value in (
            ("rate_per_s", options.get("rate_per_s")),
            ("not_before", options.get("not_before")),
        )
        if value is not None
    }
    return {
        "type": "blast",
        "id": options.get("job_id") or _default_job_id(path),
        "account": options.get("account") or _only_account(settings),
        "message": _message(options),
        "options": job_options,
    }


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
    raise BlastdError("say what to send: --text, --template or --video")


def _only_account(settings: Settings) -> str:
    if len(settings.accounts) != 1:
        raise BlastdError(
            f"choose an account with --account: {', '.join(sorted(settings.accounts))}"
        )
    return next(iter(settings.accounts))


def _default_job_id(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", path.stem).strip("-") or "blast"
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
