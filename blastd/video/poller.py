"""The polling loop: follow every render until it is done, failed or given up on (docs/video.md).

Keys, under `video.key_prefix` (default: the redis prefix; "" gives the bare names):

    video:poll:queue          list of job ids due for a poll now (BRPOP takes from the right)
    video:poll:delayed        sorted set: job id -> when its next poll is due (ms); moved onto
                              the queue when due. The earlier worker's timers lived in one process
                              and died with it; this survives a crash and serves every daemon.
    video:job:{id}            the job's state (JSON, TTL job_ttl_s, refreshed on each write)
    video:lock:{id}           held while one daemon polls the job (TTL lock_ttl_s)
    video:attempts:{id}       polls made (TTL attempts_ttl_s)
    video:completed:{id}      the outcome, for audit (TTL completed_ttl_s)

A job id may reach the queue twice (a webhook nudge, the recovery sweep): the lock makes one
daemon poll it at a time, and an entry that comes before the job's next due time is dropped.
The ledger row (`video_ledger`) is the truth: a render is marked rendered or failed with a
conditional UPDATE, so a late or repeated poll changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from pydantic import ValidationError

from blastd import queues
from blastd.backoff import backoff_s
from blastd.errors import InvalidJobError, PermanentError, ProviderError, ThrottledError
from blastd.metrics import VIDEO_POLLS, VIDEO_RENDERS
from blastd.providers.video.accounts import VideoAccount
from blastd.providers.video.base import VideoStatus
from blastd.video import delivery as video_delivery
from blastd.video import intake as video_intake
from blastd.video import ledger as video_ledger
from blastd.video.schedule import PollState, VideoKeys, now_ms, video_keys

if TYPE_CHECKING:
    from blastd.resources import Dependencies
    from blastd.shutdown import Shutdown

log = structlog.get_logger()

MOVE_BATCH = 500  # due ids moved per script call (Lua's unpack has a stack limit)
POLL_TASKS = 64  # jobs polled at once by this daemon, over all accounts
EARLY_MS = 50  # an entry this much before the job's due time is a duplicate, not a turn
MOVE_DUE_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
    redis.call('ZREM', KEYS[1], unpack(due))
    redis.call('LPUSH', KEYS[2], unpack(due))
end
return #due
"""
# Out of the schedule and onto BRPOP's end of the queue: polled next, and not taken for a
# duplicate entry (that needs a schedule).
RELEASE_LOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


async def run(deps: Dependencies, shutdown: Shutdown) -> None:
    """Move due jobs onto the queue, poll what it holds, put back what a crash dropped; until
    shutdown. Polls under way finish (their deliveries are written) before this returns."""
    keys = video_keys(deps)
    async with asyncio.TaskGroup() as group:
        mover = group.create_task(_move_due(deps, keys, shutdown), name="video-mover")
        sweeper = group.create_task(_recover_forever(deps, keys, shutdown), name="video-sweep")
        await _consume(deps, keys, shutdown, group)
        await asyncio.wait([mover, sweeper])


async def _move_due(deps: Dependencies, keys: VideoKeys, shutdown: Shutdown) -> None:
    script = deps.redis.register_script(MOVE_DUE_LUA)
    video = deps.settings.video
    tick_s = min(max(min(video.first_poll_s, video.poll_interval_s) / 5, 0.01), 0.25)
    while not shutdown.is_requested:
        moved = await deps.redis_call(
            script, keys=[keys.delayed, keys.queue], args=[now_ms(), MOVE_BATCH]
        )
        if moved < MOVE_BATCH:
            await shutdown.wait(None, tick_s)


async def _recover_forever(deps: Dependencies, keys: VideoKeys, shutdown: Shutdown) -> None:
    while not shutdown.is_requested:
        await recover_jobs(deps, keys)
        await shutdown.wait(None, deps.settings.video.recovery_interval_s)


async def recover_jobs(deps: Dependencies, keys: VideoKeys) -> int:
    """Put back every job that is neither scheduled nor being polled: one whose entry a crash
    dropped between the queue and its lock. Expired ones are then failed by their poll."""
    pattern = keys.job("*")
    start = len(keys.job(""))
    recovered = 0
    async for raw_key in deps.redis.scan_iter(match=pattern, count=500):
        job_id = raw_key.decode()[start:]
        pipe = deps.redis.pipeline(transaction=False)
        pipe.zscore(keys.delayed, job_id)
        pipe.exists(keys.lock(job_id))
        scheduled, locked = await deps.redis_call(pipe.execute)
        if scheduled is None and not locked:
            await deps.redis_call(deps.redis.zadd, keys.delayed, {job_id: now_ms()}, nx=True)
            recovered += 1
    if recovered:
        log.warning("video_jobs_recovered", count=recovered)
    return recovered


async def _consume(
    deps: Dependencies, keys: VideoKeys, shutdown: Shutdown, group: asyncio.TaskGroup
) -> None:
    slots = asyncio.Semaphore(POLL_TASKS)
    while not shutdown.is_requested:
        popped = await deps.redis_call(
            deps.redis.brpop,
            [keys.queue],
            timeout=deps.settings.intake_block_s,
        )
        if popped is None:
            continue
        more = await deps.redis_call(deps.redis.rpop, keys.queue, POLL_TASKS - 1)
        for raw_id in [popped[1], *(more or [])]:
            await slots.acquire()
            group.create_task(_poll_released(deps, keys, raw_id.decode(), slots))


async def _poll_released(
    deps: Dependencies, keys: VideoKeys, job_id: str, slots: asyncio.Semaphore
) -> None:
    try:
        await poll_job(deps, keys, job_id)
    except Exception:  # one job's bug must not stop the polling of all the others
        log.exception("video_poll_crashed", video_job_id=job_id)
    finally:
        slots.release()


async def poll_job(deps: Dependencies, keys: VideoKeys, job_id: str) -> None:
    """One turn of one job, under its lock."""
    token = f"{deps.settings.instance_id}:{secrets.token_hex(4)}"
    video = deps.settings.video
    if not await deps.redis_call(
        deps.redis.set, keys.lock(job_id), token, nx=True, ex=video.lock_ttl_s
    ):
        return  # another daemon polls it now
    try:
        state = await _load_state(deps, keys, job_id)
        if state is not None and not await _is_duplicate(deps, keys, state):
            await _take_turn(deps, keys, state)
    finally:
        release = deps.redis.register_script(RELEASE_LOCK_LUA)
        await deps.redis_call(release, keys=[keys.lock(job_id)], args=[token])


async def _load_state(deps: Dependencies, keys: VideoKeys, job_id: str) -> PollState | None:
    raw = await deps.redis_call(deps.redis.get, keys.job(job_id))
    if not isinstance(raw, bytes):
        return None  # finished, or expired: the ledger's sweep rebuilds what it still follows
    try:
        data = orjson.loads(raw)
        if isinstance(data, dict) and "ledger_id" not in data:
            # Written by an external producer, not by blastd: take it as a
            # video_poll job, whose campaign then follows it.
            return await video_intake.adopt_external_job(deps, job_id, raw)
        return PollState.model_validate(data)
    except (orjson.JSONDecodeError, ValidationError, InvalidJobError) as exc:
        reason = exc.reason if isinstance(exc, InvalidJobError) else "unreadable video job state"
        # A requeue puts the record back where its producer put it, not onto the jobs list.
        ttl_s = deps.settings.video.job_ttl_s
        back = queues.Requeue(keys.job(job_id), keys.queue, job_id, ttl_s)
        await queues.dead_letter(deps, raw, f"video:job:{job_id}: {reason}", job_id, back)
        await deps.redis_call(deps.redis.delete, keys.job(job_id))
        return None


async def _is_duplicate(deps: Dependencies, keys: VideoKeys, state: PollState) -> bool:
    """An entry before the job's due time while the job is scheduled: a second entry for one
    turn (the sweep raced the mover). A nudge takes the job out of the schedule first."""
    if state.next_due_ms <= now_ms() + EARLY_MS:
        return False
    return await deps.redis_call(deps.redis.zscore, keys.delayed, state.job_id) is not None


async def _take_turn(deps: Dependencies, keys: VideoKeys, state: PollState) -> None:
    settings = deps.settings.video
    account = deps.video_accounts.get(state.account)
    if account is None:
        await _fail(deps, keys, state, "config", "no_account", f"{state.account!r} not configured")
        return
    attempts = await _count_attempt(deps, keys, state.job_id)
    failure: ProviderError | TimeoutError | None = None
    try:
        async with account.slots:
            status = await asyncio.wait_for(
                account.provider.status(state.job_id), settings.poll_timeout_s
            )
    except PermanentError as exc:
        VIDEO_POLLS.labels(state.account, exc.error_class).inc()
        await _fail(deps, keys, state, exc.error_class, exc.code, exc.text)
        return
    except (ProviderError, TimeoutError) as exc:
        VIDEO_POLLS.labels(state.account, getattr(exc, "error_class", "timeout")).inc()
        failure = exc
    else:
        VIDEO_POLLS.labels(state.account, status.state).inc()
        if status.state != "running":
            await _finish(deps, keys, state, status)
            return
    # Not finished, or not known: give up once past the window, else look again later.
    if _is_over(deps, state, attempts):
        await _time_out(deps, keys, state, attempts)
    elif failure is not None:
        await _back_off(deps, keys, state, failure)
    else:
        await _wait_more(deps, keys, state, account)


async def _finish(
    deps: Dependencies, keys: VideoKeys, state: PollState, status: VideoStatus
) -> None:
    if status.state == "succeeded":
        await _succeed(deps, keys, state, status)
    elif status.state == "failed":
        await _render_failed(deps, keys, state, status)
    else:
        await _fail(deps, keys, state, "video", "not_found", "the provider does not know the job")


async def _count_attempt(deps: Dependencies, keys: VideoKeys, job_id: str) -> int:
    pipe = deps.redis.pipeline(transaction=True)
    pipe.incr(keys.attempts(job_id))
    pipe.expire(keys.attempts(job_id), deps.settings.video.attempts_ttl_s)
    attempts, _ = await deps.redis_call(pipe.execute)
    return int(attempts)


def _is_over(deps: Dependencies, state: PollState, attempts: int) -> bool:
    video = deps.settings.video
    elapsed_s = (now_ms() - state.started_ms) / 1000
    return elapsed_s >= video.timeout_s or attempts >= video.max_attempts


async def _wait_more(
    deps: Dependencies, keys: VideoKeys, state: PollState, account: VideoAccount
) -> None:
    video = deps.settings.video
    interval_s = video.webhook_poll_interval_s if account.has_webhook else video.poll_interval_s
    # The last poll lands on the deadline, so a give-up comes on time, not an interval late.
    deadline_ms = state.started_ms + int(video.timeout_s * 1000)
    due_ms = min(now_ms() + int(interval_s * 1000), deadline_ms)
    await _reschedule(deps, keys, state.model_copy(update={"failures": 0}), due_ms)


async def _back_off(
    deps: Dependencies, keys: VideoKeys, state: PollState, exc: BaseException
) -> None:
    """The status API failed: exponential backoff, 5 s x 2^n, at most a minute (by default)."""
    video = deps.settings.video
    failures = state.failures + 1
    delay_s = backoff_s(failures, video.backoff_initial_s, video.backoff_max_s)
    if isinstance(exc, ThrottledError) and exc.retry_after_s is not None:
        delay_s = max(delay_s, exc.retry_after_s)
    log.warning(
        "video_poll_failed",
        video_job_id=state.job_id,
        error=str(exc) or type(exc).__name__,
        retry_in_s=round(delay_s, 2),
    )
    state = state.model_copy(update={"failures": failures})
    await _reschedule(deps, keys, state, now_ms() + int(delay_s * 1000))


async def _reschedule(deps: Dependencies, keys: VideoKeys, state: PollState, due_ms: int) -> None:
    state = state.model_copy(update={"next_due_ms": due_ms})
    pipe = deps.redis.pipeline(transaction=True)
    pipe.set(keys.job(state.job_id), state.model_dump_json(), ex=deps.settings.video.job_ttl_s)
    pipe.zadd(keys.delayed, {state.job_id: due_ms})
    await deps.redis_call(pipe.execute)


async def _succeed(
    deps: Dependencies, keys: VideoKeys, state: PollState, status: VideoStatus
) -> None:
    assert status.video_url is not None  # the adapters fail a success without a link
    rendered = await deps.db(
        video_ledger.mark_rendered, state.ledger_id, state.job_id, status.video_url
    )
    elapsed_s = (now_ms() - state.started_ms) / 1000
    await _close(deps, keys, state, {"status": "completed", "video_url": status.video_url})
    if not rendered:
        return  # cancelled meanwhile, or handled by another turn
    VIDEO_RENDERS.labels(state.account, "succeeded").inc()
    if (account := deps.video_accounts.get(state.account)) is not None:
        account.render_times.append(elapsed_s)
    log.info("video_rendered", video_job_id=state.job_id, elapsed_s=round(elapsed_s, 1))
    await video_delivery.deliver(deps, state.ledger_id)


async def _render_failed(
    deps: Dependencies, keys: VideoKeys, state: PollState, status: VideoStatus
) -> None:
    code, text = status.error_code or "failed", status.error_text or "the render failed"
    if status.retryable and await _resubmit(deps, state):
        await _close(deps, keys, state, {"status": "resubmitted", "error": code})
        log.warning("video_resubmitted", video_job_id=state.job_id, code=code)
        return
    await _fail(deps, keys, state, "video", code, text)


async def _resubmit(deps: Dependencies, state: PollState) -> bool:
    """A provider-side failure (D-ID's UnknownError) of a video_blast render is submitted
    again, up to `rerender_unknown_errors` times (D-ID refunds failed renders)."""
    info = await deps.db(video_ledger.render_info, state.ledger_id)
    if info is None or info.campaign_type != "video_blast":
        return False  # a video_poll job was submitted elsewhere: it cannot be submitted here
    if info.renders > deps.settings.video.rerender_unknown_errors:
        return False
    return await deps.db(video_ledger.resubmit_render, state.ledger_id)


async def _time_out(deps: Dependencies, keys: VideoKeys, state: PollState, attempts: int) -> None:
    elapsed_s = round((now_ms() - state.started_ms) / 1000)
    text = f"not finished after {elapsed_s} s and {attempts} polls"
    await _fail(deps, keys, state, "video", "timeout", text, notice="timeout")


async def _fail(
    deps: Dependencies,
    keys: VideoKeys,
    state: PollState,
    error_class: str,
    code: str,
    text: str,
    notice: str = "failure",
) -> None:
    failure = video_ledger.RenderFailure(state.ledger_id, error_class, code, text)
    failed = await deps.db(video_ledger.fail_render, state.ledger_id, state.job_id, failure)
    await _close(deps, keys, state, {"status": "failed", "error": code, "text": text})
    if not failed:
        return
    VIDEO_RENDERS.labels(state.account, code if code == "timeout" else "failed").inc()
    log.warning("video_failed", video_job_id=state.job_id, code=code, reason=text)
    await video_delivery.send_notice(deps, state.ledger_id, notice, text)


async def _close(
    deps: Dependencies, keys: VideoKeys, state: PollState, outcome: dict[str, Any]
) -> None:
    """The job is over: keep the audit record, drop its state, schedule and counter."""
    video = deps.settings.video
    record = {**outcome, "ledger_id": state.ledger_id, "account": state.account, "at": now_ms()}
    pipe = deps.redis.pipeline(transaction=True)
    pipe.set(keys.completed(state.job_id), orjson.dumps(record), ex=video.completed_ttl_s)
    pipe.delete(keys.job(state.job_id), keys.attempts(state.job_id))
    pipe.zrem(keys.delayed, state.job_id)
    await deps.redis_call(pipe.execute)
