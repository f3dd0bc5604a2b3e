"""The VideoProvider protocol: submit a render, read its state, find a submission again.

A video-generation API works by jobs: a submit answers a job id at once, the video is ready
minutes later. The adapters (did.py, video_api.py) translate every answer into the states below
or into the errors of errors.py; nothing outside `blastd.providers` knows a provider's fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# running: not finished yet; succeeded: `video_url` is set; failed: the render ended in an
# error (`error_code` is the provider's kind); not_found: the provider does not know the job.
VideoState = Literal["running", "succeeded", "failed", "not_found"]


@dataclass(frozen=True, slots=True)
class VideoRequest:
    """One render to submit.

    `reference` is our ledger id as text: D-ID's `user_data`, the generic API's client
    reference, so a submission can be found again after a crash (`find`). `options` are the
    job's per-campaign overrides of the account's defaults (presenter_id, source_url,
    voice_id, ...), with names as the adapter documents them."""

    reference: str
    script: str
    webhook_url: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VideoStatus:
    """What the provider says about one job."""

    job_id: str
    state: VideoState
    video_url: str | None = None
    error_code: str | None = None  # D-ID's error kind, or the provider's status string
    error_text: str | None = None
    # The render failed for a reason of the provider's own (D-ID's UnknownError): the same
    # input may well succeed when submitted again.
    retryable: bool = False


class VideoProvider(Protocol):
    """A video-generation API account.

    `submit` and `status` raise the errors of errors.py when the request itself failed:
    TransientError (5xx, timeout, connection), ThrottledError (429, with Retry-After),
    PermanentError (the request is invalid and will stay so), CampaignFatalError (credentials,
    credits, permission: nothing will work until an operator acts)."""

    @property
    def can_find(self) -> bool:
        """True when `find` can look a submission up by its reference."""
        ...

    async def submit(self, request: VideoRequest) -> str:
        """Create the render; return the provider's job id."""
        ...

    async def status(self, job_id: str) -> VideoStatus:
        """The job's state now. An unknown job is `not_found`, not an error."""
        ...

    async def find(self, reference: str) -> str | None:
        """The id of the job submitted with `reference`, or None when there is none.
        Only called when `can_find`."""
        ...

    def webhook_job_id(self, payload: Mapping[str, Any]) -> str | None:
        """The job id a completion webhook's JSON body names, or None when it names none.
        The body is not trusted beyond that: the daemon reads the job's state with `status`."""
        ...
