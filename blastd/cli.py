"""Subcommands: run, enqueue, status, pause, resume, cancel, retry, dead, migrate, check, sandbox,
demo.

pause, resume, cancel and retry act on the ledger directly, through the same functions that
`control` jobs use (blastd.controls): the operator sees the result at once, and a daemon running
the campaign notices within its campaign poll interval."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from blastd import controls, enqueueing, ledger, logs, queues, reports
from blastd.config import Settings, load_settings
from blastd.errors import EXIT_CONFIG, BlastdError, ConfigError
from blastd.jobs import CONTROL_SCOPES, DEFAULT_RETRY_CLASSES, RETRY_CLASSES, ControlAction
from blastd.redis_client import RedisClient, check_key_layout, open_redis

T = TypeVar("T")


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


def _run(coro: Awaitable[T]) -> T:
    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except BlastdError as exc:
        click.echo(f"blastd: {exc}", err=True)
        sys.exit(1)


@click.group()
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


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--account", help="Messaging account that sends (default: the only configured one).")
@click.option("--id", "job_id", help="Campaign id (default: derived from the file name and time).")
@click.option("--text", help="Text message; {column} placeholders take the row's values.")
@click.option("--template", help="Template name.")
@click.option("--language", default="en_US", show_default=True, help="Template language code.")
@click.option("--param", "params", multiple=True, help="Template body parameter (repeatable).")
@click.option("--video", help="Video link for a video message.")
@click.option("--caption", help="Video caption (--video or --video-script); {column} allowed.")
@click.option("--rate", "rate_per_s", type=float, help="Messages per second for this campaign.")
@click.option("--not-before", help="ISO-8601 time with zone before which nothing is sent.")
@click.option(
    "--video-script",
    help="Render one video per row from this script ({column} placeholders): a video_blast.",
)
@click.option("--video-account", help="Video account that renders (default: the only one).")
@click.option("--fallback-text", help="Text with {video_url} sent when a video cannot be.")
@click.option("--failure-notice", help="Text sent when a render fails ({reason} allowed).")
@click.option("--presenter-id", help="D-ID presenter for this job's clips.")
@click.option("--source-url", help="D-ID photo for this job's talks.")
@click.option("--voice-id", help="Voice for this job's videos.")
@click.option(
    "--progress-batch",
    type=click.IntRange(min=1),
    help="Renders submitted between progress saves (default: BLASTD_VIDEO__PROGRESS_BATCH).",
)
@click.pass_context
def enqueue(ctx: click.Context, /, file: Path, **options: Any) -> None:
    """Push a blast job for the recipients in FILE (.xlsx, .csv or .json) onto Redis; with
    --video-script, a video_blast that renders and delivers one video per row."""
    _check_enqueue_options(ctx, options)
    settings = _settings(ctx)
    job_id = _run(
        _with_redis(settings, lambda r: enqueueing.enqueue_file(r, settings, file, options))
    )
    click.echo(job_id)


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
    """Show a campaign's progress and the count of recipients in each state."""
    settings = _settings(ctx)
    show = reports.follow_campaign if follow else reports.campaign_status
    report = _run(_with_pool(settings, lambda pool: show(pool, campaign_id)))
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
    from blastd import demo as demo_module

    sys.exit(demo_module.run_demo(file, rate_per_s))


async def _with_redis(settings: Settings, fn: Callable[[RedisClient], Awaitable[T]]) -> T:
    async with open_redis(settings) as client:
        return await fn(client)


async def _with_pool(settings: Settings, fn: Callable[[ledger.Pool], Awaitable[T]]) -> T:
    pool = await ledger.open_pool(
        settings.database_url, command_timeout_s=settings.db_command_timeout_s, max_size=2
    )
    try:
        return await fn(pool)
    finally:
        await pool.close()
