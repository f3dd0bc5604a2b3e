"""The D-ID emulator's reading of create bodies and its job objects (docs/providers.md,
D-ID): what a valid POST /clips or /talks carries, and the JSON a job shows."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson

from blastd.sandbox.renders import STARTED_AFTER, RenderJob, RenderStatus

CREATED_BY = "sandbox-user"
OBJECT_OF_PREFIX = {"clp_": "clip", "tlk_": "talk"}
PREFIX_OF_KIND = {"clips": "clp_", "talks": "tlk_"}
SCRIPT_MAX_CHARS = 40_000  # from a third-party description: not confirmed
USER_DATA_MAX_CHARS = 1_000  # from a third-party description: not confirmed
SPOKEN_CHARS_PER_S = 15  # how long a video reading the script lasts, roughly
AUDIO_SCRIPT_S = 10  # an audio script's length is not known here
FRAMES_PER_S = 25
# The descriptions are ours: D-ID documents only the kinds.
ERROR_DESCRIPTIONS = {
    "FaceError": "Failed to detect a usable face in the source image",
    "SourceError": "Failed to load the source image",
    "LogoError": "Failed to load the logo image",
    "DriverError": "Failed to animate the source with the driver",
    "UnknownError": "Internal error while rendering",
}


class BadRequest(Exception):
    """A create body D-ID refuses with 400 BadRequestError; the text is its description."""


def read_job_fields(
    kind: str, raw_body: bytes, presenter_ids: frozenset[str] | None
) -> dict[str, Any]:
    """The create body as a JSON object, checked as D-ID checks it; raises BadRequest."""
    try:
        document = orjson.loads(raw_body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("Failed to parse the request body as JSON") from exc
    if not isinstance(document, dict):
        raise BadRequest("The request body must be a JSON object")
    _check_script(document.get("script"))
    _check_optional_strings(document)
    if kind == "talks":
        if not _is_http_url(document.get("source_url")):
            raise BadRequest("invalid source url")
    else:
        presenter_id = document.get("presenter_id")
        if not isinstance(presenter_id, str) or not presenter_id:
            raise BadRequest("presenter_id is required")
        if presenter_ids is not None and presenter_id not in presenter_ids:
            raise BadRequest("presenter not found")
    return document


def _check_script(script: object) -> None:
    if not isinstance(script, dict):
        raise BadRequest("Failed to validate script")
    script_type = script.get("type", "text")
    if script_type == "text":
        text = script.get("input")
        if not isinstance(text, str) or not text.strip() or len(text) > SCRIPT_MAX_CHARS:
            raise BadRequest("Failed to validate script")
    elif script_type != "audio" or not _is_http_url(script.get("audio_url")):
        raise BadRequest("Failed to validate script")


def _check_optional_strings(document: dict[str, Any]) -> None:
    user_data = document.get("user_data")
    if user_data is not None and (
        not isinstance(user_data, str) or len(user_data) > USER_DATA_MAX_CHARS
    ):
        raise BadRequest(f"user_data must be a string of at most {USER_DATA_MAX_CHARS} chars")
    webhook = document.get("webhook")
    if webhook is not None and not _is_http_url(webhook):
        raise BadRequest("webhook must be a URL")


def _is_http_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("https://", "http://"))


def echoed_fields(kind: str, document: dict[str, Any]) -> dict[str, object]:
    """What every answer about the job repeats of its request, and the video's length."""
    names = ("presenter_id", "driver_id") if kind == "clips" else ("source_url",)
    fields: dict[str, object] = {name: document[name] for name in names if name in document}
    fields["config"] = document.get("config") or {"result_format": "mp4"}
    if isinstance(document.get("name"), str):
        fields["name"] = document["name"]
    script = document["script"]
    text = script.get("input") if script.get("type", "text") == "text" else None
    fields["duration"] = math.ceil(len(text) / SPOKEN_CHARS_PER_S) if text else AUDIO_SCRIPT_S
    return fields


def iso_time(wall_s: float) -> str:
    """D-ID's timestamps: ISO 8601 UTC with milliseconds and a Z."""
    stamp = datetime.fromtimestamp(wall_s, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def created_document(job: RenderJob) -> dict[str, object]:
    """The 201 body of a create."""
    return {
        "id": job.job_id,
        "object": OBJECT_OF_PREFIX[job.new.id_prefix],
        "created_at": iso_time(job.created_at),
        "created_by": CREATED_BY,
        "status": "created",
    }


def job_document(
    job: RenderJob, status: RenderStatus, link: str, *, with_user_data: bool
) -> dict[str, object]:
    """The job as GET /clips/{id} (or /talks/{id}) shows it in `status`."""
    document = {**created_document(job), "status": status, **job.new.fields}
    if with_user_data and job.new.reference is not None:
        document["user_data"] = job.new.reference
    if status != "created":
        document["started_at"] = iso_time(job.created_at + job.render_s * STARTED_AFTER)
    if status in ("created", "started"):
        document["pending_url"] = link  # the video's future place: 404 until done
    elif status == "done":
        document.update(result_url=link, completed_at=iso_time(job.done_at))
        document["metadata"] = _metadata(job)
    elif status == "error":
        kind = job.fault or "UnknownError"
        document["error"] = {"kind": kind, "description": ERROR_DESCRIPTIONS[kind]}
    return document


def _metadata(job: RenderJob) -> dict[str, object]:
    video_s = job.new.fields["duration"]
    assert isinstance(video_s, int)
    return {
        "num_frames": video_s * FRAMES_PER_S,
        "processing_fps": round(video_s * FRAMES_PER_S / job.render_s, 2),
        "resolution": [1920, 1080],
        "size_kib": 1.0,
    }
