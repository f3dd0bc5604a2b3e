"""The Provider protocol and the message bodies every adapter sends."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from blastd.errors import ProviderError


@dataclass(frozen=True, slots=True)
class TextBody:
    text: str


@dataclass(frozen=True, slots=True)
class TemplateBody:
    name: str
    language: str
    body_params: tuple[str, ...] = ()
    header_video_link: str | None = None
    category: str = "marketing"  # marketing, utility or authentication, as the job says


@dataclass(frozen=True, slots=True)
class VideoBody:
    link: str
    caption: str | None = None


Body = TextBody | TemplateBody | VideoBody


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """One rendered message for one recipient; `ledger_id` travels with it to the provider."""

    ledger_id: int
    to: str  # E.164 with the leading '+'
    body: Body


@dataclass(frozen=True, slots=True)
class SendReceipt:
    provider_message_id: str


@dataclass(frozen=True, slots=True)
class StatusUpdate:
    """A delivery status reported by a provider webhook, matched to the ledger by the
    provider's message id first, `ledger_id` (our id echoed back, when it was) second."""

    ledger_id: int | None
    status: str  # sent | delivered | read | failed
    provider_message_id: str | None
    error_code: str | None = None
    error_text: str | None = None


SendResult = SendReceipt | ProviderError


class Provider(Protocol):
    """Sends messages and translates every answer into receipts or the errors of errors.py."""

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        """Send up to the account's `batch_limit` messages in one request.

        Raises ProviderError when the request as a whole failed: it applies to every message.
        Otherwise returns one result per message, in order: a receipt, or the error the
        provider reported for that message alone.
        """
        ...


class SingleMessageProvider(ABC):
    """An API that takes one message per request."""

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        (message,) = messages  # the account's batch_limit is 1
        return [await self.send(message)]

    @abstractmethod
    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send one message; return the provider's id for it or raise a ProviderError."""
