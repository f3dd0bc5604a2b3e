"""The video job types: `video_blast` and `video_poll` (docs/jobs.md, docs/video.md).

A video_blast renders one clip per recipient from a script with the recipient's variables,
then delivers each clip over WhatsApp. A video_poll follows one render somebody else submitted
and delivers it to one chat. Texts may use `{name}` placeholders: the recipient's variables,
and the names in VIDEO_NAMES, which the pipeline fills in when it delivers.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blastd.errors import InvalidJobError, InvalidNumberError
from blastd.job_fields import (
    MAX_CAPTION_CHARS,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_TEXT_CHARS,
    MESSAGE_TEXT,
    PLACEHOLDER,
    SINGLE_LINE,
    AwareDatetime,
    HttpUrl,
    JobId,
    Limits,
    Line,
    RedisKey,
    Spec,
    check_inline_count,
    require_a_valid_number,
    require_one_source,
    validate,
)
from blastd.recipients import RecipientIn, normalize_number, preview

MAX_SCRIPT_CHARS = 40_000  # D-ID's bound on script.input (docs/providers.md)
# Filled by the pipeline at delivery: the clip's link, seconds from submit to completion,
# the reason a render failed, and the give-up time in minutes.
VIDEO_NAMES = frozenset({"video_url", "elapsed_s", "reason", "timeout_min"})
# The texts of the systems blastd replaces, in English.
DEFAULT_CAPTION = "🎥 Your video is ready! It was generated in {elapsed_s} seconds."
DEFAULT_FALLBACK = "{caption}\n\n🔗 Video: {video_url}"  # the text-with-link format
DEFAULT_FAILURE = "Sorry, your video could not be generated: {reason}"
DEFAULT_TIMEOUT = "Video generation timeout: Process exceeded {timeout_min} minutes"

ScriptText = Annotated[str, Field(min_length=3, max_length=MAX_SCRIPT_CHARS), MESSAGE_TEXT]
Caption = Annotated[str, Field(max_length=MAX_CAPTION_CHARS), MESSAGE_TEXT]
NoticeText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS), MESSAGE_TEXT]
OptionValue = Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), SINGLE_LINE]
ProviderJobId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), SINGLE_LINE]


def template_names(text: str | None) -> frozenset[str]:
    """The `{name}` placeholders of a text."""
    return frozenset(PLACEHOLDER.findall(text)) if text else frozenset()


def fill(text: str, values: Mapping[str, str]) -> str:
    """Substitute `{name}` tokens in one pass (never str.format: producer texts stay text);
    a name without a value stays as written."""
    return PLACEHOLDER.sub(lambda found: values.get(found.group(1), found.group()), text)


class RenderSpec(Spec):
    """The clip to render: the video account, the script, and overrides of the account's
    defaults (presenter_id, driver_id, source_url, voice_id, voice_provider for D-ID; any
    submit_body placeholder for a generic video API)."""

    account: Line
    script: ScriptText
    options: dict[OptionValue, OptionValue] = Field(default_factory=dict)


class VideoMessage(Spec):
    """What the recipient receives: the video with a caption; text with the link when the
    provider cannot send the video; an optional notice when the render fails."""

    caption: Caption | None = None
    fallback_text: NoticeText = DEFAULT_FALLBACK
    failure_notice: NoticeText | None = None  # None: a failed render sends nothing


class VideoBlastOptions(Spec):
    not_before: AwareDatetime | None = None
    progress_batch: Annotated[int, Field(ge=1, le=10_000)] | None = None  # None: the setting


class VideoBlastJob(BaseModel):
    """Per recipient: render the script, then deliver the clip through `account`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    type: Literal["video_blast"] = "video_blast"
    id: JobId
    account: Line  # the messaging account that delivers the clips
    video: RenderSpec
    message: VideoMessage = VideoMessage()
    recipients: Annotated[list[RecipientIn], Field(min_length=1)] | None = None
    recipients_key: RedisKey | None = None
    options: VideoBlastOptions = VideoBlastOptions()

    @model_validator(mode="after")
    def _require_one_recipient_source(self) -> VideoBlastJob:
        require_one_source(self.recipients, self.recipients_key, "recipients")
        return self

    def missing_variables(self, values: Mapping[str, str]) -> frozenset[str]:
        """The recipient variables the script and texts use that `values` does not give."""
        texts = (self.video.script, self.message.caption, self.message.fallback_text)
        notice = self.message.failure_notice
        names = frozenset().union(*(template_names(t) for t in (*texts, notice)))
        return frozenset(n for n in names - VIDEO_NAMES - {"caption"} if n not in values)


class Notify(Spec):
    """Where a video_poll's result goes: a chat of a messaging account, and its texts."""

    account: Line
    to: Annotated[str, Field(min_length=1, max_length=MAX_NAME_CHARS), SINGLE_LINE]
    caption: Caption = DEFAULT_CAPTION
    fallback_text: NoticeText = DEFAULT_FALLBACK
    failure_text: NoticeText = DEFAULT_FAILURE
    timeout_text: NoticeText = DEFAULT_TIMEOUT


class VideoPollJob(BaseModel):
    """A render submitted elsewhere (`job_id` at the video account `account`): poll it and
    deliver the clip to `notify.to`. `started_at` (default: when blastd took the job) starts
    the give-up clock."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    type: Literal["video_poll"] = "video_poll"
    id: JobId
    job_id: ProviderJobId
    account: Line
    status_url: HttpUrl | None = None  # the job's own status URL, when the producer has one
    started_at: AwareDatetime | None = None
    notify: Notify


def parse_video_blast(data: dict[str, Any], limits: Limits) -> VideoBlastJob:
    check_inline_count(data, "recipients", limits)
    job = validate(VideoBlastJob, data)
    _check_accounts(job.video.account, job.account, limits)
    if job.recipients is not None:
        require_a_valid_number(job.recipients, limits.default_region)
    return job


def parse_video_poll(data: dict[str, Any], limits: Limits) -> VideoPollJob:
    job = validate(VideoPollJob, data)
    _check_accounts(job.account, job.notify.account, limits)
    try:
        normalize_number(job.notify.to, limits.default_region)
    except InvalidNumberError as exc:  # the one chat must be reachable
        raise InvalidJobError(f"notify.to: {exc.reason}") from None
    return job


def _check_accounts(video_account: str, messaging_account: str, limits: Limits) -> None:
    _require_account(video_account, limits.video_accounts, "a video account")
    _require_account(messaging_account, limits.messaging_accounts, "a messaging account")


def _require_account(name: str, known: Collection[str], what: str) -> None:
    if name not in known:
        raise InvalidJobError(f"account {preview(name)} is not {what} of this daemon")
