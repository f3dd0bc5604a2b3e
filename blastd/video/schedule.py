"""When each followed render is polled next: its state in `video:job:{id}` and its due time.

The keys are described in docs/video.md; `video.key_prefix` (default: the Redis prefix) goes
before each, and an empty prefix gives the producer's own key names.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from blastd.providers.video.accounts import VideoAccount

if TYPE_CHECKING:
    from blastd.resources import Dependencies

ADAPTIVE_MIN_RENDERS = 20  # renders seen before the schedule adapts
ADAPTIVE_QUANTILE_PERCENT = 5
NUDGE_LUA = """
if redis.call('EXISTS', KEYS[3]) == 0 then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class VideoKeys:
    prefix: str

    @property
    def queue(self) -> str:
        return f"{self.prefix}video:poll:queue"

    @property
    def delayed(self) -> str:
        return f"{self.prefix}video:poll:delayed"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}video:job:{job_id}"

    def lock(self, job_id: str) -> str:
        return f"{self.prefix}video:lock:{job_id}"

    def attempts(self, job_id: str) -> str:
        return f"{self.prefix}video:attempts:{job_id}"

    def completed(self, job_id: str) -> str:
        return f"{self.prefix}video:completed:{job_id}"


def video_keys(deps: Dependencies) -> VideoKeys:
    prefix = deps.settings.video.key_prefix
    return VideoKeys(deps.settings.redis_prefix if prefix is None else prefix)


class PollState(BaseModel):
    """What `video:job:{id}` holds: enough to poll the job and find its ledger row."""

    model_config = ConfigDict(extra="ignore")

    job_id: str
    account: str  # the video account that polls it
    ledger_id: int
    started_ms: int  # the render's submission, epoch ms: the give-up clock
    status_url: str | None = None
    failures: int = 0  # API failures in a row, for the backoff
    next_due_ms: int = 0


def now_ms() -> int:
    return int(time.time() * 1000)


def first_poll_s(deps: Dependencies, account: VideoAccount) -> float:
    """The configured first poll, or the webhook's guard interval where one is set. The adaptive
    schedule waits until the quickest 5 % of the account's recent renders were done (once
    there are enough of them to tell), less the one interval by which their completion may
    have been seen late."""
    video = deps.settings.video
    if account.has_webhook:  # the webhook ends the wait; a poll only guards against its loss
        return video.webhook_poll_interval_s
    times = account.render_times
    if not video.adaptive_first_poll or len(times) < ADAPTIVE_MIN_RENDERS:
        return video.first_poll_s
    # A render time is when its completion was seen: up to one interval after it happened.
    quickest_s = sorted(times)[len(times) * ADAPTIVE_QUANTILE_PERCENT // 100]
    return max(video.first_poll_s, quickest_s - video.poll_interval_s)


async def schedule(deps: Dependencies, state: PollState, delay_s: float) -> None:
    """Store a new job's state (unless the job is known already) and its first poll."""
    keys, video = video_keys(deps), deps.settings.video
    state = state.model_copy(update={"next_due_ms": now_ms() + int(delay_s * 1000)})
    pipe = deps.redis.pipeline(transaction=True)
    pipe.set(keys.job(state.job_id), state.model_dump_json(), nx=True, ex=video.job_ttl_s)
    pipe.zadd(keys.delayed, {state.job_id: state.next_due_ms}, nx=True)
    await deps.redis_call(pipe.execute)


async def nudge(deps: Dependencies, job_id: str) -> bool:
    """Poll a known job at once (a completion webhook came); False for an unknown job."""
    keys = video_keys(deps)
    script = deps.redis.register_script(NUDGE_LUA)
    nudged = await deps.redis_call(
        script, keys=[keys.delayed, keys.queue, keys.job(job_id)], args=[job_id]
    )
    return bool(nudged)
