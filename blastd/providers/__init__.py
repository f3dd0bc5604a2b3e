"""The Provider protocol, the messages it sends, and the kind -> implementation registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import aiohttp

from blastd.config import AccountSettings


@dataclass(frozen=True, slots=True)
class TextBody:
    text: str


@dataclass(frozen=True, slots=True)
class TemplateBody:
    name: str
    language: str
    body_params: tuple[str, ...] = ()
    header_video_link: str | None = None


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
    """A delivery status reported by a provider webhook, matched to the ledger by `ledger_id`."""

    ledger_id: int
    status: str  # sent | delivered | read | failed
    provider_message_id: str | None
    error_code: str | None = None
    error_text: str | None = None


class Provider(Protocol):
    """Sends one message per call and translates every answer into a SendReceipt or an error."""

    async def send(self, message: OutboundMessage) -> SendReceipt: ...


def build_provider(name: str, account: AccountSettings, http: aiohttp.ClientSession) -> Provider:
    """Return the adapter for the account's provider kind."""
    from blastd.providers import cloud_api  # imported here: the adapters import this module

    return cloud_api.CloudApiProvider(name, account, http)
