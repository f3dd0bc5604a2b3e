"""What every provider emulator shares: the common knobs, the traffic counters, the /_sandbox
control endpoints and the webhook sender's lifetime.

A provider's emulator subclasses Emulator, answers its own endpoints, and counts into
`self._traffic`; the control endpoints and webhook delivery come with the base.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Generic, Self, TypeVar

import aiohttp
import orjson
from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from blastd.sandbox.webhooks import WebhookFormat, WebhookOutbox, WebhookTarget

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
ValueT = TypeVar("ValueT")


def digits(text: str) -> str:
    """The digits of a number as written: "+62 812-1" gives "628121"."""
    return "".join(c for c in text if c.isdigit())


def _keep_digits_of_numbers(value: object) -> object:
    if isinstance(value, dict):
        return {digits(str(k)): v for k, v in value.items()}
    if isinstance(value, list | set | frozenset):
        return frozenset(digits(str(k)) for k in value)
    return value


# Knobs keyed by recipient keep the digits of each number, so "+62 812-1" and "628121" name one.
ByNumber = Annotated[dict[str, ValueT], BeforeValidator(_keep_digits_of_numbers)]
NumberSet = Annotated[frozenset[str], BeforeValidator(_keep_digits_of_numbers)]


class EmulatorConfig(BaseModel):
    """The knobs every emulator has; POST /_sandbox/config replaces any subset at runtime."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(0.0, ge=0)  # after the answer is decided: a timeout may hide it
    latency_jitter_ms: float = Field(0.0, ge=0)  # uniform extra latency in [0, jitter]
    tokens: frozenset[str] = frozenset({"sandbox-token"})
    transient_p: Probability = 0.0
    throttled_p: Probability = 0.0
    malformed_body_p: Probability = 0.0  # accepted, but the 200 body cannot be read
    retry_after_s: float | None = Field(None, ge=0)  # Retry-After on throttled answers
    seed: int | None = None
    webhook_url: str | None = None
    webhook_delay_ms: float = Field(0.0, ge=0)
    webhook_attempts: int = Field(5, ge=1)
    webhook_retry_initial_ms: float = Field(100.0, ge=0)  # doubles after each failed POST

    @abstractmethod  # pydantic's model metaclass is an ABCMeta
    def fault_slices(self) -> Sequence[tuple[float, str]]:
        """Each drawn fault with its probability; one draw picks at most one of them."""

    @model_validator(mode="after")
    def _check_fault_total(self) -> Self:
        if sum(p for p, _ in self.fault_slices()) > 1.0:
            raise ValueError("fault probabilities add up to more than 1")
        return self


@dataclass(slots=True)
class Traffic:
    """What arrived since start or the last reset."""

    requests: int = 0
    accepted: int = 0
    rejected_by_code: Counter[str] = field(default_factory=Counter)
    accepted_by_recipient: Counter[str] = field(default_factory=Counter)
    arrivals: array[float] = field(default_factory=lambda: array("d"))
    turns: Counter[str] = field(default_factory=Counter)  # rotation of codes and bodies


ConfigT = TypeVar("ConfigT", bound=EmulatorConfig)
TrafficT = TypeVar("TrafficT", bound=Traffic)
EventT = TypeVar("EventT")
FaultT = TypeVar("FaultT", bound=str)


class Emulator(ABC, Generic[ConfigT, TrafficT, EventT]):
    """An emulator's knobs, counters and webhook outbox, and its /_sandbox/ handlers."""

    rejections_key: ClassVar[str] = "rejected_by_code"  # the stats key of rejected_by_code
    webhook_noun: ClassVar[str] = "statuses"  # the stats keys are webhook_<noun>_pending, ...

    def __init__(
        self, config: ConfigT, now: Callable[[], float], new_traffic: Callable[[], TrafficT]
    ) -> None:
        self._now = now
        self._rng = random.Random(config.seed)
        self._config = config
        self._new_traffic = new_traffic
        self._traffic = new_traffic()
        self.outbox: WebhookOutbox[EventT] = WebhookOutbox()

    @abstractmethod
    def _webhook_format(self, url: str) -> WebhookFormat[EventT]:
        """How this provider posts its events to `url`, under the current knobs."""

    def apply(self, config: ConfigT) -> None:
        """Switch to new knobs; counters carry on."""
        if config.seed != self._config.seed:
            self._rng = random.Random(config.seed)
        self._config = config

    def reset(self) -> None:
        """Forget all traffic; knobs and queued webhooks stay."""
        self._traffic = self._new_traffic()
        self.outbox.reset_counts()

    def add_control_routes(self, app: web.Application) -> None:
        """Serve /_sandbox/stats|recipients|arrivals|config|reset and the webhook sender."""
        app.router.add_get("/_sandbox/stats", self.handle_stats)
        app.router.add_get("/_sandbox/recipients", self.handle_recipients)
        app.router.add_get("/_sandbox/arrivals", self.handle_arrivals)
        app.router.add_post("/_sandbox/config", self.handle_config)
        app.router.add_post("/_sandbox/reset", self.handle_reset)
        app.cleanup_ctx.append(self.deliver_webhooks)

    def _latency_s(self) -> float:
        jitter_ms = self._rng.uniform(0.0, self._config.latency_jitter_ms)
        return (self._config.latency_ms + jitter_ms) / 1000.0

    def _draw_fault(self, slices: Sequence[tuple[float, FaultT]]) -> FaultT | None:
        """At most one fault by one draw; no draw at all when `slices` is empty."""
        if not slices:
            return None
        draw = self._rng.random()
        for probability, kind in slices:
            if draw < probability:
                return kind
            draw -= probability
        return None

    def _turn(self, rotation: str) -> int:
        """How often `rotation` came before: picks the next of a rotated set of answers."""
        turn = self._traffic.turns[rotation]
        self._traffic.turns[rotation] += 1
        return turn

    def stats(self) -> dict[str, object]:
        """The counters /_sandbox/stats shows."""
        traffic = self._traffic
        per_recipient = traffic.accepted_by_recipient
        noun = self.webhook_noun
        return {
            "requests": traffic.requests,
            "accepted": traffic.accepted,
            self.rejections_key: traffic.rejected_by_code,
            "duplicates": {to: count for to, count in per_recipient.items() if count > 1},
            "accepted_per_recipient_total": len(per_recipient),
            "answers_withheld": traffic.turns["withheld"],  # accepted, answer held back
            f"webhook_{noun}_pending": len(self.outbox),
            f"webhook_{noun}_delivered": self.outbox.delivered,
            f"webhook_{noun}_dropped": self.outbox.dropped,
        }

    async def handle_stats(self, request: web.Request) -> web.Response:
        return json_response(self.stats())

    async def handle_recipients(self, request: web.Request) -> web.Response:
        return json_response(self._traffic.accepted_by_recipient)

    async def handle_arrivals(self, request: web.Request) -> web.Response:
        return json_response(self._traffic.arrivals.tolist())

    async def handle_config(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            config = type(self._config).model_validate({**self._config.model_dump(), **changes})
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            return json_response({"error": str(exc)}, status=400)
        self.apply(config)
        return json_response({"updated": sorted(changes)})

    async def handle_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_response({"reset": True})

    async def deliver_webhooks(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: the webhook sender lives exactly as long as the app."""
        async with aiohttp.ClientSession() as http:
            sender = asyncio.create_task(self.outbox.run(http, self._webhook_target))
            try:
                yield
            finally:
                sender.cancel()
                await asyncio.wait([sender])
            if not sender.cancelled():
                sender.result()  # a crashed sender is a bug: surface it at shutdown

    def _webhook_target(self) -> WebhookTarget[EventT] | None:
        config = self._config
        if config.webhook_url is None:
            return None
        return WebhookTarget(
            format=self._webhook_format(config.webhook_url),
            attempts=config.webhook_attempts,
            retry_initial_s=config.webhook_retry_initial_ms / 1000.0,
        )


def json_response(document: object, status: int = 200) -> web.Response:
    """`document` as an application/json answer."""
    return web.Response(body=orjson.dumps(document), status=status, content_type="application/json")
