"""Status gateways: post a WhatsApp status to a list of contacts, or resend one by its id.

Two request shapes, picked by the account's `flavour`:

- 'evolution': Evolution API's `POST /message/sendStatus/{instance}` with `type`, `content`,
  `statusJidList` (and `backgroundColor`, `font` for text), answered by HTTP 201 with a
  WAMessage whose `key.id` is the status id (docs/providers.md, status gateways).
- 'story': a producer's own gateway, `POST /story/{text|image|video}` with `sessionId` and
  `statusJidList`, answered with `{"success": true, "messageId": ...}`.

A resend carries the anchor's id in the account's `message_id_field` ('messageId', as Baileys
names the option). Baileys honours it end to end; whether a given HTTP gateway passes it on is
not confirmed (docs/status.md), which is why the runner compares the id a resend is answered with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote

import aiohttp
import orjson

from blastd.config import StatusGatewayAccount
from blastd.errors import (
    BatchTooLargeError,
    CampaignFatalError,
    ConfigError,
    PermanentError,
    ProviderError,
    ThrottledError,
    TransientError,
    UncertainOutcomeError,
)
from blastd.providers.answers import clean_error_text, exchange_error, parse_retry_after_s
from blastd.providers.base import OutboundMessage, SendResult

JID_SUFFIX = "@s.whatsapp.net"
DEFAULT_ID_PATHS = {"evolution": "key.id", "story": "messageId"}
StatusType = Literal["text", "image", "video"]


@dataclass(frozen=True, slots=True)
class StatusContent:
    """What a status shows: a text on a coloured background, or an image or video by URL."""

    type: StatusType
    text: str | None = None
    url: str | None = None
    caption: str | None = None
    background_color: str = "#000000"
    font: int = 1


def jid_of(e164: str) -> str:
    """The WhatsApp user JID of an E.164 number: '+6281234' -> '6281234@s.whatsapp.net'."""
    return e164.removeprefix("+") + JID_SUFFIX


class StatusGatewayProvider:
    """Posts statuses through one gateway session; every answer becomes an id or an error."""

    def __init__(
        self, name: str, account: StatusGatewayAccount, http: aiohttp.ClientSession
    ) -> None:
        if account.token is None:
            raise ConfigError(f"account {name!r}: status_gateway needs a token")
        self.account = account
        self._token = account.token.get_secret_value()
        self._headers = {"Content-Type": "application/json", **_auth_header(account, self._token)}
        self._id_path = (account.message_id_path or DEFAULT_ID_PATHS[account.flavour]).split(".")
        self._timeout = aiohttp.ClientTimeout(
            total=account.request_timeout_s, connect=account.connect_timeout_s
        )
        self._http = http

    async def send_batch(self, messages: Sequence[OutboundMessage]) -> list[SendResult]:
        """A status gateway posts statuses, not chat messages: a blast naming it stops."""
        raise CampaignFatalError(
            "not_a_messaging_account", "a status_gateway account takes 'status' jobs only"
        )

    async def post_status(
        self, content: StatusContent, jids: Sequence[str], message_id: str | None
    ) -> str:
        """Post `content` to `jids`, or with `message_id` resend that status to them.

        Returns the status id the gateway answered with; for a resend whose answer names none,
        the id that was resent. Raises the ProviderError the answer means.
        """
        url, body = self._request_for(content, jids, message_id)
        try:
            async with self._http.post(
                url, data=orjson.dumps(body), headers=self._headers, timeout=self._timeout
            ) as response:
                raw_body = await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
        # A request that never left is sent again; a lost answer leaves its contacts in doubt.
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise exchange_error(exc, self._describe) from exc
        document = _json_object(raw_body)
        if not 200 <= status < 300 or _says_failure(document):
            raise self._error_for(status, document, retry_after)
        return self._read_id(status, document, message_id)

    def _describe(self, exc: Exception) -> str:
        # aiohttp's own texts may quote the URL; ours never carry the token.
        if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ConnectionTimeoutError):
            return f"no answer within {self.account.request_timeout_s:g} s"
        return f"{type(exc).__name__} talking to the gateway"

    def _request_for(
        self, content: StatusContent, jids: Sequence[str], message_id: str | None
    ) -> tuple[str, dict[str, object]]:
        base_url = self.account.base_url.rstrip("/")
        instance = self.account.instance
        body: dict[str, object] = {"statusJidList": list(jids)}
        if self.account.flavour == "evolution":
            url = f"{base_url}/message/sendStatus/{quote(instance, safe='')}"
            body.update(type=content.type, content=content.text or content.url, allContacts=False)
        else:
            url = f"{base_url}/story/{content.type}"
            body["sessionId"] = instance
            body.update({"text": content.text} if content.type == "text" else {"url": content.url})
        if content.type == "text":
            body.update(backgroundColor=content.background_color, font=content.font)
        elif content.caption is not None:
            body["caption"] = content.caption
        if message_id is not None:
            body[self.account.message_id_field] = message_id
        return url, body

    def _error_for(
        self, status: int, document: Mapping[str, object] | None, retry_after: str | None
    ) -> ProviderError:
        text = clean_error_text(_refusal_text(document, f"HTTP {status}"), self._token)
        code, lowered = f"http_{status}", text.lower()
        if status == 429:
            return ThrottledError(code, text, parse_retry_after_s(retry_after, datetime.now(UTC)))
        if status == 413 or any(k in lowered for k in self.account.too_large_keywords):
            return BatchTooLargeError(code, text)  # WAHA users see "Frame Too Large" as a 500
        if status in (401, 403, 404):  # a wrong key, or an instance that does not exist
            return CampaignFatalError(code, text)
        if any(k in lowered for k in self.account.session_keywords):
            return CampaignFatalError("session", text)  # a QR scan or a relink is needed
        if status >= 500:
            return TransientError(code, text)
        return PermanentError(code, text)  # 400: the request itself is wrong

    def _read_id(
        self, status: int, document: Mapping[str, object] | None, message_id: str | None
    ) -> str:
        found: object = document
        for key in self._id_path:
            found = found.get(key) if isinstance(found, Mapping) else None
        if isinstance(found, str) and found:
            return found
        if message_id is not None:
            return message_id  # a resend needs no id back: acceptance is the answer
        # Without an id there is nothing to resend, and the status may exist: never re-post.
        raise UncertainOutcomeError(f"http_{status}", "2xx answer without a status id")


def _auth_header(account: StatusGatewayAccount, token: str) -> dict[str, str]:
    if account.auth_style == "apikey":
        return {"apikey": token}  # Evolution API
    if account.auth_style == "x_api_key":
        return {"X-Api-Key": token}  # WAHA
    return {"Authorization": f"Bearer {token}"}  # WPPConnect and most others


def _json_object(raw_body: bytes) -> dict[str, object] | None:
    try:
        document: object = orjson.loads(raw_body)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def _says_failure(document: Mapping[str, object] | None) -> bool:
    """Some gateways refuse behind a 2xx: `{"success": false}` or `{"status": "error"}`."""
    if document is None:
        return False
    status = document.get("status")
    return document.get("success") is False or (
        isinstance(status, str) and status.lower() == "error"
    )


def _refusal_text(document: Mapping[str, object] | None, fallback: str) -> str:
    """The body's own words (`message`, `error`, or Evolution's `response.message` list)."""
    if document is None:
        return fallback
    for key in ("message", "error"):
        value = document.get(key)
        if isinstance(value, str) and value:
            return value
    response = document.get("response")
    if isinstance(response, Mapping):
        messages = response.get("message")
        if isinstance(messages, list) and messages:
            return "; ".join(str(m) for m in messages)
    return fallback
