"""The render jobs both video emulators share (did.py, video_api.py): the knobs every one of
them has, each job's plan drawn once at creation, and the clock that moves it on.

A job is `created` for the first tenth of its render time, `started` for the rest, and ends
at creation + render time: `done`, or the failure its fault names, unless the fault keeps it
running for ever. Render times are drawn per job from a log-normal distribution (median
`render_median_s`, sigma `render_sigma`, at least `render_min_s`), then divided by
`time_compression`. The fault is `fail_by_reference[reference]` when the job's reference is
there, else one draw over `never_finish_p` and `render_fault_p`. Draws use the emulator's rng
(seeded by `seed`). A job's state is computed from the clock on every read: polling never moves
a job on, and a job ends on time whether or not anyone asks.

Fault kinds both emulators know: `never_finish` (running for ever) and `expired_link` (done,
but every link to its video is already expired: 403).
"""

from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass
from typing import ClassVar, Literal, Self

from pydantic import Field, model_validator

from blastd.sandbox.emulator import EmulatorConfig, Probability

NEVER_FINISH = "never_finish"
EXPIRED_LINK = "expired_link"
STARTED_AFTER = 0.1  # of the render time: the queue before `started` is short at D-ID

RequestFault = Literal["transient", "throttled", "after_create", "malformed"]
Phase = Literal["created", "started", "ended"]
RenderStatus = Literal["created", "started", "done", "error", "rejected"]


class RenderConfig(EmulatorConfig):
    """The knobs both video emulators share; POST /_sandbox/config replaces any subset.

    Of the base knobs: `transient_p` (5xx before anything happens) and `throttled_p` (429,
    with Retry-After when `retry_after_s` is set) hit every API request; `malformed_body_p`
    (the job is created, the 2xx body is cut off) hits creates only; `latency_ms` and
    `latency_jitter_ms` delay every API answer; `webhook_delay_ms`, `webhook_attempts` and
    `webhook_retry_initial_ms` shape the terminal webhooks. `webhook_url` is not used: each
    job names its own webhook URL."""

    # The provider's per-job fault kinds, and how each ends: a fault missing from
    # `ended_status` ends `done`; one in `unfinished_faults` never ends.
    fault_kinds: ClassVar[frozenset[str]]
    ended_status: ClassVar[dict[str, RenderStatus]]
    unfinished_faults: ClassVar[frozenset[str]] = frozenset({NEVER_FINISH})

    render_median_s: float = Field(60.0, gt=0)
    render_sigma: float = Field(0.35, ge=0)
    render_min_s: float = Field(5.0, ge=0)
    time_compression: float = Field(1.0, gt=0)  # render times are divided by it
    never_finish_p: Probability = 0.0
    render_fault_p: dict[str, Probability] = Field(default_factory=dict)  # fault kind -> p
    fail_by_reference: dict[str, str] = Field(default_factory=dict)  # reference -> fault kind
    create_5xx_after_create_p: Probability = 0.0  # the job exists, the answer says 5xx
    forbidden: bool = False  # every create answers 403
    link_ttl_s: float = Field(3600.0, ge=0)  # Expires of a link = when it was given + this
    webhook_repeats: int = Field(1, ge=1)  # each terminal webhook posted this often
    webhook_drop_p: Probability = 0.0  # a finished job's webhook is never sent
    webhook_user_data: bool = True  # the job's reference in its webhook body

    def fault_slices(self) -> list[tuple[float, RequestFault]]:
        """A create's faults; reads draw only the first two."""
        return [
            (self.transient_p, "transient"),
            (self.throttled_p, "throttled"),
            (self.create_5xx_after_create_p, "after_create"),
            (self.malformed_body_p, "malformed"),
        ]

    def render_fault_slices(self) -> list[tuple[float, str]]:
        """Each per-job fault with its probability, in a fixed order so seeds repeat."""
        drawn = sorted((p, kind) for kind, p in self.render_fault_p.items())
        return [(self.never_finish_p, NEVER_FINISH), *drawn]

    @model_validator(mode="after")
    def _check_render_faults(self) -> Self:
        named = set(self.render_fault_p) | set(self.fail_by_reference.values())
        unknown = named - self.fault_kinds
        if unknown:
            known = ", ".join(sorted(self.fault_kinds))
            raise ValueError(f"unknown render faults {sorted(unknown)}; known: {known}")
        if sum(p for p, _ in self.render_fault_slices()) > 1.0:
            raise ValueError("render fault probabilities add up to more than 1")
        return self


@dataclass(frozen=True, slots=True)
class NewJob:
    """What a valid create request asks for: `fields` are the provider's echo of it, shown in
    every answer about the job."""

    id_prefix: str
    reference: str | None
    webhook_url: str | None
    fields: dict[str, object]


@dataclass(slots=True, eq=False)
class RenderJob:
    """One render: its plan (drawn at creation) and how often it was read."""

    job_id: str
    new: NewJob
    fault: str | None
    finishes: bool
    render_s: float
    created_s: float  # on the emulator's clock
    created_at: float  # wall clock, time.time()
    file_url: str  # the loopback link to its video, before the Expires query
    polls: int = 0

    def phase(self, now_s: float) -> Phase:
        """Where the job stands at `now_s` on the emulator's clock."""
        elapsed_s = now_s - self.created_s
        if elapsed_s < self.render_s * STARTED_AFTER:
            return "created"
        if elapsed_s < self.render_s or not self.finishes:
            return "started"
        return "ended"

    @property
    def done_at(self) -> float:
        """Wall-clock end of a job that finishes: creation + render time."""
        return self.created_at + self.render_s


def draw_render_s(config: RenderConfig, rng: random.Random) -> float:
    """One job's render time in seconds, already divided by `time_compression`."""
    drawn_s = rng.lognormvariate(math.log(config.render_median_s), config.render_sigma)
    return max(config.render_min_s, drawn_s) / config.time_compression


def render_status(config: RenderConfig, job: RenderJob, phase: Phase) -> RenderStatus:
    """The job's state in D-ID's words (created, started, done, error, rejected)."""
    if phase != "ended":
        return phase
    return config.ended_status.get(job.fault or "", "done")


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _tiny_mp4(duration_ms: int) -> bytes:
    """An ISO BMFF file a parser accepts (ftyp, moov with its mvhd, empty mdat): no tracks."""
    ftyp = _box(b"ftyp", b"isom" + struct.pack(">I", 512) + b"isomiso2mp41")
    identity_matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _box(
        b"mvhd",
        struct.pack(">I4I", 0, 0, 0, 1000, duration_ms)  # version+flags, times, timescale ms
        + struct.pack(">IH10x", 0x10000, 0x100)  # rate 1.0, volume 1.0, reserved
        + identity_matrix
        + bytes(24)  # pre_defined
        + struct.pack(">I", 1),  # next_track_ID
    )
    return ftyp + _box(b"moov", mvhd) + _box(b"mdat", b"")


RESULT_MP4 = _tiny_mp4(duration_ms=1000)
