"""Which chat a conversation is: the number and the messaging account a video goes to.

A producer written for the earlier polling worker names a `conversationId`, not a number; the
conversation's chat lives in the producer's own store. `video.conversation_resolver` says where
to read it: a Redis hash, or an HTTP service, each answering JSON {"to", "account"}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp
import orjson

from blastd.config import HttpResolver, RedisHashResolver
from blastd.errors import InvalidJobError
from blastd.recipients import preview

if TYPE_CHECKING:
    from blastd.resources import Dependencies


@dataclass(frozen=True, slots=True)
class Chat:
    """Where a conversation's messages go."""

    to: str
    account: str


async def resolve(deps: Dependencies, conversation_id: str) -> Chat:
    """The conversation's chat, or InvalidJobError saying why it cannot be found."""
    resolver = deps.settings.video.conversation_resolver
    if resolver is None:
        raise InvalidJobError("conversationId given but video.conversation_resolver is not set")
    if isinstance(resolver, RedisHashResolver):
        raw = await _from_hash(deps, resolver, conversation_id)
    else:
        raw = await _from_http(resolver, conversation_id)
    return _read_chat(raw, conversation_id)


async def _from_hash(
    deps: Dependencies, resolver: RedisHashResolver, conversation_id: str
) -> bytes | None:
    answer = await deps.redis_call(deps.redis.hget, resolver.key, conversation_id)
    return answer if isinstance(answer, bytes) else None


async def _from_http(resolver: HttpResolver, conversation_id: str) -> bytes | None:
    url = resolver.url.replace("{conversation_id}", quote(conversation_id, safe=""))
    timeout = aiohttp.ClientTimeout(total=resolver.timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise InvalidJobError(f"conversation resolver answered HTTP {response.status}")
            return await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise InvalidJobError(f"conversation resolver unreachable: {type(exc).__name__}") from None


def _read_chat(raw: bytes | None, conversation_id: str) -> Chat:
    if raw is None:
        raise InvalidJobError(f"conversation {preview(conversation_id)} is not known")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    to = data.get("to") if isinstance(data, dict) else None
    account = data.get("account") if isinstance(data, dict) else None
    if not isinstance(to, str) or not isinstance(account, str) or not to or not account:
        raise InvalidJobError(
            f"conversation {preview(conversation_id)}: the resolver's answer needs "
            '"to" and "account" strings'
        )
    return Chat(to, account)
