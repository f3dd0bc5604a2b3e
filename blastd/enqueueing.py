"""Builds a blast or video_blast job from a recipients file and pushes it onto Redis, as a
producer would."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from blastd import ledger, logs
from blastd.admission import skips_opted_out, stage_recipient
from blastd.config import VIDEO_KINDS, Settings
from blastd.errors import BlastdError, InvalidJobError
from blastd.jobs import BlastJob, Job, parse_job, placeholders, render
from blastd.providers.base import TextBody, VideoBody
from blastd.queues import jobs_key
from blastd.recipients import parse_recipient_entry
from blastd.redis_client import RedisClient
from blastd.sources import read_recipients
from blastd.video.jobs import VIDEO_NAMES, VideoBlastJob, fill, template_names

PUSH_PAGE = 5_000
# The video_blast fields the CLI's options fill, by the option's name.
RENDER_OVERRIDES = ("presenter_id", "source_url", "voice_id")
VIDEO_TEXTS = ("caption", "fallback_text", "failure_notice")
VIDEO_BLAST_OPTIONS = ("not_before", "progress_batch")
EXAMPLES = 3  # examples of each kind of row, and rendered messages, that plan shows
MISSING_VARIABLE = "missing variable"  # how admission words a row that lacks a placeholder
# The flag whose text carries a blast message's placeholders, by the message's kind.
_MESSAGE_FLAGS = {"text": "--text", "template": "--param", "video": "--caption"}


class JobRefusedError(BlastdError):
    """The daemon would dead-letter this job or drop it as a duplicate: refused before it is
    pushed (the CLI exits 2)."""


def recipients_list_key(prefix: str, job_id: str) -> str:
    return f"{prefix}recipients:{job_id}"


@dataclass
class Tally:
    """What the daemon's admission would make of each row: counts and a few examples."""

    valid: int = 0
    invalid: int = 0
    duplicate: int = 0
    missing_variable: int = 0
    opted_out: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    rendered: list[str] = field(default_factory=list)

    def note(self, kind: str, example: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < EXAMPLES:
            shown.append(logs.mask_numbers(example))


@dataclass(frozen=True)
class Plan:
    """A job as the daemon would take it, and what it would do with the file's rows."""

    job: dict[str, Any]
    parsed: BlastJob | VideoBlastJob
    tally: Tally
    account_rate_per_s: float  # messages a second; 0: no limit
    campaign_rate_per_s: float | None


def plan_file(
    settings: Settings, path: Path, options: dict[str, Any], optouts: frozenset[str] = frozenset()
) -> Plan:
    """Validate the job with the daemon's own parser and stage every row with the daemon's own
    admission code, without pushing anything; raise BlastdError for what the daemon refuses.
    `optouts` is the opt-out list, skipped when the job's category is one it applies to."""
    job = build_job(settings, path, options)
    job["recipients_key"] = recipients_list_key(settings.redis_prefix, job["id"])
    parsed = parse_as_daemon(settings, orjson.dumps(job))
    assert isinstance(parsed, BlastJob | VideoBlastJob)  # the type is the one build_job wrote
    if isinstance(parsed, VideoBlastJob):
        _check_placeholders(path, _video_names(parsed))
    else:
        _check_placeholders(
            path, {_MESSAGE_FLAGS[_message_kind(parsed)]: placeholders(parsed.message)}
        )
    skipped = optouts if skips_opted_out(parsed, settings.optout_applies_to) else frozenset()
    tally = tally_rows(parsed, path, settings.default_region, skipped)
    if tally.valid == 0:
        raise JobRefusedError(f"no recipient of {path.name} can be sent: {_why_none(tally)}")
    account = settings.accounts[parsed.account]
    rate = account.rate_per_s * account.batch_limit
    campaign_rate = parsed.options.rate_per_s if isinstance(parsed, BlastJob) else None
    return Plan(job, parsed, tally, rate, campaign_rate)


async def enqueue_file(
    redis: RedisClient,
    pool: ledger.Pool,
    settings: Settings,
    path: Path,
    options: dict[str, Any],
) -> str:
    """Push the recipients to their own list, then the job that names it; return the job id."""
    raw = path.read_bytes() if path.suffix.lower() == ".json" else b""  # noqa: ASYNC240 (CLI: nothing else runs on this loop)
    if raw.lstrip().startswith(b"{"):
        return await _push_job_file(redis, settings, raw)
    plan = plan_file(settings, path, options, await ledger.load_optouts(pool))
    await check_id_is_free(pool, plan.parsed)
    job, key = plan.job, plan.job["recipients_key"]
    await redis.delete(key)
    rows = read_recipients(path)
    while page := list(islice(rows, PUSH_PAGE)):
        await redis.rpush(key, *(orjson.dumps(row) for row in page))
    await redis.lpush(jobs_key(settings.redis_prefix), orjson.dumps(job))
    return str(job["id"])


async def _push_job_file(redis: RedisClient, settings: Settings, raw: bytes) -> str:
    """A .json file holding a whole job object goes onto the queue as it is, once the daemon's
    parser takes it."""
    job = parse_as_daemon(settings, raw)
    await redis.lpush(jobs_key(settings.redis_prefix), raw)
    return job.id


def parse_as_daemon(settings: Settings, raw: bytes) -> Job:
    """The daemon's parse_job, its refusal turned into the CLI's one-line error."""
    try:
        return parse_job(
            raw,
            max_bytes=settings.max_job_bytes,
            accounts=settings.accounts.keys(),
            max_inline_recipients=settings.max_inline_recipients,
            default_region=settings.default_region,
            video_accounts=_accounts_of(settings, video=True),
        )
    except InvalidJobError as exc:
        raise JobRefusedError(f"the daemon would refuse this job: {exc.reason}") from None


def tally_rows(
    job: BlastJob | VideoBlastJob, path: Path, region: str, optouts: frozenset[str] = frozenset()
) -> Tally:
    """Each row through the daemon's reading of a list entry and its staging of a recipient;
    a number seen before among the sendable ones is a duplicate, as the ledger counts them."""
    tally, seen = Tally(), set[str]()
    # Rows as a spreadsheet numbers them (1 is the header); a JSON array's entries from 1.
    first, unit = (1, "entry") if path.suffix.lower() == ".json" else (2, "row")
    for seq, row in enumerate(read_recipients(path)):
        staged = stage_recipient(job, seq, parse_recipient_entry(orjson.dumps(row)), region)
        where = f"{unit} {seq + first}: {staged.phone}"
        if staged.skip_reason is None and staged.phone in seen:
            tally.note("duplicate", where)
        elif staged.skip_reason is None and staged.phone in optouts:
            seen.add(staged.phone)
            tally.note("opted_out", where)
        elif staged.skip_reason is None:
            seen.add(staged.phone)
            tally.note("valid", where)
            if len(tally.rendered) < EXAMPLES:
                tally.rendered.append(logs.mask_numbers(_rendered(job, staged.vars or {})))
        elif staged.skip_reason.startswith(MISSING_VARIABLE):
            tally.note("missing_variable", f"{where} ({staged.skip_reason})")
        else:
            tally.note("invalid", f"{where} ({staged.skip_reason})")
    return tally


async def check_id_is_free(pool: ledger.Pool, job: BlastJob | VideoBlastJob) -> None:
    """An id the ledger has is accepted again only with the same message: the daemon would
    drop a different one as a duplicate without a word."""
    campaign = await ledger.load_campaign(pool, job.id)
    if campaign is None or _same_message(campaign.message, job):
        return
    raise JobRefusedError(
        f"campaign {job.id!r} already exists with another message: choose another --id"
    )


def _same_message(stored: dict[str, Any], job: BlastJob | VideoBlastJob) -> bool:
    """The stored campaign's message against the job's, as intake stores it; unset fields do
    not count, nor the notices intake derives for a video campaign."""
    if isinstance(job, BlastJob):
        return bool(_set_fields(stored) == _set_fields(job.message.model_dump(mode="json")))
    message = _set_fields(job.message.model_dump(mode="json"))
    kept = {k: v for k, v in _set_fields(stored.get("message", {})).items() if k in message}
    video = _set_fields(job.video.model_dump(mode="json"))
    return bool(_set_fields(stored.get("video", {})) == video and kept == message)


def _set_fields(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _set_fields(v) for k, v in value.items() if v is not None}
    return value


def plan_lines(plan: Plan, messaging_room: tuple[int, int] | None = None) -> list[str]:
    """What `blastd plan` prints: the counts with examples, rendered messages, the ETA, and
    with `messaging_room` (the budget, what is left of it now) how much the campaign uses."""
    tally, job = plan.tally, plan.parsed
    lines = [f"{job.type} {job.id} on {job.account}: {tally.valid} to send"]
    for kind in ("valid", "invalid", "duplicate", "missing_variable", "opted_out"):
        count = getattr(tally, kind)
        lines.append(f"  {kind.replace('_', ' ')}: {count}")
        lines.extend(f"    {example}" for example in tally.examples.get(kind, ()) if count)
    lines.append("rendered messages:")
    lines.extend(f"  {text}" for text in tally.rendered)
    lines.append(f"ETA at the account's rate: {_eta(tally.valid, plan.account_rate_per_s)}")
    if plan.campaign_rate_per_s is not None:
        lines.append(f"ETA at the campaign's rate: {_eta(tally.valid, plan.campaign_rate_per_s)}")
    if messaging_room is not None:
        budget, left = messaging_room
        lines.append(
            f"messaging limit: {tally.valid} of the {left} people left of {budget} in the rolling"
            f" window{'' if tally.valid <= left else ': the campaign pauses at the limit'}"
        )
    return lines


def _eta(count: int, rate_per_s: float) -> str:
    if not rate_per_s:
        return "no limit (as fast as the provider answers)"
    seconds = round(count / rate_per_s)
    return f"{timedelta(seconds=seconds)} ({rate_per_s:g}/s)"


def _why_none(tally: Tally) -> str:
    parts = []
    if tally.missing_variable:
        first = tally.examples["missing_variable"][0]
        parts.append(f"{tally.missing_variable} row(s) lack a variable (first: {first})")
    if tally.opted_out:
        parts.append(f"{tally.opted_out} opted out")
    if tally.invalid:
        parts.append(f"{tally.invalid} invalid (first: {tally.examples['invalid'][0]})")
    return "; ".join(parts) or "the file has no rows"


def _rendered(job: BlastJob | VideoBlastJob, values: dict[str, str]) -> str:
    if isinstance(job, VideoBlastJob):
        return fill(job.video.script, values)
    body = render(job.message, values)
    if isinstance(body, TextBody):
        return body.text
    if isinstance(body, VideoBody):
        return f"video {body.link} {body.caption or ''}".rstrip()
    return f"template {body.name} ({body.language}): {', '.join(body.body_params)}"


def _message_kind(job: BlastJob) -> str:
    return next(kind for kind in _MESSAGE_FLAGS if getattr(job.message, kind) is not None)


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
    """A video_blast job: one clip per row from the script, each delivered through `account`."""
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


def _video_names(job: VideoBlastJob) -> dict[str, frozenset[str]]:
    texts = {
        "--video-script": job.video.script,
        "--caption": job.message.caption,
        "--fallback-text": job.message.fallback_text,
        "--failure-notice": job.message.failure_notice,
    }
    # The pipeline fills the video's own names (and {caption} in the fallback) at delivery.
    return {flag: template_names(text) - VIDEO_NAMES - {"caption"} for flag, text in texts.items()}


def _check_placeholders(path: Path, used: dict[str, frozenset[str]]) -> None:
    """Each {name} the flags' texts use must be a column that has a value in some row: the
    daemon would skip every recipient for it, and its reason would not name the column."""
    if not any(used.values()):
        return  # nothing to check: spare the second read of the file
    columns = _variable_columns(path)
    for flag, names in used.items():
        if unknown := sorted(names - columns):
            placeholders = ", ".join(f"{{{name}}}" for name in unknown)
            listed = ", ".join(sorted(columns)) or "none"
            raise JobRefusedError(
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
    """Every kind the options give: the daemon's parser refuses more than one, where picking
    one would drop the others without a word."""
    message: dict[str, Any] = {}
    if options.get("template"):
        message["template"] = {
            "name": options["template"],
            "language": options["language"],
            "params": list(options.get("params") or ()),
        }
        if options.get("category"):
            message["template"]["category"] = options["category"]
    elif options.get("category"):
        raise BlastdError("--category belongs to --template")
    if options.get("video"):
        video = {"link": options["video"]}
        if options.get("caption"):
            video["caption"] = options["caption"]
        message["video"] = video
    if options.get("text"):
        message["text"] = options["text"]
    if not message:
        raise BlastdError("say what to send: --text, --template or --video (or --video-script)")
    return message


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
